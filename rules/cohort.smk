# The validated sheet with each study's role and shards, and the cohort-wide QC table.


localrules:
    plan_cohort,
    gather_manifests,
    quarantine,


rule plan_cohort:
    input:
        sheet=config["sheet"],
    output:
        plan=LAYOUT.plan,
    log:
        LAYOUT.job("plan_cohort").log,
    benchmark:
        LAYOUT.job("plan_cohort").benchmark
    conda:
        "../envs/imaging.yaml"
    params:
        # The plan the DAG was built from (rules/common.smk), written as is. Snakemake hashes a
        # DataFrame param's content, and the settings and sheet digest that determine it are
        # params too, so a change of any of them reruns this job.
        plan=PLAN,
        settings=dataclasses.asdict(PLAN_SETTINGS),
        sheet_sha256=SHEET_SHA256,
    script:
        "../scripts/plan_cohort.py"


rule gather_manifests:
    input:
        unpack(lambda wc: shard_manifests(PLAN["shard"])),
    output:
        preprocessed=LAYOUT.stage_manifest("preprocessed"),
        registered=LAYOUT.stage_manifest("registered"),
    log:
        LAYOUT.job("gather_manifests").log,
    benchmark:
        LAYOUT.job("gather_manifests").benchmark
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
        table=LAYOUT.quarantine,
    log:
        LAYOUT.job("quarantine").log,
    benchmark:
        LAYOUT.job("quarantine").benchmark
    conda:
        "../envs/imaging.yaml"
    script:
        "../scripts/quarantine.py"
