"""Active learning: choose studies to label, keep human labels safe, move them to/from review.

- ``acquisition``: ``select_batch`` ranks the unlabelled pool by a registered strategy.
- ``labelstore``: ``LabelStore``, the versioned, never-overwritten store of human labels.
- ``review``: ``export_batch`` / ``import_batch`` for ITK-SNAP, 3D Slicer and MONAI Label.
- ``annotator``: ``simulate_batch`` answers a batch from phantom ground truth.
- ``burden``: the correction burden, pre-segmentation vs confirmed label, per study and round.
- ``final``: ``final_label_table`` / ``qa_sample``, the labels the loop ends with.
- ``status``: ``round_status`` / ``format_status`` for ``metsflow al status``.
"""

from metsflow.active_learning.acquisition import STRATEGIES, register_strategy, select_batch
from metsflow.active_learning.annotator import AnnotatorNoise, simulate_batch
from metsflow.active_learning.labelstore import LabelImportError, LabelStore
from metsflow.active_learning.review import export_batch, import_batch
from metsflow.active_learning.status import format_status, round_status
from metsflow.core.io import LabelStoreWriteError, guard_not_in_store

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
