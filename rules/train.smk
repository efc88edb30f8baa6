# Round 0 trains on the labelled seed set; round r fine-tunes round r-1 on the seed set plus every
# human-confirmed label of rounds 1..r. With train.folds = k > 1, stage 1 is k patient-level fold
# models (fold 0 is model.pt, so the rest of the workflow is unchanged), ensembled at inference.
# train.stage2.enabled adds the cascade's candidate classifier, train.reseg.enabled the
# re-segmentation model for follow-ups.
rule train_round:
    input:
        unpack(train_inputs),
    output:
        model=LAYOUT.model("{round}"),
        train_log=LAYOUT.train_log("{round}"),
        summary=LAYOUT.train_summary("{round}"),
    log:
        LAYOUT.job("train", "{round}").log,
    benchmark:
        LAYOUT.job("train", "{round}").benchmark
    conda:
        "../envs/torch.yaml"
    threads: SETTINGS.threads.train
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=1,
    params:
        model=SETTINGS.model.as_dict(),
        # Each job gets the training keys it reads: a stage-2 or re-seg setting must not
        # retrain stage 1 (nor the other way round).
        train=train_settings(drop=("stage2", "reseg")),
        spacing=list(SETTINGS.preprocess.spacing),
        seed=config["seed"],
        # 0 for train_round (no fold wildcard), f for train_fold.
        fold=lambda wc: int(wc.get("fold", 0)),
        folds=TRAIN_FOLDS,
    script:
        "../scripts/train_round.py"


# Fold f > 0 of stage 1: train_round's job with fold f's files (fold 0 is train_round itself).
use rule train_round as train_fold with:
    input:
        unpack(fold_train_inputs),
    output:
        model=LAYOUT.model("{round}", "{fold}"),
        train_log=LAYOUT.train_log("{round}", "{fold}"),
        summary=LAYOUT.train_summary("{round}", "{fold}"),
    log:
        LAYOUT.job("train", "{round}", part=fold_part("{fold}")).log,
    benchmark:
        LAYOUT.job("train", "{round}", part=fold_part("{fold}")).benchmark
    wildcard_constraints:
        fold=r"[1-9]\d*",


rule train_stage2:
    input:
        unpack(stage2_train_inputs),
    output:
        model=LAYOUT.stage2_model("{round}"),
        summary=LAYOUT.stage2_summary("{round}"),
    log:
        LAYOUT.job("train", "{round}", part=STAGE2_PART).log,
    benchmark:
        LAYOUT.job("train", "{round}", part=STAGE2_PART).benchmark
    conda:
        "../envs/torch.yaml"
    threads: SETTINGS.threads.train
    resources:
        mem_mb=16000,
        runtime=120,
        gpu=1,
    params:
        train=train_settings(keep=("stage2",)),
        infer=SETTINGS.infer.as_dict(),
        seed=config["seed"],
    script:
        "../scripts/train_stage2.py"


rule train_reseg:
    input:
        unpack(reseg_train_inputs),
    output:
        model=LAYOUT.reseg_model("{round}"),
        train_log=LAYOUT.reseg_train_log("{round}"),
    log:
        LAYOUT.job("train", "{round}", part=RESEG_PART).log,
    benchmark:
        LAYOUT.job("train", "{round}", part=RESEG_PART).benchmark
    conda:
        "../envs/torch.yaml"
    threads: SETTINGS.threads.train
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=1,
    params:
        model=SETTINGS.model.as_dict(),
        train=train_settings(drop=("stage2",)),
        spacing=list(SETTINGS.preprocess.spacing),
        seed=config["seed"],
    script:
        "../scripts/train_reseg.py"


# `snakemake pretrain`: preprocess the labelled studies of the pretrain sheet (config
# pretrain.sheet, e.g. BraTS-METS read by `metsflow cohort scan`) and train stage 1 on them;
# round 0 then fine-tunes from this model. Its studies are in no plan (not pool, not validation).
rule pretrain:
    input:
        unpack(pretrain_inputs),
    output:
        model=LAYOUT.pretrain_model,
        manifest=LAYOUT.pretrain_manifest,
    log:
        LAYOUT.job("pretrain").log,
    benchmark:
        # a one-off job, not a round's: metsflow cost leaves it out (costmodel._costed)
        LAYOUT.job("pretrain").benchmark
    conda:
        "../envs/torch.yaml"
    threads: SETTINGS.threads.train
    resources:
        mem_mb=16000,
        runtime=480,
        gpu=1,
    params:
        studies=pretrain_records,
        preprocess=SETTINGS.preprocess.as_dict(),
        model=SETTINGS.model.as_dict(),
        train=train_settings(drop=("stage2", "reseg", "init_checkpoint")),
        spacing=list(SETTINGS.preprocess.spacing),
        seed=config["seed"],
        iterations=PRETRAIN.get("iterations", config["train"].get("iterations", 1000)),
    script:
        "../scripts/pretrain.py"
