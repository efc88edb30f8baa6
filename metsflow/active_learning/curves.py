"""Learning curves of acquisition strategies: validation metric vs number of labelled studies."""

from __future__ import annotations

import os

import pandas as pd

from metsflow.evaluation.figures import _new_figure, _require, _save

CURVE_COLUMNS = ["strategy", "round", "n_labelled", "mean_dice", "mean_lesion_f1"]


def plot_learning_curves(
    curves: pd.DataFrame, out_png: str | os.PathLike, metric: str = "mean_dice"
) -> None:
    """One line per strategy: ``metric`` of the round's model against its labelled studies.

    ``curves`` has one row per (strategy, round) with at least ``strategy``, ``n_labelled`` and
    ``metric``; strategies share round 0 (the seed model), so their lines start together.
    """
    _require(curves, ["strategy", "n_labelled", metric], "learning-curve")
    if curves.empty:
        raise ValueError("no learning-curve rows to plot")
    fig = _new_figure(6, 4)
    ax = fig.add_subplot()
    for strategy, rows in curves.groupby("strategy", sort=True):
        rows = rows.sort_values("n_labelled")
        ax.plot(rows["n_labelled"], rows[metric], marker="o", label=str(strategy))
    ax.set_xlabel("labelled training studies")
    ax.set_ylabel(f"validation {metric.removeprefix('mean_').replace('_', ' ')}")
    ax.set_title("active learning: acquisition strategies, same seed and budget")
    ax.legend(loc="best")
    _save(fig, out_png)
