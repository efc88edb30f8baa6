"""Paired statistics on data with a known effect."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from metsflow.evaluation import stats


def _shifted(n=30, shift=0.05, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    b = rng.uniform(0.5, 0.8, n)
    return b + shift + rng.normal(0, noise, n), b


def test_known_shift_is_detected_and_inside_the_ci():
    a, b = _shifted()
    r = stats.paired_comparison(a, b)
    assert r["n"] == 30 and r["alternative"] == "greater"
    assert r["ttest_p"] < 1e-6
    assert r["wilcoxon_p"] < 1e-4
    assert r["ci95_low"] < 0.05 < r["ci95_high"]
    assert r["ci95_low"] > 0  # the effect is large against the noise
    assert r["mean_diff"] == pytest.approx(np.mean(a - b))
    assert r["std_diff"] == pytest.approx(np.std(a - b, ddof=1))
    assert r["mean_a"] == pytest.approx(a.mean()) and r["std_b"] == pytest.approx(b.std(ddof=1))
    assert 0.0 <= r["shapiro_p"] <= 1.0 and 0.0 <= r["mannwhitney_p"] <= 1.0
    # The paired design is far more sensitive than the unpaired Mann-Whitney test.
    assert r["mannwhitney_p"] > r["ttest_p"]
    assert r["note"] == ""


def test_wrong_direction_gives_large_p():
    a, b = _shifted()
    r = stats.paired_comparison(a, b, alternative="less")
    assert r["ttest_p"] > 0.99 and r["wilcoxon_p"] > 0.99


def test_shapiro_flags_non_normal_differences():
    rng = np.random.default_rng(1)
    b = rng.uniform(0, 1, 60)
    a = b + rng.exponential(1.0, 60) ** 3  # heavily skewed differences
    assert stats.paired_comparison(a, b)["shapiro_p"] < 0.01


def test_fewer_than_three_pairs_gives_nan_with_a_note():
    r = stats.paired_comparison([0.8, 0.9], [0.7, 0.6])
    assert r["n"] == 2
    assert r["mean_diff"] == pytest.approx(0.2)
    assert not math.isnan(r["ci95_low"])  # a CI exists for n = 2 (one degree of freedom)
    for key in ("ttest_p", "wilcoxon_p", "mannwhitney_p", "shapiro_p"):
        assert math.isnan(r[key])
    assert "only 2 pairs" in r["note"]
    empty = stats.paired_comparison([], [])
    assert empty["n"] == 0 and math.isnan(empty["mean_diff"]) and math.isnan(empty["ci95_low"])


def test_constant_difference_and_nan_pairs():
    r = stats.paired_comparison([1.0, 2.0, 3.0, np.nan], [0.5, 1.5, 2.5, 1.0])
    assert r["n"] == 3 and r["n_dropped"] == 1
    assert math.isnan(r["ttest_p"]) and math.isnan(r["shapiro_p"])
    assert "all differences are equal" in r["note"] and "NaN dropped" in r["note"]
    assert r["mean_diff"] == pytest.approx(0.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="alternative"):
        stats.paired_comparison([1, 2, 3], [1, 2, 3], alternative="bigger")
    with pytest.raises(ValueError, match="equal length"):
        stats.paired_comparison([1, 2, 3], [1, 2])


def _table(values, studies, group="whole_lesion", hd=None):
    return pd.DataFrame(
        {
            "study_id": studies,
            "group": group,
            "dice": values,
            "hd95": hd if hd is not None else np.zeros(len(values)),
        }
    )


def test_compare_tables_aligns_on_study_id_and_picks_directions():
    a, b = _shifted(n=12)
    studies = [f"s{i:02d}" for i in range(12)]
    table_a = _table(a, studies, hd=10 - 10 * a)  # better Dice, lower HD95
    table_b = _table(b, studies, hd=10 - 10 * b).iloc[::-1]  # other row order
    out = stats.compare_tables(table_a, table_b, metrics=["dice", "hd95"], groups=["whole_lesion"])
    dice = out[out.metric == "dice"].iloc[0]
    hd = out[out.metric == "hd95"].iloc[0]
    expected = stats.paired_comparison(a, b)
    assert dice["ttest_p"] == pytest.approx(expected["ttest_p"])
    assert dice["mean_diff"] == pytest.approx(expected["mean_diff"])
    assert hd["alternative"] == "less" and hd["ttest_p"] < 1e-4
    forced = stats.compare_tables(
        table_a, table_b, ["hd95"], ["whole_lesion"], alternative="greater"
    )
    assert forced["ttest_p"].iloc[0] > 0.99


def test_compare_tables_rejects_different_study_sets():
    table_a = _table([0.1, 0.2, 0.3], ["s1", "s2", "s3"])
    table_b = _table([0.1, 0.2, 0.3], ["s1", "s2", "s4"])
    with pytest.raises(ValueError, match=r"only in a: s3; only in b: s4"):
        stats.compare_tables(table_a, table_b, ["dice"], ["whole_lesion"])
    with pytest.raises(ValueError, match="repeats"):
        stats.compare_tables(
            pd.concat([table_a, table_a]), pd.concat([table_a, table_a]), ["dice"], ["whole_lesion"]
        )
    with pytest.raises(ValueError, match="group 'edema'"):
        stats.compare_tables(table_a, table_a, ["dice"], ["edema"])


def test_cli_stats_compare_pairs_shared_studies_and_matches_scipy(tmp_path, capsys):
    from scipy import stats as scipy_stats

    from metsflow.cli import main

    a, b = _shifted(n=10)
    studies = [f"s{i:02d}" for i in range(10)]
    # b has one extra study (evaluated only in b): left out of the pairs, counted as unpaired.
    table_a = _table(a, studies, hd=10 - 10 * a)
    table_b = _table([*b, 0.9], [*studies, "s99"], hd=[*(10 - 10 * b), 1.0])
    table_a.to_csv(tmp_path / "a.tsv", sep="\t", index=False)
    table_b.to_csv(tmp_path / "b.tsv", sep="\t", index=False)
    out = tmp_path / "compare.tsv"
    argv = ["stats", "compare", str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")]
    argv += ["--metric", "dice", "--metric", "hd95", "--group", "whole_lesion", "--out", str(out)]
    assert main(argv) == 0
    assert "whole_lesion" in capsys.readouterr().out
    table = pd.read_csv(out, sep="\t").set_index("metric")
    assert list(table.index) == ["dice", "hd95"]
    assert (table["n"] == 10).all() and (table["n_unpaired"] == 1).all()
    assert table.loc["dice", "ttest_p"] == pytest.approx(
        scipy_stats.ttest_rel(a, b, alternative="greater").pvalue
    )
    assert table.loc["dice", "wilcoxon_p"] == pytest.approx(
        scipy_stats.wilcoxon(a, b, alternative="greater").pvalue
    )
    assert table.loc["hd95", "alternative"] == "less"
    assert table.loc["dice", "mean_diff"] == pytest.approx(np.mean(a - b))

    assert main([*argv[:4], "--group", "edema"]) == 1  # no such group in either table
    assert "nothing to compare" in capsys.readouterr().err
