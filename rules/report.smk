# Cohort summary, per-round validation metrics and figures for `snakemake --report`.


localrules:
    report_rounds,


rule report_rounds:
    input:
        plan=PLAN_TABLE,
        quarantine=f"{RESULTS}/qc/quarantine.tsv",
        summaries=[evaluation_summary(r) for r in ROUNDS],
        per_study=[
            f"{RESULTS}/rounds/round_{r}/evaluation/per_study.tsv" for r in ROUNDS
        ],
        selections=[selection_table(r) for r in ROUNDS[1:]],
    output:
        table=report(
            f"{RESULTS}/report/rounds.tsv",
            caption="../report/rounds.rst",
            category="Active learning",
        ),
        dice_plot=report(
            f"{RESULTS}/report/dice_per_round.png",
            caption="../report/dice_per_round.rst",
            category="Active learning",
        ),
        cohort=report(
            f"{RESULTS}/report/cohort_summary.tsv",
            caption="../report/cohort_summary.rst",
            category="Cohort",
        ),
    log:
        f"{RESULTS}/logs/report_rounds.log",
    benchmark:
        f"{RESULTS}/benchmarks/report_rounds.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/report_rounds.py"
