"""Segment the validation and pool studies of one GPU shard with one round's model.

The models are loaded once per job (a shard of tens of studies), then every study is segmented
on its preprocessed grid and mapped back to its native T1c grid. Stage 1 is the round's model,
or the ensemble of its fold models; when the round trained them, stage 2 filters the stage-1
lesions and, on follow-ups with a propagated prior, the re-segmentation model's tracked lesions
are merged with the cascade's new lesions (``metsflow.models.postprocess``).
"""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metsflow.core.io import StudyError, remove_path, save_nifti
from metsflow.core.layout import PRED_NATIVE, Layout
from metsflow.core.runtime import select_device, set_threads
from metsflow.core.settings import InferRun, InferSettings
from metsflow.jobs.manifest import ok_rows, ok_studies, read_manifests, write_manifest

log = logging.getLogger(__name__)

SCORE_COLUMNS = [
    "uncertainty_entropy",
    "uncertainty_disagreement",  # fold ensembles only (train.folds > 1)
    "uncertainty_lesion",
    "lesion_entropies",
    "lesion_count",
    "lesion_volume_mm3",
    "stage1_lesions",
    "stage2_removed",
    "tracked_lesions",
    "new_lesions",
]


@dataclass(frozen=True)
class InferShard:
    """What one infer_shard job reads and writes (rule infer_shard).

    ``studies``: plan rows (study_id, patient_id, role) of the shard to segment;
    ``stage1_models``: the round's model and its further fold checkpoints (ensembled);
    ``stage2_model`` / ``reseg_models``: the cascade's stage 2 and the re-seg model(s);
    ``previous``: the previous round's ``round``, ``models`` and ``manifest`` of this shard:
    when this round's models are byte-identical to those (a round after the stop criterion
    keeps its model), a study's previous outputs are copied instead of segmenting it again.
    """

    round_index: int
    studies: list[dict]
    preprocess_manifests: list[str]
    stage1_models: list[str]
    manifest: str
    stage2_model: str | None = None
    reseg_models: list[str] = field(default_factory=list)
    previous: dict | None = None
    threads: int = 1

    @classmethod
    def from_snakemake(cls, smk) -> InferShard:
        return cls(
            round_index=int(smk.wildcards.round),
            studies=list(smk.params.studies),
            preprocess_manifests=list(smk.input.preprocessed),
            stage1_models=[smk.input.model, *smk.input.get("folds", [])],
            manifest=smk.output.manifest,
            stage2_model=smk.input.get("stage2"),
            reseg_models=list(smk.input.get("reseg", [])),
            previous=dict(smk.params.previous) or None,
            threads=smk.threads,
        )


def run_infer_shard(layout: Layout, settings: InferSettings, shard: InferShard) -> list[dict]:
    """Segment ``shard.studies`` with round ``shard.round_index``'s models into
    ``layout.prediction_dir``; one manifest row per study."""
    from metsflow.imaging.grid import to_native
    from metsflow.models.infer import (
        load_ensemble,
        overlapped,
        resolve_levers,
        segment_study,
        write_outputs,
    )
    from metsflow.models.networks import load_study_input
    from metsflow.models.postprocess import CascadePostProcess

    params = InferRun.from_params(settings)  # what metsflow.models.infer and .postprocess read
    out_root = layout.prediction_root(shard.round_index)
    set_threads(shard.threads)
    device = select_device(settings.device)
    ok = ok_studies(read_manifests(shard.preprocess_manifests))
    previous = shard.previous
    models = [*shard.stage1_models, shard.stage2_model, *shard.reseg_models]
    reusable = _reusable_predictions(layout, previous, [m for m in models if m])
    if reusable:
        log.info(
            "the models equal the previous round's: reusing %d studies' predictions from %s",
            len(reusable),
            layout.prediction_root(previous["round"]),
        )
    networks, meta = load_ensemble(shard.stage1_models, device=device)
    postprocess = CascadePostProcess.from_checkpoints(
        meta["channels"], shard.stage2_model, shard.reseg_models or None, params, device
    )
    rows: dict[str, dict] = {}
    items = []
    for record in shard.studies:
        study_id, patient = record["study_id"], record["patient_id"]
        base = {"study_id": study_id, "patient_id": patient, "role": record["role"]}
        if study_id not in ok:
            rows[study_id] = {**base, "status": "skipped", "problem": "preprocessing failed"}
        elif study_id in reusable:
            try:
                _copy_study_outputs(
                    layout.prediction_dir(previous["round"], study_id),
                    layout.prediction_dir(shard.round_index, study_id),
                )
            except OSError as exc:  # e.g. a stale folder that cannot be replaced: this study
                problem = f"study {study_id}: previous prediction cannot be reused: {exc}"
                rows[study_id] = {**base, "status": "failed", "problem": problem}
            else:
                rows[study_id] = {**base, **reusable[study_id], "seconds": 0.0}
        else:
            prior = layout.prior(study_id)
            items.append(
                {
                    **base,
                    "prep_dir": str(layout.preprocessed_dir(study_id)),
                    "prior": str(prior) if prior.exists() else None,
                }
            )

    def write(result) -> None:
        # The study's outputs on the preprocessed grid, then the prediction on its native grid.
        row, files = result
        write_outputs(files)
        pred_path, pred = files[0][0], files[0][1]
        native = to_native(pred, row["prep_dir"])
        save_nifti(
            pred_path.with_name(PRED_NATIVE),
            np.asarray(native.dataobj),
            native.affine,
            dtype=np.uint8,
        )

    def compute(item, inp):
        row, files = segment_study(networks, meta, item, out_root, params, device, postprocess, inp)
        return {**row, "prep_dir": item["prep_dir"]}, files

    # The next study is read and the previous one written while this one computes
    # (infer.prefetch; metsflow.models.infer.overlapped); compile: auto needs the shard's size.
    params = resolve_levers(params, device, len(items))
    for item, result, exc in overlapped(
        items,
        load=lambda item: load_study_input(item, meta["channels"]),
        compute=compute,
        write=write,
        enabled=params.prefetch,
    ):
        study_id = item["study_id"]
        base = {k: item[k] for k in ("study_id", "patient_id", "role")}
        if isinstance(exc, StudyError):
            log.error("%s", exc)
            rows[study_id] = {**base, "status": "failed", "problem": str(exc)}
        elif exc is not None:  # one study's failure must not stop the shard
            log.error("study %s: inference failed", study_id, exc_info=exc)
            problem = f"study {study_id}: inference failed: {type(exc).__name__}: {exc}"
            rows[study_id] = {**base, "status": "failed", "problem": problem}
        else:
            scores = {k: v for k, v in result[0].items() if k not in ("study_id", "prep_dir")}
            rows[study_id] = {**base, "status": "ok", "problem": "", **scores}
    rows = [rows[record["study_id"]] for record in shard.studies]
    write_manifest(shard.manifest, rows, extra_columns=["role", *SCORE_COLUMNS])
    return rows


def _reusable_predictions(
    layout: Layout, previous: dict | None, models: list[str]
) -> dict[str, dict]:
    """Study id -> previous manifest row (status ok) when every model file equals the previous
    round's, else {} (also when the previous outputs are gone: they are then recomputed)."""
    if not previous or not Path(previous.get("manifest", "")).is_file():
        return {}
    old_models = [m for m in previous.get("models", []) if m]
    if len(old_models) != len(models) or not all(Path(m).is_file() for m in old_models):
        return {}
    # Byte comparison that stops at the first difference (sizes first): a fine-tuned model
    # differs early, so the usual round reads a few blocks, not every checkpoint in full.
    pairs = zip(models, old_models, strict=True)  # equal lengths checked above
    if not all(filecmp.cmp(new, old, shallow=False) for new, old in pairs):
        return {}
    table = read_manifests([previous["manifest"]])
    rows = {}
    for row in ok_rows(table).to_dict("records"):
        if layout.study_prediction(previous["round"], row["study_id"]).is_file():
            rows[row["study_id"]] = {
                k: v for k, v in row.items() if k not in ("study_id", "patient_id", "role")
            }
    return rows


def _copy_study_outputs(source: Path, target: Path) -> None:
    """Copy a study's prediction folder atomically (hard links where the filesystem allows)."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    partial = target.with_name(f".{target.name}.partial")
    remove_path(partial, ignore_errors=True)
    shutil.copytree(source, partial, copy_function=link_or_copy)
    remove_path(target, ignore_errors=True)
    os.replace(partial, target)
