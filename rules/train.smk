# Round 0 trains on the labelled seed set; round r fine-tunes round r-1 on the seed set plus every
# human-confirmed label of rounds 1..r.


rule train_round:
    input:
        unpack(train_inputs),
    output:
        model=f"{RESULTS}/rounds/round_{{round}}/model/model.pt",
        train_log=f"{RESULTS}/rounds/round_{{round}}/model/train_log.tsv",
        summary=f"{RESULTS}/rounds/round_{{round}}/model/train_summary.json",
    log:
        f"{RESULTS}/logs/train/round_{{round}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/round_{{round}}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]["train"]
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=1,
    params:
        model=config["model"],
        train=config["train"],
        spacing=config["preprocess"]["spacing"],
        prep_root=f"{RESULTS}/preprocessed",
        reg_root=f"{RESULTS}/registered",
        label_store=config["label_store"],
        seed=config["seed"],
    script:
        "../scripts/train_round.py"
