"""Tiny networks and synthetic preprocessed studies for the model tests (test_models, test_train,
test_infer, test_infer_levers, test_followup, test_faults, test_cascade).

- ``make_prep_study``: a preprocessed study (the four sequences, brain mask, label) with
  bright-rim sphere lesions on a 40^3 1 mm grid; returns a training item.
- ``tiny_params`` / ``fast_params``: network and training parameters small enough for a CPU test.
- ``make_checkpoint``: an untrained stage-1 checkpoint of ``tiny_params``.
- ``ALL_AUGMENTATIONS``, ``weights``, ``assert_same_weights``: for the determinism tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from metsflow.core import labels as lab
from metsflow.core.io import save_nifti
from metsflow.models.networks import (
    build_network,
    checkpoint_meta,
    read_checkpoint,
    save_checkpoint,
)

SHAPE = (40, 40, 40)
AFFINE = np.array(
    [[1.0, 0, 0, -20.0], [0, 1.0, 0, -22.0], [0, 0, 1.0, -18.0], [0, 0, 0, 1]], dtype=float
)


def make_prep_study(
    root: Path,
    study_id: str,
    seed: int = 0,
    sequences=("t1c", "t1", "t2", "flair"),
    n_lesions: int = 2,
    shape=SHAPE,
) -> dict:
    """A preprocessed study with bright-rim sphere lesions; returns a training item.

    Lesion = necrotic core (label 3, dark on T1c), enhancing rim (1, bright on T1c), edema halo
    (2, bright on FLAIR/T2). Images are roughly z-scored inside an ellipsoidal "brain".
    """
    rng = np.random.default_rng(seed)
    prep = root / study_id
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    centre = (np.asarray(shape) - 1) / 2
    brain = np.linalg.norm((grid - centre) / (np.asarray(shape) / 2 - 2), axis=-1) < 1
    label = np.zeros(shape, dtype=np.uint8)
    for _ in range(n_lesions):
        c = centre + rng.uniform(-0.2, 0.2, size=3) * np.asarray(shape)
        r = np.linalg.norm(grid - c, axis=-1)
        rim = rng.uniform(3.5, 5.0)
        label[(r < rim + 2.5) & (label == 0)] = lab.EDEMA
        label[r < rim] = lab.ENHANCING
        label[r < rim - 2.0] = lab.NECROSIS
    label[~brain] = 0
    noise = lambda: rng.normal(0, 0.3, shape)  # noqa: E731 - tiny local helper
    images = {
        "t1c": noise() + 3.0 * (label == lab.ENHANCING) - 1.0 * (label == lab.NECROSIS),
        "t1": noise() - 0.5 * np.isin(label, (1, 3)),
        "t2": noise() + 1.5 * (label == lab.EDEMA),
        "flair": noise() + 2.0 * (label == lab.EDEMA),
    }
    for name in sequences:
        save_nifti(prep / f"{name}.nii.gz", np.where(brain, images[name], 0.0), AFFINE, np.float32)
    save_nifti(prep / "brain_mask.nii.gz", brain, AFFINE, np.uint8)
    save_nifti(prep / "label.nii.gz", label, AFFINE, np.uint8)
    return {
        "study_id": study_id,
        "prep_dir": str(prep),
        "label": str(prep / "label.nii.gz"),
        "prior": None,
    }


def tiny_params(**overrides) -> dict:
    params = {
        "arch": "dynunet",
        "channels": ["t1c", "flair"],
        "label_mode": "multiclass",
        "filters": [8, 16, 32],
        "patch_size": [32, 32, 32],
        "spacing": [1.0, 1.0, 1.0],
        "loss": "dice_ce",
    }
    params.update(overrides)
    return params


def make_checkpoint(path: Path, seed: int, **overrides) -> Path:
    params = tiny_params(patch_size=[16, 16, 16], **overrides)
    torch.manual_seed(seed)
    save_checkpoint(path, build_network(params), checkpoint_meta(params))
    return path


ALL_AUGMENTATIONS = {
    "aug_rotate_prob": 1.0,
    "aug_zoom_prob": 1.0,
    "aug_scale_intensity_prob": 1.0,
    "aug_shift_intensity_prob": 1.0,
    "aug_noise_prob": 1.0,
    "aug_flip_prob": 0.5,
}


def fast_params(**overrides):
    params = tiny_params(
        patch_size=[16, 16, 16],
        batch_size=2,
        optimizer="adam",
        learning_rate=3e-3,
        seed=3,
        log_interval=1,
        val_interval=100,
        checkpoint_interval=100,
    )
    params.update(overrides)
    return params


def weights(path):
    return read_checkpoint(path)["state_dict"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
