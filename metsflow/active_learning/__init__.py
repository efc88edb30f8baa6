"""Active learning: choose studies to label, keep human labels safe, move them to/from review.

- ``acquisition``: ``select_batch`` ranks the unlabelled pool by a registered strategy.
- ``labelstore``: ``LabelStore``, the versioned, never-overwritten store of human labels.
- ``review``: ``export_batch`` / ``import_batch`` for ITK-SNAP, 3D Slicer and MONAI Label.
- ``annotator``: ``simulate_batch`` answers a batch from phantom ground truth.
- ``burden``: the correction burden, pre-segmentation vs confirmed label, per study and round.
- ``final``: ``final_label_table`` / ``qa_sample``, the labels the loop ends with.
- ``status``: ``round_status`` / ``format_status`` for ``metsflow al status``.

The names below are imported on first use (PEP 562), not with the package: every job that
imports one submodule (``acquisition`` for round_candidates, select_batch, final_labels and
check_oracle) would otherwise import all of them, scipy.stats and the evaluation metrics
included: 1.0 CPU-s per job.
"""

from __future__ import annotations

import importlib

_SOURCES = {
    "STRATEGIES": "acquisition",
    "register_strategy": "acquisition",
    "select_batch": "acquisition",
    "AnnotatorNoise": "annotator",
    "simulate_batch": "annotator",
    "LabelImportError": "labelstore",
    "LabelStore": "labelstore",
    "export_batch": "review",
    "import_batch": "review",
    "format_status": "status",
    "round_status": "status",
}
_CORE_IO = ("LabelStoreWriteError", "guard_not_in_store")

__all__ = [
    "STRATEGIES",
    "AnnotatorNoise",
    "LabelImportError",
    "LabelStore",
    "LabelStoreWriteError",
    "export_batch",
    "format_status",
    "guard_not_in_store",
    "import_batch",
    "register_strategy",
    "round_status",
    "select_batch",
    "simulate_batch",
]


def __getattr__(name: str):
    if name in _SOURCES:
        module = importlib.import_module(f"{__name__}.{_SOURCES[name]}")
    elif name in _CORE_IO:
        module = importlib.import_module("metsflow.core.io")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)
