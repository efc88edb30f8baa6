# Inference per GPU shard: the model loads once per job and segments every validation and pool
# study of the shard; outputs go back to the native T1c grid.


rule infer_shard:
    input:
        unpack(infer_inputs),
    output:
        manifest=f"{RESULTS}/rounds/round_{{round}}/predictions/shards/{{gpu_shard}}.tsv",
    log:
        f"{RESULTS}/logs/infer/round_{{round}}/{{gpu_shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/infer/round_{{round}}/{{gpu_shard}}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]["infer"]
    resources:
        mem_mb=16000,
        runtime=lambda wc: 10 + len(STUDIES_BY_GPU_SHARD[wc.gpu_shard]),
        gpu=1,
    params:
        studies=gpu_shard_records,
        settings=config["infer"],
        prep_root=f"{RESULTS}/preprocessed",
        reg_root=f"{RESULTS}/registered",
        out_root=lambda wc: f"{RESULTS}/rounds/round_{wc.round}/predictions",
    script:
        "../scripts/infer_shard.py"
