# One active-learning round r >= 1: the round r-1 model's pool predictions -> acquisition picks
# a batch -> export for review (ITK-SNAP / 3D Slicer / MONAI Label) -> corrections come back
# through the label store (people, or the simulated annotator) -> train_round r fine-tunes.
# Round r's training never starts until every study of its batch has a confirmed label.


rule select_batch:
    input:
        unpack(selection_inputs),
    output:
        selection=f"{RESULTS}/rounds/round_{{round}}/selection.tsv",
    log:
        f"{RESULTS}/logs/active_learning/select_round_{{round}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/active_learning/select_round_{{round}}.tsv"
    wildcard_constraints:
        round=r"[1-9]\d*",
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        settings=config["active_learning"],
        seed=config["seed"],
        label_store=config["label_store"],
        pred_root=lambda wc: f"{RESULTS}/rounds/round_{int(wc.round) - 1}/predictions",
    script:
        "../scripts/select_batch.py"


rule export_review:
    input:
        selection=f"{RESULTS}/rounds/round_{{round}}/selection.tsv",
    output:
        manifest=f"{RESULTS}/rounds/round_{{round}}/review/manifest.csv",
    log:
        f"{RESULTS}/logs/active_learning/export_round_{{round}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/active_learning/export_round_{{round}}.tsv"
    wildcard_constraints:
        round=r"[1-9]\d*",
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        studies=lambda wc: [study_record(s) for s in COHORT.studies],
        pred_root=lambda wc: f"{RESULTS}/rounds/round_{int(wc.round) - 1}/predictions",
        out_dir=lambda wc: f"{RESULTS}/rounds/round_{wc.round}/review",
        model=lambda wc: model_path(int(wc.round) - 1),
    script:
        "../scripts/export_review.py"


rule collect_annotations:
    input:
        selection=f"{RESULTS}/rounds/round_{{round}}/selection.tsv",
        review=f"{RESULTS}/rounds/round_{{round}}/review/manifest.csv",
    output:
        annotations=f"{RESULTS}/rounds/round_{{round}}/annotations.tsv",
    log:
        f"{RESULTS}/logs/active_learning/annotations_round_{{round}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/active_learning/annotations_round_{{round}}.tsv"
    wildcard_constraints:
        round=r"[1-9]\d*",
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        annotator=config["active_learning"]["annotator"],
        oracle_sheet=config.get("oracle_sheet", ""),
        label_store=config["label_store"],
        studies=lambda wc: [study_record(s) for s in COHORT.studies],
        model=lambda wc: model_path(int(wc.round) - 1),
    script:
        "../scripts/collect_annotations.py"
