"""Train round 0 on the seed set, or fine-tune round r on the seed set + confirmed labels."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from metsflow.io import atomic_path, save_nifti, write_json, write_table
from metsflow.jobs.manifest import read_manifests
from metsflow.runtime import set_threads

log = logging.getLogger(__name__)


def label_to_grid(label_path: str | Path, reference_path: str | Path) -> np.ndarray:
    """Nearest-neighbour resampling of a label map onto the grid of ``reference_path``.

    Works in world coordinates (both affines), so any orientation or obliquity of the source
    (for example a native-space human correction) lands on the preprocessed grid.
    """
    source = nib.load(str(label_path))
    reference = nib.load(str(reference_path))
    ref_to_src = np.linalg.inv(source.affine) @ reference.affine
    grid = np.indices(reference.shape[:3], dtype=np.float32).reshape(3, -1)
    coords = ref_to_src[:3, :3] @ grid + ref_to_src[:3, 3:4]
    data = np.asarray(source.dataobj).astype(np.uint8)
    sampled = ndimage.map_coordinates(data, coords, order=0, mode="constant", cval=0)
    return sampled.reshape(reference.shape[:3]).astype(np.uint8)


def training_params(
    model: dict, train: dict, spacing: list[float], seed: int, round_index: int
) -> dict:
    params = {**model, **train, "spacing": list(spacing), "seed": seed + round_index}
    if round_index > 0:
        params["iterations"] = train.get("finetune_iterations", train["iterations"])
    return params


def build_items(
    plan: pd.DataFrame,
    ok_studies: set[str],
    prep_root: str,
    reg_root: str,
    extra_labels: dict[str, Path] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Training items (seed studies + ``extra_labels``) and validation items."""
    extra_labels = extra_labels or {}
    train, val = [], []
    for row in plan.itertuples():
        if row.study_id not in ok_studies:
            continue
        prep_dir = Path(prep_root) / row.study_id
        prior = Path(reg_root) / row.study_id / "prior.nii.gz"
        item = {
            "study_id": row.study_id,
            "prep_dir": str(prep_dir),
            "prior": str(prior) if prior.exists() else None,
        }
        if row.study_id in extra_labels:
            train.append({**item, "label": str(extra_labels[row.study_id])})
        elif (prep_dir / "label.nii.gz").exists() and row.role in ("seed", "validation"):
            item["label"] = str(prep_dir / "label.nii.gz")
            (val if row.role == "validation" else train).append(item)
    return train, val


def run_train_round(
    round_index: int,
    plan_path: str,
    preprocess_manifests: list[str],
    annotation_tables: list[str],
    init_checkpoint: str | None,
    model: dict,
    train: dict,
    spacing: list[float],
    seed: int,
    prep_root: str,
    reg_root: str,
    out_model: str,
    out_log: str,
    out_summary: str,
    threads: int = 1,
) -> dict:
    from metsflow.train import train_model

    set_threads(threads)
    plan = pd.read_csv(plan_path, sep="\t", dtype=str, keep_default_na=False)
    ok = set(read_manifests(preprocess_manifests).query("status == 'ok'").study_id)
    confirmed = _confirmed_labels_on_prep_grid(
        annotation_tables, ok, prep_root, Path(out_model).parent / "train_labels"
    )
    train_items, val_items = build_items(plan, ok, prep_root, reg_root, confirmed)
    if not train_items:
        raise RuntimeError(
            f"round {round_index}: no labelled training study (seed set empty or every labelled "
            "study failed preprocessing; see results/qc/quarantine.tsv)"
        )
    log.info(
        "round %d: %d training studies (%d confirmed by review), %d validation studies",
        round_index,
        len(train_items),
        len(confirmed),
        len(val_items),
    )
    params = training_params(model, train, spacing, seed, round_index)
    new_labels = _labels_of_round(annotation_tables[-1]) if annotation_tables else None
    if round_index > 0 and not new_labels:
        # The round selected nothing (validation Dice reached the threshold): the model stays.
        log.info(
            "round %d: no new confirmed labels; keeping the round %d model",
            round_index,
            round_index - 1,
        )
        with atomic_path(out_model) as tmp:
            shutil.copyfile(init_checkpoint, tmp)
        write_table(
            out_log, pd.DataFrame(columns=["iteration", "loss", "lr", "val_dice", "seconds"])
        )
        result = {"stopped": True}
    else:
        result = train_model(
            train_items,
            val_items,
            params,
            out_model,
            init_checkpoint=init_checkpoint,
            log_path=out_log,
            device=train.get("device", "auto"),
        )
    summary = {
        **result,
        "round": round_index,
        "n_train": len(train_items),
        "n_confirmed": len(confirmed),
        "train_studies": sorted(item["study_id"] for item in train_items),
    }
    write_json(out_summary, summary)
    return summary


def _labels_of_round(table_path: str) -> list[str]:
    table = pd.read_csv(table_path, sep="\t", dtype=str, keep_default_na=False)
    return list(table.loc[table.status == "confirmed", "study_id"])


def _confirmed_labels_on_prep_grid(
    annotation_tables: list[str], ok: set[str], prep_root: str, out_dir: Path
) -> dict[str, Path]:
    """Confirmed human labels (native grid) resampled onto each study's preprocessed grid."""
    labels: dict[str, Path] = {}
    for table_path in annotation_tables:
        table = pd.read_csv(table_path, sep="\t", dtype=str, keep_default_na=False)
        for row in table.itertuples():
            if row.status != "confirmed" or row.study_id not in ok:
                continue
            reference = Path(prep_root) / row.study_id / "t1c.nii.gz"
            target = out_dir / f"{row.study_id}.nii.gz"
            save_nifti(
                target,
                label_to_grid(row.label, reference),
                nib.load(str(reference)).affine,
                dtype=np.uint8,
            )
            labels[row.study_id] = target
    return labels
