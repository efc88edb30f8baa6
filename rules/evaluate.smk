# Every round's model is measured on the same fixed validation patients (native T1c grid).


rule evaluate_round:
    input:
        predictions=evaluation_inputs,
        train_summary=f"{RESULTS}/rounds/round_{{round}}/model/train_summary.json",
    output:
        per_study=f"{RESULTS}/rounds/round_{{round}}/evaluation/per_study.tsv",
        lesions=f"{RESULTS}/rounds/round_{{round}}/evaluation/lesions.tsv",
        summary=f"{RESULTS}/rounds/round_{{round}}/evaluation/summary.json",
        detection=f"{RESULTS}/rounds/round_{{round}}/evaluation/detection_by_size.tsv",
        froc=f"{RESULTS}/rounds/round_{{round}}/evaluation/froc.tsv",
    log:
        f"{RESULTS}/logs/evaluate/round_{{round}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/round_{{round}}.tsv"
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        studies=validation_records,
        # Only what the metrics use: response or statistics settings must not re-run the
        # evaluation (and with it every later active-learning round).
        settings={
            key: config["evaluate"][key]
            for key in ("iou_threshold", "size_bins_mm")
            if key in config["evaluate"]
        },
        pred_root=lambda wc: f"{RESULTS}/rounds/round_{wc.round}/predictions",
    script:
        "../scripts/evaluate_round.py"


# Paired statistics of a round against round 0 on the same validation studies.
rule compare_rounds:
    input:
        new=evaluation_table("{round}"),
        old=evaluation_table(0),
    output:
        table=report(
            compare_table("{round}"),
            caption="../report/compare_rounds.rst",
            category="Round comparison",
        ),
    log:
        f"{RESULTS}/logs/evaluate/compare_round_{{round}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/compare_round_{{round}}.tsv"
    conda:
        "../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        settings={
            key: config["evaluate"][key]
            for key in ("compare_metrics", "compare_groups")
            if key in config["evaluate"]
        },
    script:
        "../scripts/compare_rounds.py"


# Lesion tracking and volumetric response per patient (preprocessed grid, see
# metsflow/jobs/longitudinal.py), from a round's predictions and the sheet labels.
rule longitudinal_response:
    input:
        plan=PLAN_TABLE,
        predictions=lambda wc: round_prediction_manifests(wc.round),
        registered=[REGISTER_TABLE],
        preprocessed=[PREPROCESS_TABLE],
    output:
        lesions=longitudinal_table("{round}", "lesions"),
        response=report(
            longitudinal_table("{round}", "response"),
            caption="../report/response.rst",
            category="Longitudinal response",
        ),
    log:
        f"{RESULTS}/logs/evaluate/longitudinal_round_{{round}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/longitudinal_round_{{round}}.tsv"
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        settings=config["evaluate"].get("response", {}),
        prep_root=lambda wc, input: stage_root(input.preprocessed[0]),
        reg_root=lambda wc, input: stage_root(input.registered[0]),
        pred_root=lambda wc: prediction_root(wc.round),
    script:
        "../scripts/longitudinal_response.py"
