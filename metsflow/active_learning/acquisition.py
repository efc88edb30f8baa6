"""Choose which unlabelled studies a human labels next (the acquisition function).

Input is the per-study table written by inference with model r-1 over the unlabelled pool:
``study_id, patient_id, uncertainty_entropy, uncertainty_lesion, lesion_count,
lesion_volume_mm3, lesion_entropies`` (``lesion_entropies`` is a JSON list of per-lesion
maximum entropies, ``"[]"`` when no lesion was predicted) and, when a fold ensemble was run,
``uncertainty_disagreement`` (the members' mutual information, ``metsflow.models.infer``).

Every strategy maps the candidate table to one score per study, higher meaning "more worth
a human's time". Ranking, exclusion, the per-patient cap and tie-breaking are shared, so a new
strategy is one function registered with ``@register_strategy("name")``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd

# A strategy receives the candidates (already filtered and sorted by study_id) and a seeded
# generator, and returns one float score per row (same index), higher = label first.
Strategy = Callable[[pd.DataFrame, np.random.Generator], pd.Series]

STRATEGIES: dict[str, Strategy] = {}

SELECTION_COLUMNS = ["study_id", "patient_id", "score", "rank", "strategy"]

# Column names of the inference table, in one place so a rename is one edit.
ENTROPY_COLUMN = "uncertainty_entropy"
# architecture.md's first draft called the whole-image entropy plain "uncertainty".
ENTROPY_FALLBACK_COLUMN = "uncertainty"
DISAGREEMENT_COLUMN = "uncertainty_disagreement"
LESION_ENTROPIES_COLUMN = "lesion_entropies"
LESION_SUMMARY_COLUMN = "uncertainty_lesion"


def register_strategy(name: str) -> Callable[[Strategy], Strategy]:
    """Decorator adding a strategy under ``name`` (a duplicate name is a programming error)."""

    def decorate(func: Strategy) -> Strategy:
        if name in STRATEGIES:
            raise ValueError(f"acquisition strategy {name!r} is already registered")
        STRATEGIES[name] = func
        return func

    return decorate


def _numeric_column(candidates: pd.DataFrame, column: str, strategy: str) -> pd.Series:
    if column not in candidates.columns:
        raise ValueError(
            f"strategy {strategy!r} needs the column {column!r} in the candidate table "
            f"(columns present: {sorted(candidates.columns)})"
        )
    return pd.to_numeric(candidates[column], errors="coerce").astype(float)


@register_strategy("random")
def _random_scores(candidates: pd.DataFrame, rng: np.random.Generator) -> pd.Series:
    """Uniform random scores: the baseline every other strategy has to beat."""
    return pd.Series(rng.random(len(candidates)), index=candidates.index, dtype=float)


@register_strategy("entropy")
def _entropy_scores(candidates: pd.DataFrame, rng: np.random.Generator) -> pd.Series:
    """Whole-image predictive entropy (mean voxel entropy written by inference)."""
    if ENTROPY_COLUMN not in candidates.columns and ENTROPY_FALLBACK_COLUMN in candidates.columns:
        return _numeric_column(candidates, ENTROPY_FALLBACK_COLUMN, "entropy")
    return _numeric_column(candidates, ENTROPY_COLUMN, "entropy")


@register_strategy("disagreement")
def _disagreement_scores(candidates: pd.DataFrame, rng: np.random.Generator) -> pd.Series:
    """Disagreement between fold-ensemble members (their mutual information).

    Only available when inference ran more than one model (``train.folds > 1``); otherwise the
    column is absent or empty and the error says so rather than silently falling back.
    """
    if (
        DISAGREEMENT_COLUMN not in candidates.columns
        or pd.to_numeric(candidates[DISAGREEMENT_COLUMN], errors="coerce").isna().all()
    ):
        raise ValueError(
            f"strategy 'disagreement' needs the column {DISAGREEMENT_COLUMN!r}, written only "
            "when inference runs a fold ensemble; set train.folds > 1 or choose another "
            "strategy"
        )
    return _numeric_column(candidates, DISAGREEMENT_COLUMN, "disagreement")


def parse_lesion_entropies(value: object) -> list[float]:
    """Per-lesion entropies from a cell: a JSON list string, a list, or empty/NaN -> []."""
    if value is None:
        return []
    if isinstance(value, float) and math.isnan(value):
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"lesion_entropies is not a JSON list: {text[:80]!r}") from exc
    if not isinstance(value, list | tuple | np.ndarray):
        raise ValueError(f"lesion_entropies must be a list, got {type(value).__name__}")
    numbers = [float(v) for v in value]
    return [v for v in numbers if math.isfinite(v)]


def _lesion_scores(
    candidates: pd.DataFrame, reduce: Callable[[list[float]], float], strategy: str
) -> pd.Series:
    if LESION_ENTROPIES_COLUMN in candidates.columns:
        scores = []
        for study_id, cell in zip(
            candidates["study_id"], candidates[LESION_ENTROPIES_COLUMN], strict=True
        ):
            try:
                entropies = parse_lesion_entropies(cell)
            except ValueError as exc:
                raise ValueError(f"study {study_id}: {exc}") from exc
            # No predicted lesion: there is no lesion-level uncertainty to rank by, so the
            # study goes after every study with a predicted lesion (the entropy and random
            # strategies still reach such studies).
            scores.append(reduce(entropies) if entropies else 0.0)
        return pd.Series(scores, index=candidates.index, dtype=float)
    if LESION_SUMMARY_COLUMN in candidates.columns:
        return _numeric_column(candidates, LESION_SUMMARY_COLUMN, strategy)
    raise ValueError(
        f"strategy {strategy!r} needs the column {LESION_ENTROPIES_COLUMN!r} "
        f"(or {LESION_SUMMARY_COLUMN!r}) in the candidate table"
    )


@register_strategy("lesion_aware")
def _lesion_max_scores(candidates: pd.DataFrame, rng: np.random.Generator) -> pd.Series:
    """Maximum over lesions of each lesion's (maximum voxel) entropy.

    Why the maximum, unweighted by volume: whole-image entropy is a sum over voxels, so it is
    dominated by the long uncertain boundary of a large metastasis, and a 3 mm lesion the
    model barely sees contributes almost nothing. Clinically each metastasis counts (each is a
    radiosurgery target; a missed small one is the costly error), so a study should rank high
    when *any one* lesion is uncertain, whatever its size. The mean over lesions would dilute
    one uncertain lesion by the confident others in the same study; the maximum does not.
    """
    return _lesion_scores(candidates, max, "lesion_aware")


@register_strategy("lesion_aware_mean")
def _lesion_mean_scores(candidates: pd.DataFrame, rng: np.random.Generator) -> pd.Series:
    """Mean over lesions of per-lesion entropy: still size-independent, but favours studies
    whose lesions are uncertain overall over one outlier lesion (an ablation of the max)."""
    return _lesion_scores(candidates, lambda values: float(np.mean(values)), "lesion_aware_mean")


def select_batch(
    candidates: pd.DataFrame,
    n: int,
    strategy: str,
    seed: int,
    exclude: Iterable[str] = (),
    per_patient_max: int | None = None,
) -> pd.DataFrame:
    """Pick the ``n`` studies to label next; returns ``SELECTION_COLUMNS`` in rank order.

    - ``exclude`` (already labelled studies) never appear in the result.
    - ``per_patient_max`` caps how many time points of one patient enter the batch, so the
      batch covers more patients (time points of one patient are highly correlated).
    - Deterministic given ``seed``: the candidates are put in study_id order first, so the row
      order of the input does not matter; ties in score are broken by a seeded random key and
      then by study_id. A missing/NaN score ranks after every finite one.
    - ``n`` larger than what is left returns everything that is left.
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown acquisition strategy {strategy!r}; registered: {sorted(STRATEGIES)}"
        )
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"batch size n must be a non-negative integer, got {n!r}")
    if per_patient_max is not None and (
        isinstance(per_patient_max, bool) or int(per_patient_max) < 1
    ):
        raise ValueError(f"per_patient_max must be >= 1 or None, got {per_patient_max!r}")
    if "study_id" not in candidates.columns:
        raise ValueError("candidate table has no 'study_id' column")
    if per_patient_max is not None and "patient_id" not in candidates.columns:
        raise ValueError("per_patient_max needs a 'patient_id' column in the candidate table")

    pool = candidates.copy()
    pool["study_id"] = pool["study_id"].astype(str)
    duplicated = pool["study_id"][pool["study_id"].duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"candidate table lists studies more than once: {sorted(duplicated)}")
    excluded = {str(s) for s in exclude}
    pool = pool[~pool["study_id"].isin(excluded)]
    pool = pool.sort_values("study_id", kind="mergesort").reset_index(drop=True)
    if "patient_id" not in pool.columns:
        pool["patient_id"] = ""
    pool["patient_id"] = pool["patient_id"].astype(str)

    # One generator for the strategy, an independent one for tie-breaking, both from the
    # seed, so adding randomness to a strategy does not change how ties are broken.
    strategy_rng, tie_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)
    )
    scores = STRATEGIES[strategy](pool, strategy_rng)
    pool["score"] = pd.to_numeric(scores, errors="coerce").astype(float).to_numpy()
    pool["_tie"] = tie_rng.random(len(pool))
    # NaN -> -inf so it sorts last in a descending sort, but keep NaN in the output.
    pool["_key"] = pool["score"].fillna(-np.inf)
    ranked = pool.sort_values(
        ["_key", "_tie", "study_id"], ascending=[False, True, True], kind="mergesort"
    )

    chosen: list[int] = []
    per_patient: dict[str, int] = {}
    for index, patient in zip(ranked.index, ranked["patient_id"], strict=True):
        if len(chosen) >= n:
            break
        if per_patient_max is not None and per_patient.get(patient, 0) >= per_patient_max:
            continue
        per_patient[patient] = per_patient.get(patient, 0) + 1
        chosen.append(index)

    batch = ranked.loc[chosen, ["study_id", "patient_id", "score"]].reset_index(drop=True)
    batch["rank"] = np.arange(1, len(batch) + 1, dtype=int)
    batch["strategy"] = strategy
    return batch[SELECTION_COLUMNS]
