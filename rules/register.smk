# Longitudinal registration: each follow-up to its previous time point (ANTs affine + SyN, CC,
# brain-masked); the previous labels are propagated as the follow-up's prior.


rule register_shard:
    input:
        preprocessed=f"{RESULTS}/preprocessed/shards/{{shard}}.tsv",
    output:
        manifest=f"{RESULTS}/registered/shards/{{shard}}.tsv",
    log:
        f"{RESULTS}/logs/register/{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/register/{{shard}}.tsv"
    conda:
        "../envs/imaging.yaml"
    threads: config["threads"]["register"]
    resources:
        mem_mb=6000,
        runtime=lambda wc: 10 + 2 * len(STUDIES_BY_SHARD[wc.shard]),
    params:
        studies=lambda wc: STUDIES_BY_SHARD[wc.shard].to_dict("records"),
        settings=config["register"],
        prep_root=lambda wc, input: stage_root(input.preprocessed),
        out_root=lambda wc, output: stage_root(output.manifest),
    script:
        "../scripts/register_shard.py"
