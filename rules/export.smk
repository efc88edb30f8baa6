# Exports of the final labels (part of the last round's target, rules/active_learning_common.smk):
# a BIDS derivative dataset (export.bids_dir, default results/bids) and, for studies imported
# from DICOM (`metsflow cohort import-dicom`), DICOM SEG objects in results/dicom_seg/.
# One job each over every final label; a study that fails is a manifest row, not a job failure.
# Per study (benchmarks/bench_export.py, 176 x 256 x 256): DICOM SEG 1.06 CPU s, BIDS dseg
# 0.14 s, so 11,892 studies are ~3.5 h and ~0.5 h (+ one label propagation per follow-up for
# the lesion tracking): one job each, with runtimes to match.

EXPORT = config.get("export") or {}
BIDS_ROOT = EXPORT.get("bids_dir") or f"{RESULTS}/bids"
DICOM_SEG_ROOT = f"{RESULTS}/dicom_seg"
EXPORT_OUTPUTS = []
if EXPORT.get("bids", True):
    EXPORT_OUTPUTS.append(f"{RESULTS}/final/bids_export.tsv")
if EXPORT.get("dicom_seg", True):
    EXPORT_OUTPUTS.append(f"{DICOM_SEG_ROOT}/manifest.tsv")


rule export_bids:
    input:
        labels=f"{RESULTS}/final/labels.tsv",
        plan=PLAN_TABLE,
        registered=[REGISTER_TABLE],
        preprocessed=[PREPROCESS_TABLE],
    output:
        manifest=f"{RESULTS}/final/bids_export.tsv",
        description=f"{BIDS_ROOT}/dataset_description.json",
    log:
        f"{RESULTS}/logs/export/bids.log",
    benchmark:
        f"{RESULTS}/benchmarks/export/bids.tsv"
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
        settings=config["evaluate"].get("response", {}),
        model_round=FINAL_ROUND,
        prep_root=lambda wc, input: stage_root(input.preprocessed[0]),
        reg_root=lambda wc, input: stage_root(input.registered[0]),
        out_root=lambda wc, output: os.path.dirname(output.description),
    script:
        "../scripts/export_bids.py"


rule export_dicom_seg:
    input:
        labels=f"{RESULTS}/final/labels.tsv",
        plan=PLAN_TABLE,
    output:
        manifest=f"{DICOM_SEG_ROOT}/manifest.tsv",
    log:
        f"{RESULTS}/logs/export/dicom_seg.log",
    benchmark:
        f"{RESULTS}/benchmarks/export/dicom_seg.tsv"
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
        out_root=lambda wc, output: os.path.dirname(output.manifest),
    script:
        "../scripts/export_dicom_seg.py"
