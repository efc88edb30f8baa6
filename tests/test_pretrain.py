"""Round 0 from a pretrained model (issue #23): ``train.init_checkpoint`` is checked when the
workflow is parsed, and round 0 fine-tunes from it."""

from __future__ import annotations

import pytest
from _tiny_models import make_prep_study, tiny_params
from conftest import make_tiny_cohort, run_snakemake, write_tiny_config

from metsflow.models import train
from metsflow.models.networks import (
    build_network,
    checkpoint_meta,
    init_checkpoint_problems,
    read_checkpoint,
    save_checkpoint,
)


def write_model(path, **overrides):
    params = tiny_params(**overrides)
    save_checkpoint(path, build_network(params), checkpoint_meta(params))
    return path


def test_matching_checkpoint_has_no_problem(tmp_path):
    path = write_model(tmp_path / "pre.pt")
    model = {k: tiny_params()[k] for k in ("channels", "label_mode", "patch_size", "filters")}
    assert init_checkpoint_problems(path, model) == []


def test_mismatches_are_listed_together_naming_the_file(tmp_path):
    path = write_model(tmp_path / "pre.pt", channels=["t1c"], patch_size=[16, 16, 16])
    found = init_checkpoint_problems(
        path, {"channels": ["t1c", "flair"], "label_mode": "whole", "patch_size": [32, 32, 32]}
    )
    assert len(found) == 3
    assert all(str(path) in line for line in found)
    assert [line.split(": its ")[1].split(" ")[0] for line in found] == [
        "channels",
        "label_mode",
        "patch_size",
    ]


def test_missing_or_foreign_file_is_one_problem(tmp_path):
    model = {"channels": ["t1c"], "patch_size": [16, 16, 16]}
    assert len(init_checkpoint_problems(tmp_path / "none.pt", model)) == 1
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    (line,) = init_checkpoint_problems(tmp_path / "junk.pt", model)
    assert "not a metsflow checkpoint" in line


def test_round0_finetunes_from_the_pretrained_weights(tmp_path):
    studies = [make_prep_study(tmp_path, f"S{i}", seed=i) for i in range(2)]
    params = tiny_params(
        patch_size=[16, 16, 16], optimizer="adam", iterations=2, val_interval=0, seed=0
    )
    pre = write_model(tmp_path / "pre.pt", patch_size=[16, 16, 16])
    params0 = train.training_params(params, {"init_checkpoint": str(pre)}, [1, 1, 1], 0, 0)
    assert params0.train.iterations == 2  # round 0 keeps its own budget
    assert params0.train.init_checkpoint == str(pre)
    train.train_model(studies, [], params0, tmp_path / "m.pt", init_checkpoint=pre, device="cpu")
    meta = read_checkpoint(tmp_path / "m.pt")["meta"]
    assert meta["finetuned_from"]["path"] == str(pre)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One cohort for this file's dry runs (they read its sheet; nothing writes into it),
    skull-free on one grid: the cheapest phantom that makes a valid sheet (5.5 CPU-s each with
    the skull and separate grids, once per test before)."""
    demo = tmp_path_factory.mktemp("pretrain") / "demo"
    make_tiny_cohort(demo, n_patients=3, labelled_patients=2, skull=False, separate_grids=False)
    return demo


@pytest.mark.slow
def test_workflow_refuses_a_mismatched_init_checkpoint_at_parse_time(tmp_path, demo):
    bad = write_model(tmp_path / "bad.pt", channels=["t1c"], patch_size=[16, 16, 16])
    config = write_tiny_config(tmp_path, demo, train={"init_checkpoint": str(bad)})
    proc = run_snakemake(["-n", "--configfile", str(config)], check=False)
    assert proc.returncode == 1
    assert "train.init_checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert "patch_size" in proc.stderr and "channels" in proc.stderr


def _pretrain_sheet(demo, out):
    """The demo sheet's labelled studies under other ids (a second, disjoint study sheet)."""
    import pandas as pd

    sheet = pd.read_csv(demo / "studies.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet = sheet[sheet.label != ""].copy()
    for column in ("t1", "t1c", "t2", "flair", "label"):
        sheet[column] = [str((demo / p).resolve()) if p else "" for p in sheet[column]]
    sheet["study_id"] = "pre-" + sheet["study_id"]
    sheet["patient_id"] = "pre-" + sheet["patient_id"]
    sheet.to_csv(out, sep="\t", index=False)
    return out


@pytest.mark.slow
def test_pretrain_target_feeds_round0_and_its_sheet_is_checked(tmp_path, demo):
    from _dry_run import dry_run_job_counts

    # Beside the cohort folder: a sheet's data root is its own folder (sheets are untrusted).
    sheet = _pretrain_sheet(demo, demo.parent / "pretrain.tsv")
    config = write_tiny_config(tmp_path, demo, pretrain={"sheet": str(sheet), "iterations": 4})
    round0 = tmp_path / "results" / "rounds" / "round_0" / "model" / "model.pt"
    proc = run_snakemake([str(round0), "-n", "--configfile", str(config)])
    counts = dry_run_job_counts(proc.stdout)
    assert counts.get("pretrain") == 1 and counts.get("train_round") == 1
    assert "pretrain/model.pt" in proc.stdout.split("rule train_round:", 1)[1].split("output:")[0]
    # The cohort's own sheet as the pretrain sheet: its studies would be seen in training.
    config = write_tiny_config(
        tmp_path, demo, name="bad.yaml", pretrain={"sheet": str(demo / "studies.tsv")}
    )
    proc = run_snakemake(["-n", "--configfile", str(config)], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "also in the cohort sheet" in proc.stderr
