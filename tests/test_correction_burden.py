"""Correction burden: the edit from the model's pre-segmentation to the confirmed label, per
study and per round, in the pipeline's table, `metsflow al status` and the report figure."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from metsflow.active_learning.annotator import simulate_batch
from metsflow.active_learning.burden import (
    BURDEN_COLUMNS,
    BURDEN_NAME,
    file_burden,
    label_burden,
    read_burden_tables,
    review_provenance,
    summarise_rounds,
)
from metsflow.active_learning.labelstore import LabelStore
from metsflow.active_learning.status import round_status
from metsflow.cli import main
from metsflow.core import io
from metsflow.core.layout import PRESEGMENTATION_NAME
from metsflow.jobs.active_learning import run_correction_burden

SHAPE = (40, 40, 40)
SPACING = (2.0, 2.0, 2.0)  # 8 mm^3 per voxel
AFFINE = np.diag([*SPACING, 1.0])


def _masks() -> tuple[np.ndarray, np.ndarray]:
    """A pre-segmentation and its correction whose burden is known exactly:
    lesion A kept (one voxel relabelled enhancing -> necrosis), lesion B deleted (27 voxels),
    lesion C grown from 4^3 to 5^3 (+61 voxels), lesion D added (27 voxels of necrosis), and an
    edema slab painted (32 voxels)."""
    pre = np.zeros(SHAPE, np.uint8)
    pre[5:9, 5:9, 5:9] = 1  # A
    pre[20:23, 20:23, 20:23] = 1  # B
    pre[30:34, 30:34, 30:34] = 1  # C
    confirmed = pre.copy()
    confirmed[6, 6, 6] = 3
    confirmed[20:23, 20:23, 20:23] = 0
    confirmed[30:35, 30:35, 30:35] = 1
    confirmed[5:8, 30:33, 5:8] = 3  # D
    confirmed[12:14, 5:9, 5:9] = 2
    return pre, confirmed


def test_hand_built_edit_is_counted_exactly():
    pre, confirmed = _masks()
    burden = label_burden(pre, confirmed, voxel_mm3=8.0)
    assert burden["voxels_changed"] == 1 + 27 + 61 + 27 + 32
    assert burden["changed_enhancing"] == 1 + 27 + 61
    assert burden["changed_necrosis"] == 1 + 27
    assert burden["changed_edema"] == 32
    assert burden["changed_ml"] == pytest.approx(148 * 8 / 1000)
    # Core (enhancing + necrosis): 155 voxels before, 216 after.
    assert burden["lesion_volume_delta_ml"] == pytest.approx(61 * 8 / 1000)
    assert (burden["lesions_pre"], burden["lesions_confirmed"]) == (3, 3)
    assert burden["lesions_added"] == 1  # D
    assert burden["lesions_removed"] == 1  # B
    assert burden["lesions_resized"] == 1  # C: +95% of its volume; A unchanged in volume
    assert burden["lesion_edits"] == 3


def test_identical_label_has_zero_burden_and_small_changes_are_not_resizes():
    pre, _ = _masks()
    zero = label_burden(pre, pre.copy(), voxel_mm3=8.0)
    counts = ("lesions_pre", "lesions_confirmed")
    assert all(value == 0 for key, value in zero.items() if key not in counts)
    assert (zero["lesions_pre"], zero["lesions_confirmed"]) == (3, 3)
    touched = pre.copy()
    touched[34, 30:34, 30] = 1  # C: 64 -> 68 voxels (+6%, under the 20% threshold)
    burden = label_burden(pre, touched, voxel_mm3=8.0)
    assert burden["voxels_changed"] == 4 and burden["lesion_edits"] == 0
    assert label_burden(pre, touched, 8.0, resize_threshold=0.05)["lesions_resized"] == 1


def test_file_burden_reads_nifti_and_refuses_another_grid(tmp_path):
    pre, confirmed = _masks()
    io.save_nifti(tmp_path / "pre.nii.gz", pre, AFFINE, dtype=np.uint8)
    io.save_nifti(tmp_path / "label.nii.gz", confirmed.astype(np.float32), AFFINE)
    burden = file_burden(tmp_path / "pre.nii.gz", tmp_path / "label.nii.gz", "S1")
    assert burden == label_burden(pre, confirmed, voxel_mm3=8.0)
    shifted = AFFINE.copy()
    shifted[0, 3] = 2.0
    io.save_nifti(tmp_path / "moved.nii.gz", confirmed, shifted, dtype=np.uint8)
    with pytest.raises(io.StudyError, match="S1.*affine differs"):
        file_burden(tmp_path / "pre.nii.gz", tmp_path / "moved.nii.gz", "S1")


def test_review_time_and_channel_come_from_the_history():
    history = [
        {"version": 1, "stage": "refined", "file": "v001_refined.nii.gz", "reviewer": "tr",
         "via": "web", "review_seconds": 100.5},
        {"version": 2, "stage": "confirmed", "file": "v002_confirmed.nii.gz", "reviewer": "nr",
         "via": "web", "review_seconds": 40},
        # A later override is not part of the label the round trained on.
        {"version": 3, "stage": "confirmed", "file": "v003_confirmed.nii.gz", "reviewer": "adm",
         "via": "files", "review_seconds": 999},
    ]  # fmt: skip
    info = review_provenance(history, "/labels/S1/v002_confirmed.nii.gz")
    assert info == {
        "via": "web",
        "reviewer": "nr",
        "confirmed_version": 2,
        "review_seconds": pytest.approx(140.5),
    }
    # History written before `via` / `review_seconds` existed: the channel from the reviewer.
    old = [{"version": 2, "file": "v002_confirmed.nii.gz", "reviewer": "sim-neuroradiologist"}]
    info = review_provenance(old, "v002_confirmed.nii.gz")
    assert info["via"] == "simulated" and math.isnan(info["review_seconds"])
    old[0]["reviewer"] = "Dr X"
    assert review_provenance(old, "v002_confirmed.nii.gz")["via"] == "files"


def test_round_summary_is_median_and_iqr_of_the_studies_without_problems():
    per_study = pd.DataFrame(
        {
            "round": [1, 1, 1, 1, 2, 2],
            "study_id": ["a", "b", "c", "d", "e", "f"],
            "voxels_changed": [0, 10, 30, None, 4, 6],
            "changed_ml": [0.0, 0.1, 0.3, None, 0.04, 0.06],
            "lesions_added": [0, 1, 2, None, 0, 0],
            "lesions_removed": [0, 0, 0, None, 0, 1],
            "lesions_resized": [0, 0, 1, None, 0, 0],
            "lesion_edits": [0, 1, 3, None, 0, 1],
            "review_seconds": [60.0, None, 120.0, None, None, None],
            "problem": ["", "", "", "pre-segmentation file is missing", "", ""],
        }
    )
    summary = summarise_rounds(per_study).set_index("round")
    assert summary.loc[1, "n_studies"] == 3 and summary.loc[1, "n_timed"] == 2
    assert summary.loc[1, ["voxels_changed_median", "voxels_changed_q1", "voxels_changed_q3"]]\
        .tolist() == [10, 5, 20]  # fmt: skip
    assert summary.loc[1, "lesion_edits_median"] == 1
    assert summary.loc[1, "review_seconds_median"] == 90
    assert summary.loc[2, "voxels_changed_median"] == 5 and summary.loc[2, "n_timed"] == 0
    assert math.isnan(summary.loc[2, "review_seconds_median"])


@pytest.fixture
def confirmed_round(tmp_path):
    """Round 1 of a results folder: a review package with pre-segmentations and labels
    confirmed by the simulated annotator (S1 unchanged, S2 = the hand-built correction, S3
    with a lost pre-segmentation)."""
    pre, confirmed = _masks()
    results, review = tmp_path / "results", tmp_path / "results/rounds/round_1/review"
    truth = {"S1": pre, "S2": confirmed, "S3": pre}
    oracle, references = {}, {}
    for study_id, label in truth.items():
        references[study_id] = tmp_path / f"{study_id}_t1c.nii.gz"
        io.save_nifti(references[study_id], np.ones(SHAPE, np.float32), AFFINE)
        oracle[study_id] = tmp_path / f"{study_id}_truth.nii.gz"
        io.save_nifti(oracle[study_id], label, AFFINE, dtype=np.uint8)
        if study_id != "S3":
            io.save_nifti(review / study_id / PRESEGMENTATION_NAME, pre, AFFINE, dtype=np.uint8)
    io.write_text(review / "manifest.csv", "study_id\n")
    store = LabelStore(tmp_path / "labels")
    simulate_batch(list(truth), oracle, store, 1, references)
    annotations = pd.DataFrame(
        [{"study_id": s, "status": "confirmed", "label": str(store.confirmed(s))} for s in truth]
    )
    io.write_table(results / "rounds/round_1/annotations.tsv", annotations)
    selection = pd.DataFrame({"study_id": list(truth), "strategy": "entropy"})
    io.write_table(results / "rounds/round_1/selection.tsv", selection)
    io.write_json(
        results / "rounds/round_0/evaluation/summary.json",
        {"round": 0, "mean_dice": 0.5, "n_train": 4},
    )
    return results, store


def _measure_round_1(results, store):
    """The correction_burden job of round 1 of ``confirmed_round``; its table's path."""
    out = results / "rounds/round_1" / BURDEN_NAME
    run_correction_burden(
        1,
        str(results / "rounds/round_1/annotations.tsv"),
        str(results / "rounds/round_1/review"),
        str(store.root),
        str(out),
    )
    return out


def test_pipeline_step_writes_per_study_table(confirmed_round):
    results, store = confirmed_round
    out = _measure_round_1(results, store)
    table = read_burden_tables([out])
    assert list(table.columns) == BURDEN_COLUMNS
    table = table.set_index("study_id")
    assert table.loc["S1", "voxels_changed"] == 0 and table.loc["S1", "lesion_edits"] == 0
    assert table.loc["S2", "voxels_changed"] == 148
    assert table.loc["S2", ["lesions_added", "lesions_removed", "lesions_resized"]].tolist() == [
        1,
        1,
        1,
    ]
    assert (table.loc["S2", "via"], table.loc["S2", "reviewer"]) == (
        "simulated",
        "sim-neuroradiologist",
    )
    assert table.loc["S2", "confirmed_version"] == 2
    assert math.isnan(table.loc["S2", "review_seconds"])
    # One study's missing file is named; the others are still measured.
    assert "S3" in table.loc["S3", "problem"] and "missing" in table.loc["S3", "problem"]
    assert math.isnan(table.loc["S3", "voxels_changed"])


def _status(results, store, capsys) -> str:
    """`metsflow al status` as a user runs it."""
    assert main(["al", "status", "--results", str(results), "--labels", str(store.root)]) == 0
    return capsys.readouterr().out


def test_status_shows_the_burden_next_to_the_review_time(confirmed_round, capsys):
    results, store = confirmed_round
    text = _status(results, store, capsys)
    assert "correction burden: not measured yet" in text
    assert text.splitlines()[3] == "total: 3 studies selected, 3 confirmed, 0 awaiting review"

    out = _measure_round_1(results, store)
    frame = round_status(results, store).set_index("round")
    assert frame.loc[1, "n_studies"] == 2  # S3 has no pre-segmentation to compare with
    assert frame.loc[1, "voxels_changed_median"] == 74  # median of 0 and 148
    assert pd.isna(frame.loc[0, "n_studies"])
    lines = _status(results, store, capsys).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("round  studies"))
    assert lines[header].split() == [
        "round",
        "studies",
        "voxels_changed",
        "changed_ml",
        "lesions_added",
        "lesions_removed",
        "lesions_resized",
        "review_s",
        "timed",
    ]
    assert lines[header + 1].split() == [
        "1",
        "2",
        "74",
        "[37-111]",
        "0.59",
        "[0.30-0.89]",
        "0.5",
        "[0.2-0.8]",
        "0.5",
        "[0.2-0.8]",
        "0.5",
        "[0.2-0.8]",
        "n/a",
        "0",
    ]

    # A web save's review time in the history is picked up (field written by the web server).
    history = store.study_dir("S2") / "history.jsonl"
    records = [json.loads(line) for line in history.read_text().splitlines()]
    for record in records:
        record.update(review_seconds=30, via="web")
    history.chmod(0o644)
    history.write_text("".join(json.dumps(r) + "\n" for r in records))
    _measure_round_1(results, store)
    frame = round_status(results, store).set_index("round")
    assert frame.loc[1, "review_seconds_median"] == 60 and frame.loc[1, "n_timed"] == 1
    assert read_burden_tables([out]).set_index("study_id").loc["S2", "via"] == "web"


def test_report_figure_and_table(tmp_path, confirmed_round):
    from metsflow.evaluation.figures import plot_correction_burden

    results, store = confirmed_round
    out = _measure_round_1(results, store)
    plot_correction_burden(read_burden_tables([out]), tmp_path / "burden.png")
    assert (tmp_path / "burden.png").stat().st_size > 5_000
    # No confirmed batch yet (round 0 only): the figure says so instead of failing.
    plot_correction_burden(read_burden_tables([]), tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 1_000


def test_report_rounds_table_and_figure(tmp_path, confirmed_round):
    """The report's rounds section: burden medians next to each round's Dice, a per-round
    table (an empty batch after the stop criterion is a round with 0 studies) and the figure."""
    from metsflow.jobs.report import RoundsReport, run_report_rounds

    results, store = confirmed_round
    rounds_dir = results / "rounds"
    _measure_round_1(results, store)
    io.write_table(rounds_dir / "round_2" / BURDEN_NAME, pd.DataFrame(columns=BURDEN_COLUMNS))
    io.write_table(rounds_dir / "round_2/selection.tsv", pd.DataFrame(columns=["study_id"]))
    summaries, per_study = [], []
    for r in range(3):
        summaries.append(rounds_dir / f"round_{r}/evaluation/summary.json")
        io.write_json(summaries[-1], {"round": r, "mean_dice": 0.5 + r / 10, "n_train": 4 + r})
        per_study.append(rounds_dir / f"round_{r}/evaluation/per_study.tsv")
        rows = pd.DataFrame(
            {"round": r, "study_id": ["V1", "V2"], "group": "whole_lesion", "dice": [0.4, 0.6]}
        )
        io.write_table(per_study[-1], rows)
    plan = pd.DataFrame(
        {
            "study_id": ["S1", "V1"],
            "patient_id": ["P1", "P2"],
            "role": ["pool", "validation"],
            "shard": "s0",
            "gpu_shard": "g0",
        }
    )
    io.write_table(tmp_path / "plan.tsv", plan)
    io.write_table(tmp_path / "quarantine.tsv", pd.DataFrame(columns=["study_id"]))
    report = tmp_path / "report"
    table = run_report_rounds(
        RoundsReport(
            plan_path=str(tmp_path / "plan.tsv"),
            quarantine_path=str(tmp_path / "quarantine.tsv"),
            summaries=[str(p) for p in summaries],
            per_study=[str(p) for p in per_study],
            selections=[str(rounds_dir / f"round_{r}/selection.tsv") for r in (1, 2)],
            burdens=[str(rounds_dir / f"round_{r}" / BURDEN_NAME) for r in (1, 2)],
            out_table=str(report / "rounds.tsv"),
            out_plot=str(report / "dice_per_round.png"),
            out_cohort=str(report / "cohort_summary.tsv"),
            out_burden=str(report / "correction_burden.tsv"),
            out_burden_plot=str(report / "correction_burden_per_round.png"),
            label_store=str(store.root),
            out_suggestions=str(report / "suggestions_by_size_bin.tsv"),
        )
    ).set_index("round")
    assert table.loc[1, "burden_studies"] == 2 and table.loc[1, "voxels_changed_median"] == 74
    assert table.loc[2, "burden_studies"] == 0 and pd.isna(table.loc[0, "burden_studies"])
    per_round = pd.read_csv(report / "correction_burden.tsv", sep="\t").set_index("round")
    assert per_round["n_studies"].to_dict() == {1: 2, 2: 0}
    assert per_round.loc[1, "lesion_edits_q3"] == pytest.approx(2.25)  # of 0 and 3
    assert (report / "correction_burden_per_round.png").stat().st_size > 5_000
    # The simulated annotator decides no possible lesion: the table has its columns, no row.
    suggestions = pd.read_csv(report / "suggestions_by_size_bin.tsv", sep="\t")
    assert suggestions.empty and "accept_rate" in suggestions.columns


def test_empty_batch_after_the_stop_criterion(tmp_path, capsys):
    """A round whose batch is empty (Dice threshold reached) has a header-only table and shows
    as a round with 0 studies."""
    results = tmp_path / "results"
    io.write_table(
        results / "rounds/round_1/annotations.tsv",
        pd.DataFrame(columns=["study_id", "status", "label"]),
    )
    io.write_table(results / "rounds/round_1/selection.tsv", pd.DataFrame(columns=["study_id"]))
    out = results / "rounds/round_1" / BURDEN_NAME
    store = LabelStore(tmp_path / "labels")
    run_correction_burden(
        1, str(results / "rounds/round_1/annotations.tsv"), str(tmp_path), str(store.root), str(out)
    )
    assert out.read_text().split() == BURDEN_COLUMNS
    assert round_status(results, store).set_index("round").loc[1, "n_studies"] == 0
    lines = _status(results, store, capsys).splitlines()
    assert lines[-1].split() == ["1", "0", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "0"]
