"""Paired comparison of two models (or active-learning rounds) evaluated on the same studies.

All tests come from ``scipy.stats``. The differences are ``a - b``; ``alternative="greater"``
tests whether ``a`` is larger (the usual question "is the new model's Dice higher?"); for
metrics where lower is better (``metsflow.evaluation.metrics.LOWER_IS_BETTER``, e.g. HD95) ``compare_tables``
uses ``"less"`` unless told otherwise.

- Paired t-test (``ttest_rel``) and the t confidence interval of the mean difference assume
  roughly normal differences: Shapiro-Wilk on the differences is reported to judge that.
- Wilcoxon signed-rank (``wilcoxon``) is the distribution-free paired test; pairs with a zero
  difference are dropped (scipy's default "wilcox" zero method).
- Mann-Whitney U (``mannwhitneyu``) ignores the pairing; it is reported only for comparison with
  studies that used it, and is less powerful than the paired tests here.
The confidence interval is two-sided (95%) whatever ``alternative`` is. With fewer than 3 pairs
(or differences that are all equal) the tests are NaN and ``note`` says why.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from metsflow.evaluation.metrics import HEADLINE_GROUP, LOWER_IS_BETTER, mean_ci

log = logging.getLogger(__name__)

ALTERNATIVES = ("greater", "less", "two-sided")
MIN_PAIRS = 3  # Shapiro-Wilk needs 3; a t-test on 2 pairs has one degree of freedom
# What `metsflow stats compare` and the compare_rounds rule compare unless told otherwise.
COMPARE_METRICS = ("dice", "ndsc", "hd95", "lesion_f1")
COMPARE_GROUPS = (HEADLINE_GROUP, "enhancing")


def _guarded(test: Callable[[], tuple[float, float]], name: str, notes: list[str]):
    """Run a scipy test; NaN (and a note) instead of an exception or a warning-laden NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            statistic, p = test()
        except ValueError as exc:
            notes.append(f"{name}: {exc}")
            return math.nan, math.nan
    statistic, p = float(statistic), float(p)
    if math.isnan(p):
        notes.append(f"{name}: undefined for these data")
    return statistic, p


def paired_comparison(
    a: Sequence[float], b: Sequence[float], alternative: str = "greater"
) -> dict[str, float | int | str]:
    """Compare paired samples ``a`` and ``b`` (same studies, same order).

    Pairs with a NaN on either side are dropped (``n_dropped``). Returns n, mean/std of a, b and
    of the difference a - b, the 95% t-CI of the mean difference, and statistic/p of the paired
    t-test, Wilcoxon signed-rank, Mann-Whitney U and Shapiro-Wilk (normality of the
    differences; a small p argues for the Wilcoxon test), plus ``note``.
    """
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be 1D and of equal length, got {a.shape}, {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    diff = a - b
    n = int(a.size)
    notes: list[str] = []
    if (~keep).any():
        notes.append(f"{int((~keep).sum())} pairs with NaN dropped")

    def _mean(x):
        return float(x.mean()) if x.size else math.nan

    def _std(x):
        return float(x.std(ddof=1)) if x.size > 1 else math.nan

    ci_low, ci_high = mean_ci(diff)
    result: dict[str, float | int | str] = {
        "n": n,
        "n_dropped": int((~keep).sum()),
        "alternative": alternative,
        "mean_a": _mean(a),
        "std_a": _std(a),
        "mean_b": _mean(b),
        "std_b": _std(b),
        "mean_diff": _mean(diff),
        "std_diff": _std(diff),
        "ci95_low": ci_low,
        "ci95_high": ci_high,
    }
    tests = {
        "ttest": lambda: stats.ttest_rel(a, b, alternative=alternative),
        "wilcoxon": lambda: stats.wilcoxon(a, b, alternative=alternative),
        "mannwhitney": lambda: stats.mannwhitneyu(a, b, alternative=alternative),
        "shapiro": lambda: stats.shapiro(diff),
    }
    if n < MIN_PAIRS:
        notes.append(f"only {n} pairs: tests need at least {MIN_PAIRS}")
    elif np.ptp(diff) == 0:
        # Every difference is the same: t is undefined (zero variance), Shapiro meaningless.
        notes.append("all differences are equal: t-test and Shapiro-Wilk undefined")
    for name, test in tests.items():
        if n < MIN_PAIRS or (np.ptp(diff) == 0 and name in ("ttest", "shapiro")):
            statistic, p = math.nan, math.nan
        else:
            statistic, p = _guarded(test, name, notes)
        result[f"{name}_stat"] = statistic
        result[f"{name}_p"] = p
    result["note"] = "; ".join(notes)
    return result


def _alternative_for(metric: str, alternative: str | Mapping[str, str] | None) -> str:
    if alternative is None:
        return "less" if metric in LOWER_IS_BETTER else "greater"
    if isinstance(alternative, Mapping):
        return alternative.get(metric, _alternative_for(metric, None))
    return alternative


def _index(table: pd.DataFrame, name: str) -> pd.DataFrame:
    missing = {"study_id", "group"} - set(table.columns)
    if missing:
        raise ValueError(f"per-study table {name} lacks columns {sorted(missing)}")
    duplicated = table.duplicated(["study_id", "group"])
    if duplicated.any():
        dupes = table.loc[duplicated, ["study_id", "group"]].drop_duplicates().head(10)
        raise ValueError(
            f"per-study table {name} repeats (study_id, group): {dupes.values.tolist()}"
        )
    return table.set_index(["study_id", "group"])


def compare_tables(
    per_study_a: pd.DataFrame,
    per_study_b: pd.DataFrame,
    metrics: Iterable[str],
    groups: Iterable[str],
    alternative: str | Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """``paired_comparison`` of a vs b for each group and metric, studies aligned on study_id.

    Both tables are ``metsflow.evaluation.metrics.flatten`` rows (study_id, group, metric columns) and must
    cover the same studies; otherwise ``ValueError`` lists the studies found on one side only.
    ``alternative``: one value, a per-metric mapping, or None for "greater" except "less" for
    ``LOWER_IS_BETTER`` metrics. Returns one row per (group, metric).
    """
    only_a = sorted(set(per_study_a["study_id"]) - set(per_study_b["study_id"]))
    only_b = sorted(set(per_study_b["study_id"]) - set(per_study_a["study_id"]))
    if only_a or only_b:
        raise ValueError(
            "the two per-study tables cover different studies: "
            f"only in a: {_preview(only_a)}; only in b: {_preview(only_b)}"
        )
    a = _index(per_study_a, "a")
    b = _index(per_study_b, "b")
    rows = []
    for group in groups:
        for name, table in (("a", a), ("b", b)):
            if group not in table.index.get_level_values("group"):
                raise ValueError(f"group {group!r} is not in per-study table {name}")
        part_a = a.xs(group, level="group")
        part_b = b.xs(group, level="group")
        if set(part_a.index) != set(part_b.index):
            raise ValueError(
                f"group {group!r} covers different studies: only in a: "
                f"{_preview(sorted(set(part_a.index) - set(part_b.index)))}; only in b: "
                f"{_preview(sorted(set(part_b.index) - set(part_a.index)))}"
            )
        part_b = part_b.reindex(part_a.index)
        for metric in metrics:
            if metric not in part_a.columns or metric not in part_b.columns:
                raise ValueError(f"metric {metric!r} is missing from a per-study table")
            comparison = paired_comparison(
                part_a[metric].to_numpy(dtype=float),
                part_b[metric].to_numpy(dtype=float),
                alternative=_alternative_for(metric, alternative),
            )
            rows.append({"group": group, "metric": metric, **comparison})
    return pd.DataFrame(rows)


def compare_per_study(
    per_study_a: pd.DataFrame,
    per_study_b: pd.DataFrame,
    metrics: list[str] | tuple[str, ...] = COMPARE_METRICS,
    groups: list[str] | tuple[str, ...] = COMPARE_GROUPS,
    alternative: str | None = None,
) -> pd.DataFrame:
    """Paired statistics of two per-study tables on the studies both evaluated.

    A study evaluated in only one table (e.g. its inference failed in one round) cannot be
    paired: it is left out, logged, and counted in ``n_unpaired``. Metrics or groups absent
    from either table are skipped with a log line rather than failing the whole table.
    """
    common = set(per_study_a["study_id"]) & set(per_study_b["study_id"])
    unpaired = (set(per_study_a["study_id"]) | set(per_study_b["study_id"])) - common
    if unpaired:
        log.warning("left out of the paired comparison: %s", sorted(unpaired))
    a = per_study_a[per_study_a["study_id"].isin(common)]
    b = per_study_b[per_study_b["study_id"].isin(common)]
    groups = [g for g in groups if g in set(a["group"]) and g in set(b["group"])]
    metrics = [m for m in metrics if m in a.columns and m in b.columns]
    if not common or not groups or not metrics:
        log.warning("nothing to compare: %d paired studies", len(common))
        return pd.DataFrame(columns=["group", "metric", "n", "n_unpaired"])
    table = compare_tables(a, b, metrics=metrics, groups=groups, alternative=alternative)
    table.insert(3, "n_unpaired", len(unpaired))
    return table


def _preview(studies: list[str], limit: int = 20) -> str:
    if not studies:
        return "none"
    more = f" ... (+{len(studies) - limit} more)" if len(studies) > limit else ""
    return ", ".join(map(str, studies[:limit])) + more
