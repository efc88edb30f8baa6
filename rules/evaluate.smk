# Every round's model is measured on the same fixed validation patients (native T1c grid).


rule evaluate_round:
    input:
        predictions=evaluation_inputs,
        train_summary=f"{RESULTS}/rounds/round_{{round}}/model/train_summary.json",
    output:
        per_study=f"{RESULTS}/rounds/round_{{round}}/evaluation/per_study.tsv",
        lesions=f"{RESULTS}/rounds/round_{{round}}/evaluation/lesions.tsv",
        summary=f"{RESULTS}/rounds/round_{{round}}/evaluation/summary.json",
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
        settings=config["evaluate"],
        pred_root=lambda wc: f"{RESULTS}/rounds/round_{wc.round}/predictions",
    script:
        "../scripts/evaluate_round.py"
