"""Segment the validation and pool studies of one GPU shard with one round's model.

The models are loaded once per job (a shard of tens of studies), then every study is segmented
on its preprocessed grid and mapped back to its native T1c grid. Stage 1 is the round's model,
or the ensemble of its fold models; when the round trained them, stage 2 filters the stage-1
lesions and, on follow-ups with a propagated prior, the re-segmentation model's tracked lesions
are merged with the cascade's new lesions (``metsflow.postprocess``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from metsflow.io import StudyError, save_nifti
from metsflow.jobs.manifest import read_manifests, write_manifest
from metsflow.runtime import select_device, set_threads

log = logging.getLogger(__name__)

SCORE_COLUMNS = [
    "uncertainty_entropy",
    "uncertainty_lesion",
    "lesion_entropies",
    "lesion_count",
    "lesion_volume_mm3",
    "stage1_lesions",
    "stage2_removed",
    "tracked_lesions",
    "new_lesions",
]


def run_infer_shard(
    studies: list[dict],
    preprocess_manifests: list[str],
    model_path: str,
    settings: dict,
    prep_root: str,
    reg_root: str,
    out_root: str,
    manifest: str,
    threads: int = 1,
    fold_models: list[str] | None = None,
    stage2_model: str | None = None,
    reseg_models: list[str] | None = None,
) -> list[dict]:
    """``studies``: plan rows (study_id, patient_id, role) of the shard to segment.

    ``fold_models``: further stage-1 fold checkpoints, ensembled with ``model_path``;
    ``stage2_model`` / ``reseg_models``: the cascade's stage 2 and the re-seg model(s)."""
    from metsflow.infer import load_ensemble, predict_study
    from metsflow.postprocess import CascadePostProcess
    from metsflow.preprocess import to_native

    set_threads(threads)
    device = select_device(settings.get("device", "auto"))
    ok = set(read_manifests(preprocess_manifests).query("status == 'ok'").study_id)
    networks, meta = load_ensemble([model_path, *(fold_models or [])], device=device)
    postprocess = CascadePostProcess.from_checkpoints(
        meta["channels"], stage2_model, reseg_models, settings, device
    )
    rows = []
    for record in studies:
        study_id, patient = record["study_id"], record["patient_id"]
        base = {"study_id": study_id, "patient_id": patient, "role": record["role"]}
        if study_id not in ok:
            rows.append({**base, "status": "skipped", "problem": "preprocessing failed"})
            continue
        prep_dir = Path(prep_root) / study_id
        prior = Path(reg_root) / study_id / "prior.nii.gz"
        item = {
            "study_id": study_id,
            "prep_dir": str(prep_dir),
            "prior": str(prior) if prior.exists() else None,
        }
        try:
            scores = predict_study(networks, meta, item, out_root, settings, device, postprocess)
            pred_path = Path(out_root) / study_id / "pred.nii.gz"
            native = to_native(np.asarray(nib.load(str(pred_path)).dataobj), prep_dir)
            save_nifti(
                pred_path.with_name("pred_native.nii.gz"),
                np.asarray(native.dataobj),
                native.affine,
                dtype=np.uint8,
            )
        except StudyError as exc:
            log.error("%s", exc)
            rows.append({**base, "status": "failed", "problem": str(exc)})
            continue
        except Exception as exc:  # one study's failure must not stop the shard
            log.exception("study %s: inference failed", study_id)
            problem = f"study {study_id}: inference failed: {type(exc).__name__}: {exc}"
            rows.append({**base, "status": "failed", "problem": problem})
            continue
        scores.pop("study_id", None)
        rows.append({**base, "status": "ok", "problem": "", **scores})
    write_manifest(manifest, rows, extra_columns=["role", *SCORE_COLUMNS])
    return rows
