"""Active-learning jobs: select a batch, export it for review, collect confirmed labels."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from metsflow.active_learning.acquisition import SELECTION_COLUMNS, select_batch
from metsflow.cohort.plan import read_plan
from metsflow.cohort.sheet import Study
from metsflow.core.io import read_json, write_table
from metsflow.core.layout import Layout
from metsflow.core.settings import ActiveLearningSettings
from metsflow.jobs.manifest import ok_rows, ok_studies, read_manifests

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSelection:
    """What one select_batch job reads and writes (checkpoint select_batch).

    ``candidates``: the round's recorded candidates (``run_round_candidates``); only those are
    eligible, even if a reused prediction manifest lists other pool studies.
    """

    round_index: int
    prediction_manifests: list[str]
    previous_selections: list[str]
    previous_evaluation: str
    seed: int
    label_store: str
    selection: str
    candidates: str | None = None

    @classmethod
    def from_snakemake(cls, smk) -> BatchSelection:
        return cls(
            round_index=int(smk.wildcards.round),
            prediction_manifests=list(smk.input.predictions),
            previous_selections=list(smk.input.previous),
            previous_evaluation=smk.input.evaluation,
            seed=int(smk.params.seed),
            label_store=smk.params.label_store,
            selection=smk.output.selection,
            candidates=smk.input.candidates,
        )


def run_select_batch(settings: ActiveLearningSettings, job: BatchSelection) -> pd.DataFrame:
    """Pick round ``job.round_index``'s batch from the pool predictions of the previous model.

    Stops (an empty batch) once the previous round's validation Dice reaches the threshold.
    """
    from metsflow.active_learning.labelstore import LabelStore

    evaluation = read_json(job.previous_evaluation)
    dice = evaluation.get("mean_dice")
    if dice is not None and dice >= settings.dice_threshold:
        log.info(
            "round %d: validation Dice %.3f >= threshold %.3f: no new batch",
            job.round_index,
            dice,
            settings.dice_threshold,
        )
        write_table(job.selection, pd.DataFrame(columns=SELECTION_COLUMNS))
        return pd.DataFrame(columns=SELECTION_COLUMNS)
    candidates = read_manifests(job.prediction_manifests)
    candidates = ok_rows(candidates)
    candidates = candidates[candidates.role == "pool"]
    if job.candidates:
        recorded = pd.read_csv(job.candidates, sep="\t", dtype={"study_id": str}).study_id
        candidates = candidates[candidates.study_id.isin(set(recorded))]
    exclude = set(LabelStore(job.label_store).all_confirmed())
    for path in job.previous_selections:
        exclude |= set(pd.read_csv(path, sep="\t", dtype=str).study_id)
    batch = select_batch(
        candidates,
        n=int(settings.batch_size),
        strategy=settings.strategy,
        seed=job.seed + job.round_index,
        exclude=exclude,
        per_patient_max=settings.per_patient_max,
    )
    write_table(job.selection, batch)
    log.info("round %d: selected %d studies (%s)", job.round_index, len(batch), settings.strategy)
    return batch


CANDIDATE_COLUMNS = ["study_id", "patient_id", "round", "candidates", "seed"]


def run_round_candidates(
    selection_round: int, plan_path: str, candidates: int | str, seed: int, out_candidates: str
) -> pd.DataFrame:
    """Write the pool studies round ``selection_round`` selects from, with the setting and the
    seed that drew them (``metsflow.cohort.plan.candidate_studies``; the same function decides, at
    planning, which studies the previous round's models segment)."""
    from metsflow.cohort.plan import candidate_seed, candidate_studies

    plan = read_plan(plan_path)
    chosen = candidate_studies(plan, candidates, seed, selection_round)
    table = chosen[["study_id", "patient_id"]].assign(
        round=selection_round,
        candidates=str(candidates),
        seed=":".join(map(str, candidate_seed(seed, selection_round))),
    )
    write_table(out_candidates, table[CANDIDATE_COLUMNS])
    log.info(
        "round %d: %d of %d pool studies are candidates (candidates: %s, seed %s)",
        selection_round,
        len(table),
        int((plan.role == "pool").sum()),
        candidates,
        table.seed.iloc[0] if len(table) else seed,
    )
    return table


def _study_index(records: list[dict]) -> dict[str, Study]:
    return {r["study_id"]: Study.from_record(r) for r in records}


@dataclass(frozen=True)
class ReviewExport:
    """What one review export reads and writes: ``selection``'s studies, pre-segmented by the
    predictions of round ``model_round`` (rule export_review: round r's batch and the model of
    round r - 1; rule export_final_qa: the QA sample and the final model)."""

    round_index: int
    model_round: int
    selection: str
    studies: list[dict]
    model: str
    out_dir: str
    label_store: str = ""  # read only: a follow-up's previous label (review assists)

    @classmethod
    def from_snakemake(cls, smk) -> ReviewExport:
        """Rule export_review."""
        round_index = int(smk.wildcards.round)
        return cls(
            round_index=round_index,
            model_round=round_index - 1,
            selection=smk.input.selection,
            studies=list(smk.params.studies),
            model=smk.params.model,
            out_dir=os.path.dirname(smk.output.manifest),
            label_store=str(getattr(smk.params, "label_store", "") or ""),
        )

    @classmethod
    def final_qa_from_snakemake(cls, smk) -> ReviewExport:
        """Rule export_final_qa."""
        return cls(
            round_index=int(smk.params.round_index),
            model_round=int(smk.params.round_index),
            selection=smk.input.selection,
            studies=list(smk.params.studies),
            model=smk.input.model,
            out_dir=os.path.dirname(smk.output.manifest),
            label_store=str(getattr(smk.params, "label_store", "") or ""),
        )


def run_export_review(layout: Layout, job: ReviewExport) -> None:
    """Export a batch for review with round ``job.model_round``'s predictions as the
    pre-segmentation."""
    from metsflow.active_learning.review import export_batch

    index = _study_index(job.studies)
    selection = pd.read_csv(job.selection, sep="\t", dtype={"study_id": str})
    export_batch(
        selection,
        images_for=lambda s: {k: v for k, v in index[s].images.items() if v is not None},
        presegmentation_for=lambda s: layout.study_prediction(job.model_round, s),
        out_dir=job.out_dir,
        round_index=job.round_index,
        model_id=job.model,
        patient_for=lambda s: index[s].patient_id,
        assists_for=review_assist_inputs(layout, job, index),
    )


def review_assist_inputs(layout: Layout, job: ReviewExport, index: dict[str, Study]):
    """study -> ``StudyAssistInputs``: this round's model outputs on the model grid and, for a
    follow-up with a registration, the previous time point (its label from the label store,
    else the model's prediction of it)."""
    from metsflow.active_learning.assists import (
        PreviousScan,
        StudyAssistInputs,
        previous_label_for,
    )
    from metsflow.active_learning.labelstore import LabelStore

    store = LabelStore(job.label_store, create=False) if job.label_store else None
    # The study each follow-up was registered to (the nearest earlier one that preprocessed),
    # from the registration manifest; without it, the previous time point by order.
    registered_to: dict[str, str] = {}
    manifest = Path(layout.stage_manifest("registered"))
    if manifest.is_file():
        table = pd.read_csv(manifest, sep="\t", dtype=str, keep_default_na=False)
        if "reference_study" in table.columns:
            registered_to = dict(zip(table["study_id"], table["reference_study"], strict=True))

    def previous_of(study: Study) -> Study | None:
        reference = registered_to.get(study.study_id)
        if reference:
            return index.get(reference)
        earlier = [
            s for s in index.values() if s.patient_id == study.patient_id and s.order < study.order
        ]
        return max(earlier, key=lambda s: s.order) if earlier else None

    def inputs(study_id: str) -> StudyAssistInputs:
        previous = None
        before = previous_of(index[study_id])
        reg_dir = layout.registered_dir(study_id)
        if before is not None and (reg_dir / "inverse_warp.nii.gz").is_file():
            found = previous_label_for(
                store, layout.study_prediction(job.model_round, before.study_id), before.study_id
            )
            if found is not None:
                previous = PreviousScan(
                    study_id=before.study_id,
                    label=found[0],
                    label_source=found[1],
                    prep_dir=layout.preprocessed_dir(before.study_id),
                    reg_dir=reg_dir,
                )
        return StudyAssistInputs(
            prep_dir=layout.preprocessed_dir(study_id),
            prediction_dir=layout.prediction_dir(job.model_round, study_id),
            previous=previous,
        )

    return inputs


@dataclass(frozen=True)
class BatchAnnotation:
    """What one collect_annotations job reads and writes (rule collect_annotations).

    ``studies``: cohort records (the t1c each simulated label is resampled onto); ``model``: the
    checkpoint whose predictions the reviewers saw (recorded as the simulated label's source).
    """

    round_index: int
    selection: str
    oracle_sheet: str
    label_store: str
    studies: list[dict]
    model: str
    annotations: str

    @classmethod
    def from_snakemake(cls, smk) -> BatchAnnotation:
        return cls(
            round_index=int(smk.wildcards.round),
            selection=smk.input.selection,
            oracle_sheet=smk.params.oracle_sheet,
            label_store=smk.params.label_store,
            studies=list(smk.params.studies),
            model=smk.params.model,
            annotations=smk.output.annotations,
        )


def run_collect_annotations(
    layout: Layout, settings: ActiveLearningSettings, job: BatchAnnotation
) -> pd.DataFrame:
    """Confirmed labels of the round's batch, from people or the simulated annotator
    (``settings.annotator``).

    With people, the rule fails, listing the studies still waiting for confirmation, until every
    study of the batch is confirmed in the label store: a later round never trains on a batch
    that is not finished.
    """
    from metsflow.active_learning.labelstore import LabelStore

    index = _study_index(job.studies)
    selection = pd.read_csv(job.selection, sep="\t", dtype={"study_id": str})
    store = LabelStore(job.label_store, known_studies=set(index))
    ids = list(selection.study_id)
    if settings.annotator == "simulated":
        from metsflow.active_learning.annotator import simulate_batch
        from metsflow.active_learning.review import MANIFEST_NAME, refresh_manifest_status

        oracle = read_oracle(job.oracle_sheet)
        simulate_batch(
            ids,
            oracle={s: label.path for s, label in oracle.items()},
            conventions={s: label.convention for s, label in oracle.items()},
            store=store,
            round_index=job.round_index,
            reference_for=lambda s: index[s].t1c,
            source=job.model,
        )
        # The review package shows what the store holds now, as `metsflow al status` does.
        review_dir = Path(layout.review_dir(job.round_index))
        if (review_dir / MANIFEST_NAME).is_file():
            refresh_manifest_status(review_dir, store)
    pending = [s for s in ids if store.confirmed(s) is None]
    if pending:
        raise RuntimeError(
            f"round {job.round_index}: {len(pending)} of {len(ids)} studies are not confirmed yet: "
            f"{', '.join(pending[:20])}{' ...' if len(pending) > 20 else ''}. Review the batch in "
            f"{layout.review_dir(job.round_index)} (save <study>/segmentation.nii.gz) and import "
            f"it with `metsflow al import --round {job.round_index} --stage refined|confirmed "
            f"--reviewer NAME --configfile <your workflow config>`; only confirmed labels train. "
            f"Then run `snakemake round_{job.round_index}` again."
        )
    table = pd.DataFrame(
        [{"study_id": s, "status": "confirmed", "label": str(store.confirmed(s))} for s in ids],
        columns=["study_id", "status", "label"],
    )
    write_table(job.annotations, table)
    return table


def run_correction_burden(
    round_index: int,
    annotations_path: str,
    review_dir: str,
    label_store: str,
    out_table: str,
) -> pd.DataFrame:
    """Per-study correction burden of a confirmed batch: confirmed label vs the round's
    pre-segmentation (``metsflow.active_learning.burden``), whichever way the labels arrived."""
    from metsflow.active_learning.burden import round_burden, summarise_rounds
    from metsflow.active_learning.labelstore import LabelStore

    annotations = pd.read_csv(annotations_path, sep="\t", dtype=str, keep_default_na=False)
    table = round_burden(
        round_index, annotations, review_dir, LabelStore(label_store, create=False)
    )
    write_table(out_table, table)
    for problem in table.problem[table.problem != ""]:
        log.warning("round %d: no correction burden: %s", round_index, problem)
    summary = summarise_rounds(table)
    if len(summary) and summary.n_studies.iloc[0]:
        row = summary.iloc[0]
        log.info(
            "round %d: %d studies, median %.0f voxels changed (%.2f ml), %.0f lesion edits",
            round_index,
            row.n_studies,
            row.voxels_changed_median,
            row.changed_ml_median,
            row.lesion_edits_median,
        )
    return table


@dataclass(frozen=True)
class FinalLabelInputs:
    """What the final_labels job reads (rule final_labels; it writes ``Layout.final_labels``
    and ``Layout.qa_sample``): the QA sample of ``sample_size`` studies is drawn with
    ``seed``."""

    final_round: int
    plan: str
    prediction_manifests: list[str]
    label_store: str
    sample_size: int
    seed: int

    @classmethod
    def from_snakemake(cls, smk) -> FinalLabelInputs:
        return cls(
            final_round=int(smk.params.final_round),
            plan=smk.input.plan,
            prediction_manifests=list(smk.input.predictions),
            label_store=smk.params.label_store,
            sample_size=int(smk.params.sample_size),
            seed=int(smk.params.seed),
        )


def run_final_labels(layout: Layout, job: FinalLabelInputs) -> pd.DataFrame:
    """The label every pool study ends the loop with, and a QA sample of the model-labelled ones
    (``metsflow.active_learning.final``)."""
    from metsflow.active_learning.final import final_label_table, qa_sample
    from metsflow.active_learning.labelstore import LabelStore

    final_round = job.final_round
    plan = read_plan(job.plan)
    predictions = read_manifests(job.prediction_manifests)
    labels = final_label_table(
        plan[plan.role == "pool"],
        ok_studies(predictions),
        LabelStore(job.label_store, create=False).all_confirmed(),
        lambda study_id: layout.study_prediction(final_round, study_id),
        layout.model(final_round),
        final_round,
    )
    write_table(layout.final_labels, labels)

    sample = qa_sample(labels, job.sample_size, job.seed)
    write_table(layout.qa_sample, sample)
    counts = labels.source.value_counts().to_dict()
    log.info(
        "final (model of round %d): %s; QA sample of %d studies", final_round, counts, len(sample)
    )
    return labels


def read_oracle(oracle_sheet: str) -> dict:
    """Study id -> ``metsflow.cohort.preflight.OracleLabel`` (path, convention) of the simulated
    annotator's ground truth; the workflow checked the sheet at parse time."""
    from metsflow.cohort.preflight import read_oracle as read_checked

    if not oracle_sheet:
        raise ValueError("active_learning.annotator is 'simulated' but no oracle_sheet is set")
    oracle, problems = read_checked(oracle_sheet)
    if problems:
        raise ValueError("; ".join(problems))
    return oracle


def run_check_oracle(oracle_sheet: str, out: str) -> pd.DataFrame:
    """Rule check_oracle: read every oracle label's voxels before any round needs one (the
    workflow's parse already read their headers); raise listing every bad label, else write the
    checked table (study_id, label, label_convention)."""
    from metsflow.cohort.preflight import oracle_value_problems

    oracle = read_oracle(oracle_sheet)
    problems = oracle_value_problems(oracle)
    if problems:
        raise ValueError(
            f"oracle_sheet {oracle_sheet}: {len(problems)} bad label(s); fix them before the "
            "rounds run:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    table = pd.DataFrame(
        [(s, str(label.path), label.convention) for s, label in oracle.items()],
        columns=["study_id", "label", "label_convention"],
    )
    write_table(out, table)
    log.info("oracle_sheet %s: %d labels checked", oracle_sheet, len(table))
    return table
