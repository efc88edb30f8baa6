# Longitudinal registration: each follow-up to its previous time point (ANTs affine + SyN, CC,
# brain-masked); the previous labels are propagated as the follow-up's prior.


rule register_shard:
    input:
        preprocessed=LAYOUT.shard_manifest("preprocessed", "{shard}"),
    output:
        manifest=LAYOUT.shard_manifest("registered", "{shard}"),
    log:
        LAYOUT.job("register", shard="{shard}").log,
    benchmark:
        LAYOUT.job("register", shard="{shard}").benchmark
    conda:
        "../envs/imaging.yaml"
    threads: SETTINGS.threads.register
    resources:
        mem_mb=6000,
        runtime=lambda wc: 10 + 2 * len(STUDIES_BY_SHARD[wc.shard]),
    params:
        studies=lambda wc: STUDIES_BY_SHARD[wc.shard].to_dict("records"),
        settings=SETTINGS.register.as_dict(),
    script:
        "../scripts/register_shard.py"
