"""Active-learning rounds with people, run the way users do: `snakemake round_<r>` + the CLI.

One tiny phantom pipeline in human mode: round 1 stops waiting for labels (and its dry run plans
no training), the batch is refined by a trainee then confirmed by a neuroradiologist through
`metsflow al import`, the round continues to the final labels and QA export, and neither a
re-import nor a rerun can overwrite the confirmed label. A copy of round 0 with a Dice threshold
of 0.0 shows the stop criterion (an empty batch, the previous model kept).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from _dry_run import dry_run_job_counts as job_counts
from conftest import REPO, run_snakemake

PROFILE = ["--profile", "profiles/local", "--cores", "2"]
ROUND0_STATE = ("plan", "preprocessed", "registered", "qc", "rounds/round_0")


def metsflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "metsflow.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pool_fixture(tmp_path):
    """A plan of 6 pool studies, one failed inference, and a store with one confirmed label."""
    from metsflow.active_learning.labelstore import LabelStore
    from metsflow.jobs.manifest import write_manifest

    ids = [f"P{i:03d}_T0" for i in range(6)]
    plan = pd.DataFrame({"study_id": ids, "patient_id": [s[:4] for s in ids], "role": "pool"})
    plan.loc[len(plan)] = ["V000_T0", "V000", "validation"]
    plan.to_csv(tmp_path / "plan.tsv", sep="\t", index=False)
    rows = [
        {"study_id": s, "patient_id": s[:4], "role": "pool", "status": "ok", "problem": ""}
        for s in ids
    ]
    rows[-1].update(status="failed", problem="model crashed")
    write_manifest(tmp_path / "g0000.tsv", rows, extra_columns=["role"])
    reference = tmp_path / "t1c.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), reference)
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), label)
    store = LabelStore(tmp_path / "labels")
    store.import_label(ids[0], label, "confirmed", "neurorad", reference_image=reference)
    return ids, reference, label


def _final_labels(tmp_path, seed: int, tag: str, sample_size: int = 2):
    from metsflow.core.layout import Layout
    from metsflow.jobs.active_learning import FinalLabelInputs, run_final_labels

    labels = run_final_labels(
        Layout(tmp_path / "results"),
        FinalLabelInputs(
            final_round=3,
            plan=str(tmp_path / "plan.tsv"),
            prediction_manifests=[str(tmp_path / "g0000.tsv")],
            label_store=str(tmp_path / "labels"),
            sample_size=sample_size,
            seed=seed,
        ),
    )
    sample = pd.read_csv(Layout(tmp_path / "results").qa_sample, sep="\t", dtype=str)
    return labels, sample


def test_final_labels_keep_human_labels_and_sample_model_labels_reproducibly(tmp_path):
    from metsflow.core.layout import Layout

    ids, _, _ = _pool_fixture(tmp_path)
    labels, sample = _final_labels(tmp_path, seed=0, tag="a")
    source = labels.set_index("study_id")["source"]
    assert source[ids[0]] == "human_confirmed" and source[ids[-1]] == "failed"
    assert set(source[ids[1:-1]]) == {"model"} and "V000_T0" not in source
    assert labels.set_index("study_id").at[ids[1], "label"] == str(
        Layout(tmp_path / "results").study_prediction(3, ids[1])
    )
    assert len(sample) == 2 and set(sample.study_id) <= set(ids[1:-1])
    assert set(sample.strategy) == {"final_qa_random"}
    _, same = _final_labels(tmp_path, seed=0, tag="b")
    assert list(same.study_id) == list(sample.study_id)
    others = {tuple(_final_labels(tmp_path, seed=s, tag=f"s{s}")[1].study_id) for s in range(1, 8)}
    assert len(others | {tuple(sample.study_id)}) > 1, "the seed must drive the QA sample"
    _, everything = _final_labels(tmp_path, seed=0, tag="big", sample_size=50)
    assert sorted(everything.study_id) == ids[1:-1]


def test_unconfirmed_studies_reads_the_store(tmp_path):
    from metsflow.active_learning.labelstore import unconfirmed_studies

    ids, _, _ = _pool_fixture(tmp_path)
    pd.DataFrame({"study_id": ids[:3]}).to_csv(tmp_path / "sel.tsv", sep="\t", index=False)
    assert unconfirmed_studies(str(tmp_path / "sel.tsv"), str(tmp_path / "labels")) == ids[1:3]
    assert unconfirmed_studies(str(tmp_path / "sel.tsv"), str(tmp_path / "nothing")) == ids[:3]


def test_cli_override_is_explicit_and_versioned(tmp_path):
    ids, reference, label = _pool_fixture(tmp_path)
    sheet = tmp_path / "studies.tsv"
    pd.DataFrame(
        {"study_id": ids, "patient_id": [s[:4] for s in ids], "timepoint": 0, "t1c": str(reference)}
    ).to_csv(sheet, sep="\t", index=False)
    base = ["al", "override", "--study", ids[0], "--label", str(label), "--reviewer", "chief"]
    paths = ["--sheet", str(sheet), "--labels", str(tmp_path / "labels")]
    refused = metsflow(*base, "--reason", "  ", *paths)
    assert refused.returncode == 2 and "requires a reason" in refused.stderr
    unknown = metsflow(*base[:2], "--study", "X9_T0", *base[4:], "--reason", "r", *paths)
    assert unknown.returncode == 2 and "X9_T0" in unknown.stderr
    done = metsflow(*base, "--reason", "missed lesion", *paths)
    assert done.returncode == 0, done.stderr
    history = [json.loads(x) for x in (tmp_path / "labels" / ids[0] / "history.jsonl").open()]
    assert [(h["version"], h["override"]) for h in history] == [(1, False), (2, True)]
    assert history[-1]["reason"] == "missed lesion"


def test_learning_curve_plot(tmp_path):
    from metsflow.active_learning.curves import plot_learning_curves

    curves = pd.DataFrame(
        {
            "strategy": ["random"] * 3 + ["lesion_aware"] * 3,
            "n_labelled": [4, 6, 8] * 2,
            "mean_dice": [0.5, 0.6, 0.65, 0.5, 0.62, 0.64],
        }
    )
    plot_learning_curves(curves, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="mean_lesion_f1"):
        plot_learning_curves(curves, tmp_path / "x.png", metric="mean_lesion_f1")


@pytest.mark.slow
def test_human_round_waits_for_confirmation_then_continues(tmp_path, tiny_config):
    from metsflow.cohort.phantom import make_demo_cohort

    demo = tmp_path / "demo"
    # One time point per patient (no longitudinal registration) and skull-free, co-registered
    # phantoms (no atlas mask, no rigid co-registration): this test is about the rounds.
    make_demo_cohort(
        demo,
        n_patients=5,
        n_timepoints=1,
        native_spacing=(2.0, 2.0, 4.0),
        model_spacing=4.0,
        labelled_patients=3,
        skull=False,
        separate_grids=False,
        seed=0,
    )
    # One CPU shard for the 5 studies (the tiny config's 4 made a shard of 4 and one of 1): a
    # shard job is a Python start plus imports, 4-4.5 CPU s, and a register shard of baselines
    # does nothing else.
    cheap = {
        "preprocess": {"spacing": [4.0, 4.0, 4.0], "coregister": "none", "brain_mask": "nonzero"},
        "sharding": {"cpu_shard_size": 8},
    }
    config = tiny_config(
        demo, **cheap, active_learning={"annotator": "human", "final_validation_sample": 1}
    )
    results, labels = tmp_path / "results", tmp_path / "labels"
    cli_paths = ["--sheet", str(demo / "studies.tsv"), "--results", str(results)]
    cli_paths += ["--labels", str(labels)]

    # Round 1 stops before training: its batch is selected and exported, nobody confirmed it.
    waiting = run_snakemake(["round_1", *PROFILE, "--configfile", str(config)], check=False)
    assert waiting.returncode != 0
    selection = pd.read_csv(results / "rounds/round_1/selection.tsv", sep="\t", dtype=str)
    (study,) = selection.study_id
    log = waiting.stdout + waiting.stderr
    assert f"not confirmed yet: {study}" in log and "metsflow al import --round 1" in log
    assert (results / "rounds/round_1/review/manifest.csv").exists()
    assert not (results / "rounds/round_1/model").exists()

    def planned_jobs(*target: str) -> dict[str, int]:
        dry = run_snakemake([*(target or ["round_1"]), "-n", "--configfile", str(config)])
        return job_counts(dry.stdout)

    assert "train_round" not in planned_jobs()
    # The default target stops at the same batch: no training, no report past it.
    default_plan = planned_jobs("all")
    assert "train_round" not in default_plan and "report_rounds" not in default_plan

    # A correction on the wrong grid is rejected, naming the study and the problem.
    corrected = results / "rounds/round_1/review" / study / "segmentation.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), corrected)
    rejected = metsflow(
        "al", "import", "--round", "1", "--stage", "refined", "--reviewer", "trainee", *cli_paths
    )
    assert rejected.returncode == 1
    assert "rejected" in rejected.stdout and "grid mismatch" in rejected.stdout
    assert not (labels / study).exists() or not list((labels / study).glob("v*.nii.gz"))

    # The trainee refines the pre-segmentation (here: the ground truth); still not trainable.
    oracle = pd.read_csv(demo / "oracle.tsv", sep="\t", dtype=str).set_index("study_id")
    shutil.copyfile(demo / oracle.at[study, "label"], corrected)
    refined = metsflow(
        "al", "import", "--round", "1", "--stage", "refined", "--reviewer", "trainee", *cli_paths
    )
    assert refined.returncode == 0, refined.stderr
    assert "imported" in refined.stdout
    assert "train_round" not in planned_jobs()

    confirmed = metsflow(
        "al", "import", "--round", "1", "--stage", "confirmed", "--reviewer", "neurorad", *cli_paths
    )
    assert confirmed.returncode == 0, confirmed.stderr
    assert planned_jobs()["train_round"] == 1

    run_snakemake(["round_1", *PROFILE, "--configfile", str(config)])
    summaries = [
        json.loads((results / f"rounds/round_{r}/evaluation/summary.json").read_text())
        for r in (0, 1)
    ]
    assert summaries[1]["n_train"] == summaries[0]["n_train"] + 1
    history = [json.loads(line) for line in (labels / study / "history.jsonl").open()]
    assert [(h["stage"], h["reviewer"]) for h in history] == [
        ("refined", "trainee"),
        ("confirmed", "neurorad"),
    ]
    assert "round_0/model/model.pt" in history[0]["source"]  # what pre-segmented it
    final = pd.read_csv(results / "final/labels.tsv", sep="\t", dtype=str)
    assert final.set_index("study_id").at[study, "source"] == "human_confirmed"
    assert set(final.source) <= {"human_confirmed", "model", "failed"}
    qa = pd.read_csv(results / "final/qa_review/manifest.csv", dtype=str)
    assert len(qa) == 1 and qa.study_id[0] in set(final.loc[final.source == "model", "study_id"])

    # A confirmed label is never overwritten: not by a re-import, not by a rerun.
    (label_file,) = (labels / study).glob("v*_confirmed.nii.gz")
    before = sha256(label_file)
    again = metsflow(
        "al", "import", "--round", "1", "--stage", "confirmed", "--reviewer", "other", *cli_paths
    )
    assert "already_confirmed" in again.stdout
    rerun = run_snakemake(["round_1", *PROFILE, "--configfile", str(config)])
    assert "Nothing to be done" in rerun.stdout + rerun.stderr
    assert sha256(label_file) == before
    assert sorted(p.name for p in (labels / study).glob("v*.nii.gz")) == [
        "v001_refined.nii.gz",
        "v002_confirmed.nii.gz",
    ]

    status = metsflow("al", "status", "--results", str(results), "--labels", str(labels))
    assert status.returncode == 0, status.stderr
    round1 = next(line for line in status.stdout.splitlines() if line.split()[:1] == ["1"])
    assert f"{summaries[1]['mean_dice']:.3f}" in round1

    # Stop criterion, from the same round 0: Dice >= 0.0 always holds -> an empty batch, nothing
    # to review, and round 1 keeps the round 0 model.
    stopped = tmp_path / "stopped"
    for part in ROUND0_STATE:
        if (results / part).exists():
            shutil.copytree(results / part, stopped / part)
    # Without the BIDS and DICOM SEG exports, which the run above made from the same kind of
    # final labels: 2 jobs, 5.8 CPU s.
    stop_config = tiny_config(
        demo,
        results=str(stopped),
        label_store=str(tmp_path / "labels_stop"),
        **cheap,
        active_learning={"annotator": "human", "dice_threshold": 0.0, "final_validation_sample": 1},
        export={"bids": False, "dicom_seg": False},
    )
    run_snakemake(["round_1", *PROFILE, "--configfile", str(stop_config)])
    assert len(pd.read_csv(stopped / "rounds/round_1/selection.tsv", sep="\t")) == 0
    assert sha256(stopped / "rounds/round_1/model/model.pt") == sha256(
        stopped / "rounds/round_0/model/model.pt"
    )
    # The kept model's predictions are reused, not recomputed, for every predicted study.
    infer_logs = "".join(p.read_text() for p in (stopped / "logs/infer/round_1").glob("*.log"))
    assert "reusing" in infer_logs
    round0 = sorted((stopped / "rounds/round_0/predictions").glob("*/pred_native.nii.gz"))
    assert round0
    for path in round0:
        again = stopped / "rounds/round_1/predictions" / path.parent.name / path.name
        assert sha256(again) == sha256(path)
    final = pd.read_csv(stopped / "final/labels.tsv", sep="\t", dtype=str)
    assert "human_confirmed" not in set(final.source)
