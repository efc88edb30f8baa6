# The validated sheet with each study's role and shards, and the cohort-wide QC table.


localrules:
    plan_cohort,
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


rule quarantine:
    input:
        unpack(lambda wc: shard_manifests(PLAN["shard"])),
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
