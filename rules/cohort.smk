# The validated sheet with each study's role and shards, and the cohort-wide QC table.


localrules:
    plan_cohort,
    gather_manifests,
    quarantine,


rule plan_cohort:
    input:
        sheet=config["sheet"],
    output:
        plan=f"{RESULTS}/plan/cohort.tsv",
    log:
        f"{RESULTS}/logs/plan_cohort.log",
    benchmark:
        f"{RESULTS}/benchmarks/plan_cohort.tsv"
    conda:
        "../envs/imaging.yaml"
    script:
        "../scripts/plan_cohort.py"


rule gather_manifests:
    input:
        unpack(lambda wc: shard_manifests(PLAN["shard"])),
    output:
        preprocessed=PREPROCESS_TABLE,
        registered=REGISTER_TABLE,
    log:
        f"{RESULTS}/logs/gather_manifests.log",
    benchmark:
        f"{RESULTS}/benchmarks/gather_manifests.tsv"
    conda:
        "../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/gather_manifests.py"


rule quarantine:
    input:
        unpack(lambda wc: cohort_manifests()),
    output:
        table=f"{RESULTS}/qc/quarantine.tsv",
    log:
        f"{RESULTS}/logs/quarantine.log",
    benchmark:
        f"{RESULTS}/benchmarks/quarantine.tsv"
    conda:
        "../envs/imaging.yaml"
    script:
        "../scripts/quarantine.py"
