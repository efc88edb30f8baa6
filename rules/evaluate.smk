# Every round's model is measured on the same fixed validation patients (native T1c grid).


rule evaluate_round:
    input:
        predictions=evaluation_inputs,
        train_summary=LAYOUT.train_summary("{round}"),
    output:
        per_study=LAYOUT.evaluation_table("{round}", "per_study"),
        lesions=LAYOUT.evaluation_table("{round}", "lesions"),
        summary=LAYOUT.evaluation_summary("{round}"),
        detection=LAYOUT.evaluation_table("{round}", "detection_by_size"),
        froc=LAYOUT.evaluation_table("{round}", "froc"),
    log:
        LAYOUT.job("evaluate", "{round}").log,
    benchmark:
        LAYOUT.job("evaluate", "{round}").benchmark
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        studies=validation_records,
        # Only what the metrics use (EvaluateSettings.metrics).
        settings=SETTINGS.evaluate.metrics(),
    script:
        "../scripts/evaluate_round.py"


# Paired statistics of a round against round 0 on the same validation studies.
rule compare_rounds:
    input:
        new=LAYOUT.evaluation_table("{round}"),
        old=LAYOUT.evaluation_table(0),
    output:
        table=report(
            LAYOUT.compare_table("{round}"),
            caption="../report/compare_rounds.rst",
            category="Round comparison",
        ),
    log:
        LAYOUT.job("evaluate", "{round}", part="compare").log,
    benchmark:
        LAYOUT.job("evaluate", "{round}", part="compare").benchmark
    conda:
        "../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        settings=SETTINGS.evaluate.comparison(),
    script:
        "../scripts/compare_rounds.py"


# Lesion tracking and volumetric response per patient (preprocessed grid, see
# metsflow/jobs/longitudinal.py), from a round's predictions and the sheet labels.
rule longitudinal_response:
    input:
        plan=LAYOUT.plan,
        predictions=lambda wc: round_prediction_manifests(wc.round),
        registered=[LAYOUT.stage_manifest("registered")],
        preprocessed=[LAYOUT.stage_manifest("preprocessed")],
    output:
        lesions=LAYOUT.longitudinal_table("{round}", "lesions"),
        response=report(
            LAYOUT.longitudinal_table("{round}", "response"),
            caption="../report/response.rst",
            category="Longitudinal response",
        ),
    log:
        LAYOUT.job("evaluate", "{round}", part="longitudinal").log,
    benchmark:
        LAYOUT.job("evaluate", "{round}", part="longitudinal").benchmark
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        settings=SETTINGS.evaluate.response,
    script:
        "../scripts/longitudinal_response.py"
