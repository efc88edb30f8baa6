# Cohort summary, per-round validation metrics and figures for `snakemake --report`.


localrules:
    report_rounds,


rule report_rounds:
    input:
        plan=LAYOUT.plan,
        quarantine=LAYOUT.quarantine,
        summaries=[LAYOUT.evaluation_summary(r) for r in ROUNDS],
        per_study=[LAYOUT.evaluation_table(r) for r in ROUNDS],
        selections=[LAYOUT.selection(r) for r in ROUNDS[1:]],
        burdens=[LAYOUT.burden(r) for r in ROUNDS[1:]],
    output:
        table=report(
            LAYOUT.report("rounds.tsv"),
            caption="../report/rounds.rst",
            category="Active learning",
        ),
        dice_plot=report(
            LAYOUT.report("dice_per_round.png"),
            caption="../report/dice_per_round.rst",
            category="Active learning",
        ),
        cohort=report(
            LAYOUT.report("cohort_summary.tsv"),
            caption="../report/cohort_summary.rst",
            category="Cohort",
        ),
        burden=report(
            LAYOUT.report("correction_burden.tsv"),
            caption="../report/correction_burden.rst",
            category="Active learning",
        ),
        burden_plot=report(
            LAYOUT.report("correction_burden_per_round.png"),
            caption="../report/correction_burden_per_round.rst",
            category="Active learning",
        ),
        suggestions=report(
            LAYOUT.report("suggestions_by_size_bin.tsv"),
            caption="../report/suggestions_by_size_bin.rst",
            category="Active learning",
        ),
    params:
        label_store=config["label_store"],
    log:
        LAYOUT.job("report_rounds").log,
    benchmark:
        LAYOUT.job("report_rounds").benchmark
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/report_rounds.py"


rule report_figures:
    input:
        per_study=[LAYOUT.evaluation_table(r) for r in ROUNDS],
        lesions=LAYOUT.evaluation_table(FINAL_ROUND, "lesions"),
        response=LAYOUT.longitudinal_table(FINAL_ROUND, "response"),
        predictions=round_prediction_manifests(FINAL_ROUND, "validation"),
    output:
        f1_plot=report(
            LAYOUT.report("lesion_f1_per_round.png"),
            caption="../report/lesion_f1_per_round.rst",
            category="Active learning",
        ),
        distributions=report(
            LAYOUT.report("metric_distributions.png"),
            caption="../report/metric_distributions.rst",
            category="Validation metrics",
        ),
        volume_vs_dice=report(
            LAYOUT.report("volume_vs_dice.png"),
            caption="../report/volume_vs_dice.rst",
            category="Validation metrics",
        ),
        trajectories=report(
            LAYOUT.report("volume_trajectories.png"),
            caption="../report/volume_trajectories.rst",
            category="Longitudinal response",
        ),
        overlay_best=report(
            LAYOUT.report("overlay_best.png"),
            caption="../report/overlay.rst",
            category="Validation cases",
            subcategory="best",
        ),
        overlay_worst=report(
            LAYOUT.report("overlay_worst.png"),
            caption="../report/overlay.rst",
            category="Validation cases",
            subcategory="worst",
        ),
    log:
        LAYOUT.job("report_figures").log,
    benchmark:
        LAYOUT.job("report_figures").benchmark
    conda:
        "../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        studies=validation_records,
    script:
        "../scripts/report_figures.py"


# Small-lesion detection (metsflow/jobs/report.py): size-binned sensitivity and FP per patient
# across rounds, the validation lesions stage 2's operating point loses, one FROC per round.
rule report_detection:
    input:
        summaries=[LAYOUT.evaluation_summary(r) for r in ROUNDS],
        detection=[LAYOUT.evaluation_table(r, "detection_by_size") for r in ROUNDS],
        stage2=[LAYOUT.stage2_summary(r) for r in ROUNDS] if STAGE2_ENABLED else [],
    output:
        table=report(
            LAYOUT.report("detection_by_size.tsv"),
            caption="../report/detection_by_size.rst",
            category="Validation metrics",
        ),
        lost=report(
            LAYOUT.report("stage2_lost_lesions.tsv"),
            caption="../report/stage2_lost_lesions.rst",
            category="Validation metrics",
        ),
    log:
        LAYOUT.job("report_detection").log,
    benchmark:
        LAYOUT.job("report_detection").benchmark
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
            LAYOUT.report(f"froc_{round_name('{round}')}.png"),
            caption="../report/froc.rst",
            category="Validation metrics",
            subcategory="FROC",
        ),
    log:
        LAYOUT.job("report_froc", "{round}").log,
    benchmark:
        LAYOUT.job("report_froc", "{round}").benchmark
    conda:
        "../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/report_froc.py"
