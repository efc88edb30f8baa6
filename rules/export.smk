# Exports of the final labels (part of the last round's target, rules/active_learning_common.smk):
# a BIDS derivative dataset (export.bids_dir, default results/bids) and, for studies imported
# from DICOM (`metsflow cohort import-dicom`), DICOM SEG objects in results/dicom_seg/.
# One job each over every final label; a study that fails is a manifest row, not a job failure.
# Per study (benchmarks/bench_export.py, 176 x 256 x 256): DICOM SEG 1.06 CPU s, BIDS dseg
# 0.14 s, so 11,892 studies are ~3.5 h and ~0.5 h (+ one label propagation per follow-up for
# the lesion tracking): one job each, with runtimes to match.

BIDS_ROOT = LAYOUT.bids_root(SETTINGS.export.bids_dir)
EXPORT_OUTPUTS = []
if SETTINGS.export.bids:
    EXPORT_OUTPUTS.append(LAYOUT.final("bids_export.tsv"))
if SETTINGS.export.dicom_seg:
    EXPORT_OUTPUTS.append(LAYOUT.dicom_seg_manifest)


rule export_bids:
    input:
        labels=LAYOUT.final_labels,
        plan=LAYOUT.plan,
        registered=[LAYOUT.stage_manifest("registered")],
        preprocessed=[LAYOUT.stage_manifest("preprocessed")],
    output:
        manifest=LAYOUT.final("bids_export.tsv"),
        description=f"{BIDS_ROOT}/dataset_description.json",
    log:
        LAYOUT.job("export", part="bids").log,
    benchmark:
        LAYOUT.job("export", part="bids").benchmark
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=720,
    params:
        # the final labels are those of the pool studies
        studies=lambda wc: [
            study_record(COHORT.by_id[s]) for s in PLAN[PLAN.role == "pool"].study_id
        ],
        settings=SETTINGS.evaluate.response,
        model_round=FINAL_ROUND,
    script:
        "../scripts/export_bids.py"


rule export_dicom_seg:
    input:
        labels=LAYOUT.final_labels,
        plan=LAYOUT.plan,
    output:
        manifest=LAYOUT.dicom_seg_manifest,
    log:
        LAYOUT.job("export", part="dicom_seg").log,
    benchmark:
        LAYOUT.job("export", part="dicom_seg").benchmark
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=480,
    params:
        # the final labels are those of the pool studies
        studies=lambda wc: [
            study_record(COHORT.by_id[s]) for s in PLAN[PLAN.role == "pool"].study_id
        ],
        model_round=FINAL_ROUND,
    script:
        "../scripts/export_dicom_seg.py"
