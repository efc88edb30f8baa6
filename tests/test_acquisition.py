import json

import numpy as np
import pandas as pd
import pytest

from metsflow.active_learning import acquisition
from metsflow.active_learning.acquisition import STRATEGIES, register_strategy, select_batch


def _pool(n_patients=6, per_patient=3, seed=1):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for t in range(per_patient):
            entropies = rng.random(rng.integers(0, 4)).round(3).tolist()
            rows.append(
                {
                    "study_id": f"P{p:02d}_T{t}",
                    "patient_id": f"P{p:02d}",
                    "uncertainty_entropy": float(rng.random()),
                    "uncertainty_lesion": float(rng.random()),
                    "lesion_count": len(entropies),
                    "lesion_volume_mm3": float(rng.random() * 1000),
                    "lesion_entropies": json.dumps(entropies),
                }
            )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("strategy", ["random", "entropy", "lesion_aware", "lesion_aware_mean"])
def test_same_seed_same_batch_regardless_of_row_order(strategy):
    pool = _pool()
    first = select_batch(pool, 5, strategy, seed=7)
    shuffled = pool.sample(frac=1.0, random_state=3)
    second = select_batch(shuffled, 5, strategy, seed=7)
    pd.testing.assert_frame_equal(first, second)
    assert list(first.columns) == ["study_id", "patient_id", "score", "rank", "strategy"]
    assert list(first["rank"]) == [1, 2, 3, 4, 5]
    assert (first["strategy"] == strategy).all()


def test_random_depends_on_seed_and_entropy_ranks_by_score():
    pool = _pool()
    batches = {tuple(select_batch(pool, 5, "random", seed=s)["study_id"]) for s in range(5)}
    assert len(batches) > 1
    batch = select_batch(pool, 4, "entropy", seed=0)
    expected = pool.sort_values("uncertainty_entropy", ascending=False)["study_id"][:4]
    assert list(batch["study_id"]) == list(expected)
    assert batch["score"].is_monotonic_decreasing


def test_ties_broken_by_seed_deterministically():
    pool = pd.DataFrame({"study_id": [f"S{i}" for i in range(8)], "uncertainty_entropy": [0.5] * 8})
    a = select_batch(pool, 8, "entropy", seed=1)["study_id"].tolist()
    assert a == select_batch(pool, 8, "entropy", seed=1)["study_id"].tolist()
    orders = {tuple(select_batch(pool, 8, "entropy", seed=s)["study_id"]) for s in range(6)}
    assert len(orders) > 1  # a seeded shuffle, not plain alphabetical order
    assert sorted(a) == sorted(pool["study_id"])


def test_excluded_studies_never_returned_and_large_n_returns_pool():
    pool = _pool()
    labelled = set(pool["study_id"][::2])
    batch = select_batch(pool, 1000, "entropy", seed=0, exclude=labelled)
    assert set(batch["study_id"]).isdisjoint(labelled)
    assert set(batch["study_id"]) == set(pool["study_id"]) - labelled
    assert len(select_batch(pool, 0, "random", seed=0)) == 0


def test_per_patient_cap_spreads_batch_over_patients():
    pool = _pool(n_patients=4, per_patient=4)
    # Make one patient's studies the most uncertain, so without a cap it fills the batch.
    pool.loc[pool["patient_id"] == "P00", "uncertainty_entropy"] += 10
    uncapped = select_batch(pool, 4, "entropy", seed=0)
    assert set(uncapped["patient_id"]) == {"P00"}
    capped = select_batch(pool, 4, "entropy", seed=0, per_patient_max=1)
    assert capped["patient_id"].value_counts().max() == 1
    assert len(capped) == 4
    everything = select_batch(pool, 100, "entropy", seed=0, per_patient_max=2)
    assert len(everything) == 8
    assert everything["patient_id"].value_counts().max() == 2


def test_lesion_aware_prefers_small_uncertain_lesion_over_large_lesion():
    # Same whole-image entropy: one study has a large, moderately uncertain lesion (its long
    # boundary carries the entropy), the other a small, very uncertain lesion beside a
    # confident one.
    pool = pd.DataFrame(
        [
            {
                "study_id": "A_large",
                "patient_id": "A",
                "uncertainty_entropy": 0.2,
                "lesion_volume_mm3": 9000.0,
                "lesion_entropies": json.dumps([0.55]),
            },
            {
                "study_id": "B_small",
                "patient_id": "B",
                "uncertainty_entropy": 0.2,
                "lesion_volume_mm3": 900.0,
                "lesion_entropies": json.dumps([0.05, 0.9]),
            },
            {
                "study_id": "C_none",
                "patient_id": "C",
                "uncertainty_entropy": 0.2,
                "lesion_volume_mm3": 0.0,
                "lesion_entropies": "[]",
            },
        ]
    )
    batch = select_batch(pool, 3, "lesion_aware", seed=0)
    assert batch["study_id"].tolist() == ["B_small", "A_large", "C_none"]
    assert batch["score"].tolist() == [0.9, 0.55, 0.0]
    # The whole-image entropy cannot tell the two apart (a tie broken by the seed).
    assert set(select_batch(pool, 3, "entropy", seed=0)["score"]) == {0.2}


def test_nan_scores_rank_last():
    pool = pd.DataFrame({"study_id": ["a", "b", "c"], "uncertainty_entropy": [np.nan, 0.1, 0.3]})
    assert select_batch(pool, 3, "entropy", seed=0)["study_id"].tolist() == ["c", "b", "a"]


def test_clear_errors():
    pool = _pool()
    with pytest.raises(ValueError, match="uncertainty_disagreement"):
        select_batch(pool, 3, "disagreement", seed=0)
    with pytest.raises(ValueError, match="unknown acquisition strategy"):
        select_batch(pool, 3, "bald", seed=0)
    with pytest.raises(ValueError, match="more than once"):
        select_batch(pd.concat([pool, pool.head(1)]), 3, "random", seed=0)
    with pytest.raises(ValueError, match="patient_id"):
        select_batch(pool.drop(columns="patient_id"), 3, "random", seed=0, per_patient_max=1)
    with pytest.raises(ValueError, match="non-negative"):
        select_batch(pool, -1, "random", seed=0)
    bad = pool.copy()
    bad.loc[0, "lesion_entropies"] = "[0.1,"
    with pytest.raises(ValueError, match=bad.loc[0, "study_id"]):
        select_batch(bad, 3, "lesion_aware", seed=0)


def test_disagreement_uses_its_column_and_new_strategies_plug_in(monkeypatch):
    pool = _pool()
    pool["uncertainty_disagreement"] = np.linspace(0, 1, len(pool))
    batch = select_batch(pool, 2, "disagreement", seed=0)
    assert batch["study_id"].tolist() == pool["study_id"].tolist()[::-1][:2]

    monkeypatch.setattr(acquisition, "STRATEGIES", dict(STRATEGIES))

    @register_strategy("most_lesions")
    def _most_lesions(candidates, rng):
        return candidates["lesion_count"].astype(float)

    top = select_batch(pool, 1, "most_lesions", seed=0)
    assert top["score"].iloc[0] == pool["lesion_count"].max()
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("most_lesions")(_most_lesions)
