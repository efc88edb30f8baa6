# Inference per GPU shard: the models load once per job and segment the shard's validation and
# pool studies (with active_learning.candidates, a round's candidate subset: ROUND_INFER_SHARDS in
# rules/common.smk); outputs go back to the native T1c grid. Fold models, stage 2 and the
# re-segmentation model join in when the train config enables them (rules/train.smk).


rule infer_shard:
    input:
        unpack(cascade_infer_inputs),
    output:
        manifest=LAYOUT.prediction_manifest("{round}", "{gpu_shard}"),
    log:
        LAYOUT.job("infer", "{round}", "{gpu_shard}").log,
    benchmark:
        LAYOUT.job("infer", "{round}", "{gpu_shard}").benchmark
    conda:
        "../envs/torch.yaml"
    threads: SETTINGS.threads.infer
    resources:
        mem_mb=16000,
        runtime=lambda wc: 10 + len(infer_rows(wc)),
        gpu=1,
    params:
        studies=gpu_shard_records,
        settings=SETTINGS.infer.as_dict(),
        # Reused when this round kept the previous round's models (stop criterion reached).
        previous=previous_round_predictions,
    script:
        "../scripts/infer_shard.py"
