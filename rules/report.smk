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


rule report_figures:
    input:
        per_study=[evaluation_table(r) for r in ROUNDS],
        lesions=evaluation_table(FINAL_ROUND, "lesions"),
        response=longitudinal_table(FINAL_ROUND, "response"),
        predictions=round_prediction_manifests(FINAL_ROUND, "validation"),
    output:
        f1_plot=report(
            f"{RESULTS}/report/lesion_f1_per_round.png",
            caption="../report/lesion_f1_per_round.rst",
            category="Active learning",
        ),
        distributions=report(
            f"{RESULTS}/report/metric_distributions.png",
            caption="../report/metric_distributions.rst",
            category="Validation metrics",
        ),
        volume_vs_dice=report(
            f"{RESULTS}/report/volume_vs_dice.png",
            caption="../report/volume_vs_dice.rst",
            category="Validation metrics",
        ),
        trajectories=report(
            f"{RESULTS}/report/volume_trajectories.png",
            caption="../report/volume_trajectories.rst",
            category="Longitudinal response",
        ),
        overlay_best=report(
            f"{RESULTS}/report/overlay_best.png",
            caption="../report/overlay.rst",
            category="Validation cases",
            subcategory="best",
        ),
        overlay_worst=report(
            f"{RESULTS}/report/overlay_worst.png",
            caption="../report/overlay.rst",
            category="Validation cases",
            subcategory="worst",
        ),
    log:
        f"{RESULTS}/logs/report_figures.log",
    benchmark:
        f"{RESULTS}/benchmarks/report_figures.tsv"
    conda:
        "../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        studies=validation_records,
        pred_root=lambda wc, input: stage_root(input.predictions[0]),
    script:
        "../scripts/report_figures.py"
