"""Report figures (PNG) for evaluation results.

Figures are drawn with matplotlib's object API on an Agg canvas (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``) rather than ``pyplot``: no display is needed on cluster nodes, no global
backend is switched for other code in the process, and no figure leaks between calls. Every
PNG is written through ``metsflow.core.io.atomic_path``.

Input tables are those of ``metsflow.evaluation.metrics``: per-study rows from ``flatten`` (study_id,
group, metric columns), per-lesion rows from ``lesion_table``, summaries from ``summarise``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cc3d
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from metsflow.core import io, labels
from metsflow.evaluation.metrics import spearman_volume_vs_dice, summarise

DPI = 150
REF_COLOUR = "#00c000"  # reference contour: green
PRED_COLOUR = "#ff2020"  # prediction contour: red
DEFAULT_DISTRIBUTION_METRICS = ("dice", "ndsc", "hd95", "lesion_f1")


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_png: str | os.PathLike) -> None:
    with io.atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} table lacks columns {missing} (has {list(df.columns)})")


def plot_metric_by_round(
    df: pd.DataFrame,
    out_png: str | os.PathLike,
    metric: str = "dice",
    group: str = "whole_lesion",
) -> None:
    """Metric per active-learning round: per-study points and the mean with its 95% CI.

    ``df`` is either per-study rows with columns ``round``, ``study_id``, ``group`` and
    ``metric`` (points are drawn for each study, the line joins the round means, error bars are
    the t-CI), or a per-round summary (``summarise(..., by=("round", "group"))`` output: columns
    ``round``, ``group``, ``metric``, ``mean`` and optionally ``ci95_low``/``ci95_high``),
    for which only the line and error bars are drawn.
    """
    _require(df, ["round", "group"], "metric-by-round")
    df = df[df["group"] == group]
    if "study_id" in df.columns:
        _require(df, [metric], "per-study")
        summary = summarise(df[["round", "group", metric]], by=("round", "group"))
        points = df[["round", metric]].dropna()
    else:
        _require(df, ["metric", "mean"], "per-round summary")
        summary = df[df["metric"] == metric]
        points = None
    if summary.empty:
        raise ValueError(f"no rows for metric {metric!r} and group {group!r}")
    summary = summary.sort_values("round")
    fig = _new_figure(6, 4)
    ax = fig.add_subplot()
    if points is not None:
        jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(points))
        ax.scatter(points["round"] + jitter, points[metric], s=10, alpha=0.35, color="grey")
    x, mean = summary["round"].to_numpy(), summary["mean"].to_numpy()
    if {"ci95_low", "ci95_high"} <= set(summary.columns):
        err = np.vstack([mean - summary["ci95_low"], summary["ci95_high"] - mean])
        ax.errorbar(x, mean, yerr=np.nan_to_num(err), marker="o", capsize=4, label="mean, 95% CI")
    else:
        ax.plot(x, mean, marker="o", label="mean")
    ax.set_xticks(x)
    ax.set_xlabel("active-learning round")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} ({group}) by round")
    ax.legend(loc="best")
    _save(fig, out_png)


def plot_correction_burden(per_study: pd.DataFrame, out_png: str | os.PathLike) -> None:
    """Correction burden per active-learning round: one panel per figure (changed volume in ml,
    lesion edits, and review seconds when any study has one), every study as a point and the
    median with its interquartile range.

    ``per_study`` is a ``burden.BURDEN_COLUMNS`` table of any number of rounds (studies with a
    ``problem`` are left out). With no study yet, the figure says so instead of failing.
    """
    _require(per_study, ["round", "changed_ml", "lesion_edits", "review_seconds"], "burden")
    if "problem" in per_study.columns:
        per_study = per_study[per_study["problem"].fillna("").astype(str) == ""]
    panels = [("changed_ml", "changed volume (ml)"), ("lesion_edits", "lesions +/-/resized")]
    if pd.to_numeric(per_study["review_seconds"], errors="coerce").notna().any():
        panels.append(("review_seconds", "review time (s)"))
    fig = _new_figure(3.6 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    rng = np.random.default_rng(0)
    rounds = sorted(pd.to_numeric(per_study["round"], errors="coerce").dropna().unique())
    for ax, (metric, label) in zip(axes, panels, strict=True):
        data = per_study[["round", metric]].apply(pd.to_numeric, errors="coerce").dropna()
        if data.empty:
            ax.text(0.5, 0.5, "no confirmed batch yet", ha="center", va="center")
        else:
            jitter = rng.uniform(-0.12, 0.12, len(data))
            ax.scatter(data["round"] + jitter, data[metric], s=10, alpha=0.35, color="grey")
            stats = data.groupby("round")[metric].quantile([0.25, 0.5, 0.75]).unstack()
            x, median = stats.index.to_numpy(), stats[0.5].to_numpy()
            err = np.vstack([median - stats[0.25], stats[0.75] - median])
            ax.errorbar(x, median, yerr=err, marker="o", capsize=4, label="median, IQR")
            ax.set_xticks(rounds)
            ax.set_xlim(rounds[0] - 0.5, rounds[-1] + 0.5)  # the same rounds on every panel
            ax.legend(loc="best")
        ax.set_xlabel("active-learning round")
        ax.set_ylabel(label)
    fig.suptitle("correction burden: confirmed label vs the model's pre-segmentation")
    _save(fig, out_png)


def plot_metric_distributions(
    per_study: pd.DataFrame,
    out_png: str | os.PathLike,
    metrics: Sequence[str] = DEFAULT_DISTRIBUTION_METRICS,
    groups: Sequence[str] | None = None,
) -> None:
    """Box plots of per-study metrics, one panel per metric, one box per group.

    Metrics missing from the table or entirely NaN (e.g. ``ndsc`` without a rate) are skipped.
    """
    _require(per_study, ["group"], "per-study")
    groups = list(groups) if groups is not None else list(dict.fromkeys(per_study["group"]))
    metrics = [m for m in metrics if m in per_study.columns and per_study[m].notna().any()] or None
    if metrics is None:
        raise ValueError("none of the requested metrics has values in the per-study table")
    fig = _new_figure(3.2 * len(metrics), 4)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        data = [per_study.loc[per_study["group"] == g, metric].dropna().to_numpy() for g in groups]
        ax.boxplot(data, showmeans=True)
        # tick labels set separately: boxplot's keyword changed name in matplotlib 3.9
        ax.set_xticks(range(1, len(groups) + 1), groups)
        ax.set_title(metric)
        ax.tick_params(axis="x", labelrotation=45)
    fig.suptitle(f"per-study metrics (n = {per_study['study_id'].nunique()} studies)")
    _save(fig, out_png)


def plot_volume_vs_dice(
    lesions_df: pd.DataFrame,
    out_png: str | os.PathLike,
    group: str | None = "whole_lesion",
    value: str = "dice",
) -> None:
    """Per-lesion ``value`` against reference lesion volume (log x), Spearman rho in the title.

    ``lesions_df`` is a ``lesion_table`` (any number of studies); missed lesions are drawn in a
    different colour. ``group`` None uses all rows.
    """
    _require(lesions_df, ["volume_mm3", value, "detected", "group"], "per-lesion")
    df = lesions_df if group is None else lesions_df[lesions_df["group"] == group]
    corr = spearman_volume_vs_dice(df, value=value)
    fig = _new_figure(6, 4.5)
    ax = fig.add_subplot()
    detected = df["detected"].astype(bool)
    ax.scatter(df.loc[detected, "volume_mm3"], df.loc[detected, value], s=14, label="detected")
    ax.scatter(
        df.loc[~detected, "volume_mm3"], df.loc[~detected, value], s=14, marker="x", label="missed"
    )
    ax.set_xscale("log")
    ax.set_xlabel("reference lesion volume (mm$^3$)")
    ax.set_ylabel(f"lesion {value}")
    title = f"{value} vs volume ({group or 'all groups'}): Spearman rho = {corr['rho']:.2f}"
    title += f", p = {corr['p']:.2g}, n = {corr['n']}"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    _save(fig, out_png)


def plot_volume_trajectories(
    traj_df: pd.DataFrame,
    out_png: str | os.PathLike,
    volume_col: str = "enhancing_volume_mm3",
    max_patients: int = 40,
) -> None:
    """Per-patient enhancing volume over time points (one line per patient).

    ``traj_df`` columns: ``patient_id``, ``order`` (0-based time point index, as in
    ``metsflow.cohort.sheet``), ``volume_col``; an optional ``source`` column (e.g. "prediction" /
    "reference") is drawn with solid / dashed lines of the patient's colour. Only the first
    ``max_patients`` patients (sorted) are drawn so the plot stays readable.
    """
    _require(traj_df, ["patient_id", "order", volume_col], "trajectory")
    patients = sorted(traj_df["patient_id"].unique())[:max_patients]
    sources = list(dict.fromkeys(traj_df["source"])) if "source" in traj_df.columns else [None]
    styles = ["-", "--", ":", "-."]
    colours = _colours(len(patients))
    fig = _new_figure(7, 4.5)
    ax = fig.add_subplot()
    for colour, patient in zip(colours, patients, strict=True):
        rows = traj_df[traj_df["patient_id"] == patient]
        for style, source in zip(styles, sources, strict=False):
            part = rows if source is None else rows[rows["source"] == source]
            part = part.sort_values("order")
            ax.plot(part["order"], part[volume_col], style, marker="o", ms=3, color=colour)
    ax.set_xlabel("time point (order within patient)")
    ax.set_ylabel(volume_col.replace("_mm3", " (mm$^3$)"))
    ax.set_title(f"{volume_col} trajectories ({len(patients)} patients)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if sources != [None]:
        handles = [
            Line2D([], [], color="black", linestyle=s, label=str(src))
            for s, src in zip(styles, sources, strict=False)
        ]
        ax.legend(handles=handles, loc="best")
    _save(fig, out_png)


def _colours(n: int) -> list:
    cmap = colormaps["tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _overlay_slices(pred: np.ndarray, ref: np.ndarray, n_slices: int) -> list[int]:
    """Axial (last-axis) slices through the largest reference lesion (prediction if none)."""
    source = ref if ref.any() else pred
    if not source.any():
        return sorted({int(round(k)) for k in np.linspace(0, ref.shape[2] - 1, n_slices + 2)[1:-1]})
    components = cc3d.largest_k(source, k=1, connectivity=labels.CONNECTIVITY)
    ks = np.flatnonzero(components.any(axis=(0, 1)))
    chosen = np.linspace(ks[0], ks[-1], n_slices + 2)[1:-1] if len(ks) > n_slices else ks
    return sorted({int(round(k)) for k in chosen})


def overlay_png(
    image: np.ndarray,
    pred: np.ndarray,
    ref: np.ndarray,
    out_png: str | os.PathLike,
    n_slices: int = 3,
    spacing: Sequence[float] | None = None,
    title: str | None = None,
) -> None:
    """Axial slices through the largest lesion with reference and prediction contours.

    ``image`` is a 3D intensity array (e.g. the preprocessed T1c, RAS so the last axis is
    inferior-superior); ``pred`` and ``ref`` are label maps on the same grid, drawn as the
    outline of all non-zero labels (any lesion tissue). Slices are spread over the largest
    reference lesion's extent (the largest predicted lesion when the reference is empty).
    ``spacing`` sets the in-plane aspect ratio; ``title`` (e.g. study and Dice) heads the figure.
    """
    image = np.asarray(image, dtype=float)
    pred = np.asarray(pred) > 0
    ref = np.asarray(ref) > 0
    if not image.shape == pred.shape == ref.shape or image.ndim != 3:
        raise ValueError(
            f"image, prediction and reference must be 3D of one shape, got {image.shape}, "
            f"{pred.shape}, {ref.shape}"
        )
    slices = _overlay_slices(pred, ref, n_slices)
    low, high = np.percentile(image, [1, 99])
    aspect = 1.0 if spacing is None else float(spacing[1]) / float(spacing[0])
    fig = _new_figure(3.2 * len(slices), 3.6)
    axes = fig.subplots(1, len(slices), squeeze=False)[0]
    for ax, k in zip(axes, slices, strict=True):
        # Transposed with the origin at the bottom: first axis left-right, second bottom-top.
        ax.imshow(image[:, :, k].T, cmap="gray", origin="lower", vmin=low, vmax=high, aspect=aspect)
        for mask, colour in ((ref, REF_COLOUR), (pred, PRED_COLOUR)):
            if mask[:, :, k].any():
                ax.contour(
                    mask[:, :, k].T.astype(float), levels=[0.5], colors=colour, linewidths=1.0
                )
        ax.set_title(f"axial slice {k}")
        ax.set_axis_off()
    handles = [
        Line2D([], [], color=REF_COLOUR, label="reference"),
        Line2D([], [], color=PRED_COLOUR, label="prediction"),
    ]
    axes[-1].legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.7)
    if title:
        fig.suptitle(title)
    _save(fig, out_png)


def plot_froc(
    curves: dict[str, pd.DataFrame],
    out_png: str | os.PathLike,
    points: dict[str, tuple[float, float]] | None = None,
    title: str = "FROC",
    max_fp_per_patient: float | None = None,
) -> None:
    """FROC curves: lesion sensitivity against false positives per patient, one line per label.

    ``curves``: label -> ``metsflow.evaluation.metrics.froc`` table (``fp_per_patient``, ``sensitivity``;
    an empty table draws nothing, its label says so). ``points``: label -> ``(fp_per_patient,
    sensitivity)`` of an operating point, drawn as a marker. ``max_fp_per_patient`` draws the
    clinical FP limit as a vertical line.
    """
    fig = _new_figure(6, 4.5)
    ax = fig.add_subplot()
    colours = [colormaps["tab10"](i % 10) for i in range(max(len(curves), 1))]
    widest = 1.0
    for colour, (label, curve) in zip(colours, curves.items(), strict=False):
        if curve.empty:
            ax.plot([], [], color=colour, label=f"{label} (no candidates)")
            continue
        _require(curve, ["fp_per_patient", "sensitivity"], "FROC")
        curve = curve.sort_values(["fp_per_patient", "sensitivity"])
        # Step from the origin (nothing kept) through every threshold.
        fp = np.concatenate([[0.0], curve["fp_per_patient"].to_numpy(dtype=float)])
        sens = np.concatenate([[0.0], curve["sensitivity"].to_numpy(dtype=float)])
        ax.step(fp, sens, where="post", color=colour, label=label)
        widest = max(widest, float(np.nanmax(fp)))
    for marker, (label, (fp, sens)) in zip("osD^v", (points or {}).items(), strict=False):
        ax.plot([fp], [sens], marker=marker, color="black", linestyle="none", label=label)
    if max_fp_per_patient is not None:
        ax.axvline(max_fp_per_patient, color="grey", linestyle=":", label="FP/patient limit")
    # Linear up to 1 FP/patient (where clinical operating points lie), logarithmic beyond: a
    # stage-1 output can have tens of false positives per patient.
    ax.set_xscale("symlog", linthresh=1.0)
    ticks = [t for t in (0, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256) if t <= widest * 1.05]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlim(0, widest * 1.05)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per patient")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    _save(fig, out_png)
