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
        burdens=[burden_table(r) for r in ROUNDS[1:]],
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
        burden=report(
            f"{RESULTS}/report/correction_burden.tsv",
            caption="../report/correction_burden.rst",
            category="Active learning",
        ),
        burden_plot=report(
            f"{RESULTS}/report/correction_burden_per_round.png",
            caption="../report/correction_burden_per_round.rst",
            category="Active learning",
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
        pred_root=lambda wc: prediction_root(FINAL_ROUND),
    script:
        "../scripts/report_figures.py"


# Small-lesion detection (metsflow/jobs/report.py): size-binned sensitivity and FP per patient
# across rounds, the validation lesions stage 2's operating point loses, one FROC per round.
rule report_detection:
    input:
        summaries=[evaluation_summary(r) for r in ROUNDS],
        detection=[evaluation_table(r, "detection_by_size") for r in ROUNDS],
        stage2=[stage2_summary_path(r) for r in ROUNDS] if STAGE2_ENABLED else [],
    output:
        table=report(
            f"{RESULTS}/report/detection_by_size.tsv",
            caption="../report/detection_by_size.rst",
            category="Validation metrics",
        ),
        lost=report(
            f"{RESULTS}/report/stage2_lost_lesions.tsv",
            caption="../report/stage2_lost_lesions.rst",
            category="Validation metrics",
        ),
    log:
        f"{RESULTS}/logs/report_detection.log",
    benchmark:
        f"{RESULTS}/benchmarks/report_detection.tsv"
    conda:
        "../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/report_detection.py"


rule report_froc:
    input:
        unpack(froc_report_inputs),
    output:
        png=report(
            f"{RESULTS}/report/froc_round_{{round}}.png",
            caption="../report/froc.rst",
            category="Validation metrics",
            subcategory="FROC",
        ),
    log:
        f"{RESULTS}/logs/report_froc_{{round}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/report_froc_{{round}}.tsv"
    conda:
        "../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/report_froc.py"
