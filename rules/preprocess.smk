# Per-study preprocessing, batched by CPU shard (whole patients): reorient, co-register to T1c,
# resample, brain mask, z-score, crop; every output keeps the transforms back to native space.


rule preprocess_shard:
    input:
        images=shard_raw_inputs,
    output:
        manifest=LAYOUT.shard_manifest("preprocessed", "{shard}"),
    log:
        LAYOUT.job("preprocess", shard="{shard}").log,
    benchmark:
        LAYOUT.job("preprocess", shard="{shard}").benchmark
    conda:
        "../envs/imaging.yaml"
    threads: SETTINGS.threads.preprocess
    resources:
        mem_mb=6000,
        runtime=lambda wc: 10 + 3 * len(STUDIES_BY_SHARD[wc.shard]),
    params:
        studies=shard_records,
        settings=SETTINGS.preprocess.as_dict(),
    script:
        "../scripts/preprocess_shard.py"
