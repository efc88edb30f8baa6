# One active-learning round r >= 1: the round r-1 model's pool predictions -> acquisition picks
# a batch -> export for review (ITK-SNAP / 3D Slicer / MONAI Label) -> corrections come back
# through the label store (people, or the simulated annotator) -> train_round r fine-tunes;
# correction_burden measures, per study, how much people changed the pre-segmentation.
# Round r's training never starts until every study of its batch has a confirmed label.
#
# One invocation per round: `snakemake --profile profiles/local round_2` runs exactly through
# round 2. With people (annotator: human) the round_<r> target stops at the first batch that is not
# fully confirmed in the label store: its jobs end with that batch's review export and the
# collect_annotations job, which fails naming the pending studies and the import command, so even
# `snakemake -n round_<r>` never plans training on unconfirmed data. select_batch is a checkpoint
# so the target is re-planned once the batch is known. After the last round, the final model's
# labels of the remaining pool are listed and a seeded random sample of them is exported for QA.


include: "active_learning_common.smk"


# The pool studies round r selects from (active_learning.candidates: the seeded, patient-stratified
# subset that round r - 1's models segmented, or the whole pool), recorded with its seed.
rule round_candidates:
    input:
        plan=LAYOUT.plan,
    output:
        candidates=LAYOUT.candidates("{round}"),
    log:
        LAYOUT.job("active_learning", "{round}", part="candidates").log,
    benchmark:
        LAYOUT.job("active_learning", "{round}", part="candidates").benchmark
    wildcard_constraints:
        round=r"[1-9]\d*",
    localrule: True
    conda:
        "../envs/imaging.yaml"
    params:
        candidates=CANDIDATES,
        seed=config["seed"],
    script:
        "../scripts/round_candidates.py"


checkpoint select_batch:
    input:
        unpack(selection_inputs),
    output:
        selection=LAYOUT.selection("{round}"),
    log:
        LAYOUT.job("active_learning", "{round}", part="select").log,
    benchmark:
        LAYOUT.job("active_learning", "{round}", part="select").benchmark
    wildcard_constraints:
        round=r"[1-9]\d*",
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        # Only what the selection reads: `rounds` or the QA sample size must not re-select.
        settings=SETTINGS.active_learning.selection(),
        seed=config["seed"],
        label_store=config["label_store"],
    script:
        "../scripts/select_batch.py"


rule export_review:
    input:
        selection=LAYOUT.selection("{round}"),
    output:
        manifest=LAYOUT.review_manifest("{round}"),
    log:
        LAYOUT.job("active_learning", "{round}", part="export").log,
    benchmark:
        LAYOUT.job("active_learning", "{round}", part="export").benchmark
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
        model=lambda wc: LAYOUT.model(int(wc.round) - 1),
        label_store=config["label_store"],
    script:
        "../scripts/export_review.py"


# The simulated annotator's labels, read in full before any round needs one: no input and the
# highest priority, so it is among the first jobs of a run, and a bad oracle label (value 4, a
# text file) stops the run then, not in round 1 after hours of preprocessing and training.
rule check_oracle:
    output:
        table=LAYOUT.oracle_check,
    log:
        LAYOUT.job("active_learning", part="check_oracle").log,
    benchmark:
        LAYOUT.job("active_learning", part="check_oracle").benchmark
    priority: 100
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        oracle_sheet=config.get("oracle_sheet", ""),
    script:
        "../scripts/check_oracle.py"


rule collect_annotations:
    input:
        unpack(
            lambda wc: (
                {"oracle": LAYOUT.oracle_check}
                if SETTINGS.active_learning.annotator == "simulated"
                else {}
            )
        ),
        selection=LAYOUT.selection("{round}"),
        review=LAYOUT.review_manifest("{round}"),
    output:
        annotations=LAYOUT.annotations("{round}"),
    log:
        LAYOUT.job("active_learning", "{round}", part="annotations").log,
    benchmark:
        LAYOUT.job("active_learning", "{round}", part="annotations").benchmark
    wildcard_constraints:
        round=r"[1-9]\d*",
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        settings=SETTINGS.active_learning.annotation(),
        oracle_sheet=config.get("oracle_sheet", ""),
        label_store=config["label_store"],
        studies=lambda wc: [study_record(s) for s in COHORT.studies],
        model=lambda wc: LAYOUT.model(int(wc.round) - 1),
    script:
        "../scripts/collect_annotations.py"


# Measured, not required: training does not wait for it, and a rerun of it never retrains.
rule correction_burden:
    input:
        annotations=LAYOUT.annotations("{round}"),
        review=LAYOUT.review_manifest("{round}"),
    output:
        table=LAYOUT.burden("{round}"),
    log:
        LAYOUT.job("active_learning", "{round}", part="correction_burden").log,
    benchmark:
        LAYOUT.job("active_learning", "{round}", part="correction_burden").benchmark
    wildcard_constraints:
        round=r"[1-9]\d*",
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        label_store=config["label_store"],
    script:
        "../scripts/correction_burden.py"


rule final_labels:
    input:
        unpack(final_label_inputs),
    output:
        labels=LAYOUT.final_labels,
        qa_sample=LAYOUT.qa_sample,
    log:
        LAYOUT.job("active_learning", part="final_labels").log,
    benchmark:
        LAYOUT.job("active_learning", part="final_labels").benchmark
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        final_round=FINAL_ROUND,
        sample_size=SETTINGS.active_learning.final_validation_sample,
        seed=config["seed"],
        label_store=config["label_store"],
    script:
        "../scripts/final_labels.py"


rule export_final_qa:
    input:
        selection=LAYOUT.qa_sample,
        model=LAYOUT.model(FINAL_ROUND),
    output:
        manifest=LAYOUT.final_review_manifest,
    log:
        LAYOUT.job("active_learning", part="export_final_qa").log,
    benchmark:
        LAYOUT.job("active_learning", part="export_final_qa").benchmark
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        round_index=FINAL_ROUND,
        studies=lambda wc: [study_record(s) for s in COHORT.studies],
    script:
        "../scripts/export_final_qa.py"


# round_0 .. round_R: named targets, one per round (see the header).
for _r in ROUNDS:

    rule:
        name:
            f"round_{_r}"
        input:
            lambda wc, r=_r: round_target_inputs(r),
        localrule: True
