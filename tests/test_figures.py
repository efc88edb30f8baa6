"""Figures are written as complete PNG files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from metsflow.evaluation import figures, metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 2000
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp


@pytest.fixture(scope="module")
def per_study():
    rng = np.random.default_rng(0)
    rows = []
    for rnd in range(3):
        for i in range(8):
            for group in ("whole_lesion", "edema"):
                rows.append(
                    {
                        "round": rnd,
                        "study_id": f"s{i}",
                        "group": group,
                        "dice": float(np.clip(0.6 + 0.1 * rnd + rng.normal(0, 0.05), 0, 1)),
                        "ndsc": np.nan,  # no rate given: the panel is skipped
                        "hd95": float(rng.uniform(1, 20)),
                        "lesion_f1": float(rng.uniform(0.5, 1)),
                    }
                )
    return pd.DataFrame(rows)


def test_metric_by_round_from_per_study_rows_and_from_a_summary(tmp_path, per_study):
    figures.plot_metric_by_round(per_study, tmp_path / "a" / "rounds.png")
    assert_png(tmp_path / "a" / "rounds.png")
    summary = metrics.summarise(per_study, by=("round", "group"))
    figures.plot_metric_by_round(summary, tmp_path / "b" / "rounds.png", metric="hd95")
    assert_png(tmp_path / "b" / "rounds.png")
    with pytest.raises(ValueError, match="no rows"):
        figures.plot_metric_by_round(per_study, tmp_path / "c.png", group="necrosis")


def test_metric_distributions(tmp_path, per_study):
    figures.plot_metric_distributions(per_study[per_study["round"] == 2], tmp_path / "d.png")
    assert_png(tmp_path / "d.png")


def test_volume_vs_dice(tmp_path):
    rng = np.random.default_rng(1)
    volume = rng.lognormal(4, 1.5, 40)
    lesions = pd.DataFrame(
        {
            "group": "whole_lesion",
            "volume_mm3": volume,
            "dice": np.clip(np.log(volume) / 10 + rng.normal(0, 0.1, 40), 0, 1),
            "detected": volume > 20,
        }
    )
    figures.plot_volume_vs_dice(lesions, tmp_path / "v.png")
    assert_png(tmp_path / "v.png")


def test_volume_trajectories(tmp_path):
    rows = [
        {"patient_id": f"p{p}", "order": t, "source": src, "enhancing_volume_mm3": 100.0 * p + t}
        for p in range(4)
        for t in range(3)
        for src in ("prediction", "reference")
    ]
    figures.plot_volume_trajectories(pd.DataFrame(rows), tmp_path / "t.png")
    assert_png(tmp_path / "t.png")


def test_overlay_png(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.normal(0, 1, (48, 48, 24))
    ref = np.zeros(image.shape, np.uint8)
    ref[10:20, 10:20, 5:15] = 1
    ref[30:33, 30:33, 2:4] = 3  # a smaller lesion elsewhere
    pred = np.roll(ref, 2, axis=0)
    assert figures._overlay_slices(pred > 0, ref > 0, 3) == [7, 10, 12]
    figures.overlay_png(image, pred, ref, tmp_path / "o.png", spacing=(1, 1, 2))
    assert_png(tmp_path / "o.png")
    # empty reference and prediction still give a figure (central slices)
    figures.overlay_png(image, 0 * ref, 0 * ref, tmp_path / "empty.png", n_slices=2)
    assert_png(tmp_path / "empty.png")
