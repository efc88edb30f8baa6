"""Train round 0 on the seed set, or fine-tune round r on the seed set + confirmed labels.

Per round up to three kinds of model are trained (``train:`` config):
* stage 1, the segmentation network, once per patient-level fold (``folds``; 1 = one model on
  every labelled study, validated on the plan's validation studies; k > 1 = fold ``f`` trains on
  the labelled studies of the other folds and validates on its own, the k models form the
  inference ensemble);
* stage 2 (``stage2.enabled``), the candidate classifier of the cascade, on the round's stage-1
  ensemble's candidates (``metsflow.models.cascade``);
* re-segmentation (``reseg.enabled``), a segmentation network with the ``prior`` channel trained
  with fictitious priors and validated on follow-ups with their real propagated prior.
Each is fine-tuned in round r from its round r-1 version.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from metsflow.cohort.plan import read_plan
from metsflow.core.io import atomic_path, write_json, write_table
from metsflow.core.layout import LABEL, PRESEGMENTATION_NAME, Layout
from metsflow.core.runtime import reuse_freed_memory, set_threads
from metsflow.core.settings import InferSettings, Stage2Settings, TrainingRun
from metsflow.jobs.manifest import ok_studies, read_manifests

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingInputs:
    """What every training job of a round reads: the plan, the preprocessing manifests, the
    confirmed-label tables and the results layout (where the preprocessed/registered studies
    are)."""

    round_index: int
    plan_path: str
    preprocess_manifests: list[str]
    annotation_tables: list[str]
    train: dict
    seed: int
    layout: Layout
    threads: int = 1
    init_checkpoint: str | None = None  # the previous round's model (round r > 0)
    fold: int = 0  # stage-1 fold of this job (train.folds > 1)
    folds: int = 1

    @classmethod
    def from_snakemake(cls, smk) -> TrainingInputs:
        """From a Snakemake ``script:`` job's ``snakemake`` object (rules/train.smk)."""
        return cls(
            round_index=int(smk.wildcards.round),
            plan_path=smk.input.plan,
            preprocess_manifests=list(smk.input.preprocessed),
            annotation_tables=list(smk.input.get("annotations", [])),
            train=dict(smk.params.train),
            seed=int(smk.params.seed),
            layout=Layout.from_config(smk.config),
            threads=int(smk.threads),
            init_checkpoint=smk.input.get("init"),
            fold=int(smk.params.get("fold", 0)),
            folds=int(smk.params.get("folds", 1)),
        )

    @property
    def prep_root(self) -> str:
        return self.layout.stage_root("preprocessed")

    @property
    def reg_root(self) -> str:
        return self.layout.stage_root("registered")

    def labelled_items(
        self, label_dir: Path, hard_negatives: bool = False
    ) -> tuple[pd.DataFrame, list[dict], list[dict], int]:
        """(plan, training items, validation items, number of human-confirmed labels).

        Confirmed labels are resampled onto the preprocessed grids under ``label_dir``. With
        ``hard_negatives`` (``train.hard_negative_fraction`` > 0) a confirmed study whose
        reviewer deleted part of its presegmentation carries those parts as its hard negatives
        (``metsflow.models.train.hard_negatives_on_prep_grid``, under
        ``label_dir/hard_negatives``); without, no presegmentation is read."""
        from metsflow.models.train import (
            build_items,
            confirmed_label_files,
            confirmed_labels_on_prep_grid,
            hard_negatives_on_prep_grid,
        )

        plan = read_plan(self.plan_path)
        ok = ok_studies(read_manifests(self.preprocess_manifests))
        confirmed = confirmed_labels_on_prep_grid(
            self.annotation_tables, ok, self.prep_root, label_dir
        )
        hard = {}
        if hard_negatives and confirmed:
            hard = hard_negatives_on_prep_grid(
                confirmed_label_files(self.annotation_tables, ok),
                self.presegmentations(),
                self.prep_root,
                label_dir / "hard_negatives",
            )
            log.info(
                "hard negatives (presegmentation parts the reviewer deleted) in %d of %d "
                "confirmed studies",
                len(hard),
                len(confirmed),
            )
        train_items, val_items = build_items(
            plan, ok, self.prep_root, self.reg_root, confirmed, hard
        )
        return plan, train_items, val_items, len(confirmed)

    def presegmentations(self) -> dict[str, Path]:
        """Study id -> the presegmentation its reviewer started from: ``PRESEGMENTATION_NAME`` in
        the review package of the round whose annotation table confirmed it (the last such
        round, as for its label). Only files that exist; an annotation table that is not a
        round's of this layout contributes none."""
        from metsflow.models.train import confirmed_study_ids

        rounds = {
            Path(self.layout.annotations(r)).resolve(): r for r in range(1, self.round_index + 1)
        }
        found: dict[str, Path] = {}
        for table in self.annotation_tables:
            r = rounds.get(Path(table).resolve())
            if r is None:
                log.warning("%s is no round's annotation table: no hard negatives from it", table)
                continue
            for study_id in confirmed_study_ids(table):
                path = Path(self.layout.review_dir(r)) / study_id / PRESEGMENTATION_NAME
                if path.is_file():
                    found[study_id] = path
                else:
                    found.pop(study_id, None)  # not this round's start: no hard negatives
        return found

    def train_model(
        self,
        train_items: list[dict],
        val_items: list[dict],
        params: TrainingRun,
        out_model: str,
        out_log: str,
        init_checkpoint: str | None,
    ) -> dict:
        """``metsflow.models.train.train_model`` on the device of its ``train`` settings."""
        from metsflow.models.train import train_model

        return train_model(
            train_items,
            val_items,
            params,
            out_model,
            init_checkpoint=init_checkpoint,
            log_path=out_log,
            device=params.train.device,
        )


def _start_job(threads: int) -> None:
    """The training job's threads, and glibc malloc keeping freed blocks (the inference jobs'
    ``heap_reuse`` lever): a demo training step (batch 2 of 48^3, forward + backward + AdamW,
    2 cores) 0.54-0.56 -> 0.49-0.50 s median, the activations no longer page-faulted in afresh
    on every step."""
    set_threads(threads)
    reuse_freed_memory()


def run_train_round(job: TrainingInputs, model: dict, spacing: list[float]) -> dict:
    """Stage-1 fold ``job.fold`` of round ``job.round_index`` into ``Layout.model`` /
    ``train_log`` / ``train_summary`` of that round and fold (rule train_round's outputs)."""
    from metsflow.cohort.splits import fold_split
    from metsflow.models.train import LOG_COLUMNS, confirmed_study_ids, training_params

    init_checkpoint, fold, folds = job.init_checkpoint, job.fold, job.folds
    out_model = job.layout.model(job.round_index, fold)
    out_log = job.layout.train_log(job.round_index, fold)
    out_summary = job.layout.train_summary(job.round_index, fold)

    _start_job(job.threads)
    round_index, train, seed = job.round_index, job.train, job.seed
    params = training_params(model, train, spacing, seed, round_index)
    plan, train_items, val_items, n_confirmed = job.labelled_items(
        Path(out_model).parent / "train_labels", params.train.hard_negative_fraction > 0
    )
    if not train_items:
        raise RuntimeError(
            f"round {round_index}: no labelled training study (seed set empty or every labelled "
            f"study failed preprocessing; see {job.layout.quarantine})"
        )
    log.info(
        "round %d: %d training studies (%d confirmed by review), %d validation studies",
        round_index,
        len(train_items),
        n_confirmed,
        len(val_items),
    )
    if folds > 1:
        train_items, val_items = fold_split(train_items, plan, fold, folds, seed)
        log.info(
            "fold %d/%d: %d training, %d validation studies (patient-level split)",
            fold + 1,
            folds,
            len(train_items),
            len(val_items),
        )
    new_labels = confirmed_study_ids(job.annotation_tables[-1]) if job.annotation_tables else None
    if round_index > 0 and not new_labels:
        # The round selected nothing (validation Dice reached the threshold): the model stays.
        log.info(
            "round %d: no new confirmed labels; keeping the round %d model",
            round_index,
            round_index - 1,
        )
        with atomic_path(out_model) as tmp:
            shutil.copyfile(init_checkpoint, tmp)
        write_table(out_log, pd.DataFrame(columns=LOG_COLUMNS))
        result = {"stopped": True}
    else:
        result = job.train_model(
            train_items, val_items, params, out_model, out_log, init_checkpoint
        )
    summary = {
        **result,
        "round": round_index,
        "fold": fold,
        "folds": folds,
        "n_train": len(train_items),
        "n_confirmed": n_confirmed,
        "train_studies": sorted(item["study_id"] for item in train_items),
    }
    write_json(out_summary, summary)
    return summary


def run_train_reseg(job: TrainingInputs, model: dict, spacing: list[float]) -> dict:
    """Train (round 0) or fine-tune the re-segmentation model on the labelled studies, into
    ``Layout.reseg_model`` / ``reseg_train_log`` (rule train_reseg's outputs).

    Training priors are fictitious (made from each study's label); validation uses the plan's
    validation follow-ups with their real propagated prior."""
    from metsflow.models.train import reseg_params

    init_checkpoint = job.init_checkpoint
    out_model = job.layout.reseg_model(job.round_index)
    out_log = job.layout.reseg_train_log(job.round_index)

    _start_job(job.threads)
    params = reseg_params(model, job.train, spacing, job.seed, job.round_index)
    _, train_items, val_items, _ = job.labelled_items(
        Path(out_model).parent / "train_labels_reseg", params.train.hard_negative_fraction > 0
    )
    if not train_items:
        raise RuntimeError(f"round {job.round_index}: no labelled study to train re-seg on")
    val_items = [i for i in val_items if i["prior"]]
    log.info(
        "re-seg round %d: %d training studies, %d validation follow-ups, channels %s",
        job.round_index,
        len(train_items),
        len(val_items),
        params.model.channels,
    )
    result = job.train_model(train_items, val_items, params, out_model, out_log, init_checkpoint)
    return {**result, "round": job.round_index, "n_train": len(train_items)}


def run_train_stage2(job: TrainingInputs, infer: InferSettings, stage1_models: list[str]) -> dict:
    """Train the stage-2 candidate classifier on the round's stage-1 ensemble's candidates
    (``stage1_models``), into ``Layout.stage2_model`` / ``stage2_summary``.

    Training candidates come from the labelled training studies, the operating point from the
    plan's validation studies (``metsflow.models.cascade``)."""
    import torch

    from metsflow.core.runtime import select_device
    from metsflow.models.cascade import (
        NoCandidatesError,
        mine_candidates,
        mine_proposal_threshold,
        train_stage2,
    )
    from metsflow.models.infer import load_ensemble

    out_model = job.layout.stage2_model(job.round_index)
    out_summary = job.layout.stage2_summary(job.round_index)
    _start_job(job.threads)
    torch.manual_seed(job.seed)
    params = dataclasses.replace(
        Stage2Settings.from_dict(job.train.get("stage2")), seed=job.seed + job.round_index
    )
    plan, train_items, val_items, _ = job.labelled_items(
        Path(out_model).parent / "train_labels_stage2"
    )
    patient_of = dict(zip(plan.study_id, plan.patient_id, strict=True))
    device = select_device(infer.device)
    networks, meta = load_ensemble(stage1_models, device=device)

    def mine(items: list[dict], add_reference: bool, params) -> list:
        return mine_candidates(
            networks, meta, items, infer.as_params(), device, params, add_reference, patient_of
        )

    proposals, configured = None, params
    if params.proposal_sensitivity is not None:
        # High-sensitivity stage 1: the proposal threshold is set on the validation studies,
        # and stage 2 trains and chooses its operating point on those proposals (stage 1 runs
        # twice on validation rather than holding every validation study in memory).
        proposals = mine_proposal_threshold(
            networks, meta, val_items, infer.as_params(), device, params.proposal_sensitivity
        )
        params = dataclasses.replace(params, proposal_threshold=proposals["threshold"])
        log.info("stage-1 proposals: %s", proposals)

    def fit(params) -> dict:
        return train_stage2(
            mine(train_items, True, params),  # + every reference lesion, so positives exist
            mine(val_items, False, params),
            meta["channels"],
            params,
            out_model,
            stage1_checkpoint=",".join(stage1_models),
            device=device,  # the job's GPU when it has one (the rule asks for gpu=1)
        )

    try:
        stage2_meta = fit(params)
    except NoCandidatesError as exc:
        if proposals is None:
            raise
        # A weak stage 1 (an early round, a small cohort) can need the threshold floor to reach
        # the proposal sensitivity, where its proposals merge into brain-sized regions that all
        # touch a lesion: no false positive to learn from. The round goes on with the argmax.
        log.warning(
            "%s with high-sensitivity proposals (%s); using stage 1's argmax", exc, proposals
        )
        params = dataclasses.replace(configured, proposal_sensitivity=None)
        proposals = None
        stage2_meta = fit(params)
    summary = {
        k: stage2_meta[k]
        for k in (
            "threshold",
            "operating_rule",
            "max_fp_per_patient",
            "target_sensitivity",
            "rule_met",
            "sensitivity_before",
            "sensitivity_after",
            "fp_per_patient_before",
            "fp_per_patient_after",
            "fdr_before",
            "fdr_after",
            "n_candidates",
            "n_reference_lesions",
            "n_patients",
            "final_loss",
            "froc",
            "lost_lesions",
            "members",  # per classifier: seed, final loss, the iteration kept (select_every)
        )
    }
    summary.update(round=job.round_index, n_train=len(train_items), n_val=len(val_items))
    # The stage-1 proposals' validation sensitivity: the ceiling stage 2 works under.
    summary["proposal_threshold"] = float(params.proposal_threshold)
    summary["proposal_sensitivity"] = (
        proposals["proposal_sensitivity"] if proposals else stage2_meta["sensitivity_before"]
    )
    write_json(out_summary, summary)
    return summary


def run_pretrain(
    layout: Layout,
    studies: list[dict],
    preprocess: dict,
    model: dict,
    train: dict,
    spacing: list[float],
    seed: int,
    iterations: int,
    threads: int = 1,
) -> dict:
    """The ``pretrain`` target: preprocess the labelled studies of the pretraining sheet
    (``studies``: study records) into ``Layout.pretrain_preprocessed_dir`` (a failing study is
    quarantined in ``Layout.pretrain_manifest``, the rest go on), then train stage 1 on all of
    them for ``iterations`` into ``Layout.pretrain_model``, which round 0 fine-tunes from.
    These studies are in no plan: they never enter the pool or the validation set."""
    from metsflow.cohort.sheet import Study
    from metsflow.jobs.manifest import FILE_COLUMN, write_manifest
    from metsflow.jobs.preprocess import preprocess_one
    from metsflow.models.train import training_params

    _start_job(threads)
    rows, items = [], []
    for record in studies:
        study = Study.from_record(record)
        if study.label is None:
            continue
        out_dir = layout.pretrain_preprocessed_dir(study.study_id)
        row = preprocess_one(study, out_dir, preprocess, threads)
        rows.append(row)
        if row["status"] == "ok" and (out_dir / LABEL).exists():
            items.append(
                {
                    "study_id": study.study_id,
                    "prep_dir": str(out_dir),
                    "label": str(out_dir / LABEL),
                    "prior": None,
                }
            )
    write_manifest(layout.pretrain_manifest, rows, extra_columns=[FILE_COLUMN])
    if not items:
        raise RuntimeError(
            f"pretrain: no labelled study could be preprocessed (see {layout.pretrain_manifest})"
        )
    run = training_params(model, train, spacing, seed, 0)
    # From scratch, for the pretrain section's iterations (train.init_checkpoint is refused
    # together with pretrain at parse time: metsflow.cohort.preflight._pretrain_problems).
    run = dataclasses.replace(
        run,
        train=dataclasses.replace(run.train, iterations=int(iterations), init_checkpoint=None),
    )
    log.info("pretraining on %d studies for %d iterations", len(items), iterations)
    from metsflow.models.train import train_model

    result = train_model(
        items,
        [],
        run,
        layout.pretrain_model,
        log_path=layout.pretrain_log_table,
        device=run.train.device,
    )
    return {**result, "n_train": len(items), "n_failed": len(rows) - len(items)}
