"""The MRI sequences a study may have: the one list every module asks.

``SEQUENCES`` is the order a study's images are handled in: T1c first, because it is the
reference (every other sequence is registered to its grid, labels lie on it) and the model's
first input channel (``metsflow.models.networks.CHANNELS``), so it must not move. The study
sheet lists the same sequences in the order of a scan protocol (``SHEET_ORDER``: pre-contrast
T1 before T1c), the column order users and ``tests/test_phantom.py`` know.
"""

from __future__ import annotations

REFERENCE = "t1c"
SEQUENCES = (REFERENCE, "t1", "t2", "flair")
MOVING_SEQUENCES = tuple(s for s in SEQUENCES if s != REFERENCE)
SHEET_ORDER = ("t1", REFERENCE, "t2", "flair")

if sorted(SHEET_ORDER) != sorted(SEQUENCES):  # one set of sequences, two orders
    raise AssertionError(f"SHEET_ORDER {SHEET_ORDER} lists other sequences than {SEQUENCES}")
