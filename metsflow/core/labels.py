"""Label conventions and their explicit conversions.

metsflow's internal convention follows the reference longitudinal study:
    0 background, 1 enhancing tumour, 2 edema, 3 necrosis.
BraTS (2023 METS challenge) uses:
    0 background, 1 NETC (non-enhancing tumour core / necrosis), 2 SNFH (edema), 3 ET (enhancing).
The two share values 2 but swap 1 and 3, so a silent mix-up is plausible and damaging: every
conversion in metsflow goes through ``to_internal`` / ``from_internal`` with a named convention.

What one lesion is: a 26-connected component (``CONNECTIVITY``; voxels touching by a face, an
edge or a corner belong to the same lesion, as in the BraTS 2023 lesion-wise evaluation) of a
mask's non-zero voxels. ``lesion_components`` is that definition (cc3d); metrics, tracking, the
cascade, the review server's lesion list, the correction burden and the priors all ask it, so a
lesion counted in one place is the same lesion everywhere.
"""

from __future__ import annotations

import numpy as np

BACKGROUND = 0
ENHANCING = 1
EDEMA = 2
NECROSIS = 3

INTERNAL_NAMES = {ENHANCING: "enhancing", EDEMA: "edema", NECROSIS: "necrosis"}
CONVENTIONS = ("internal", "brats")

# value in the named convention -> internal value
_TO_INTERNAL = {
    "internal": {0: 0, 1: 1, 2: 2, 3: 3},
    "brats": {0: BACKGROUND, 1: NECROSIS, 2: EDEMA, 3: ENHANCING},
}

# Label groups evaluated and reported; each is the set of internal values counted as foreground.
# "whole_lesion" is the tumour core seen on T1c (enhancing + necrosis) as in the reference study.
INTERNAL_GROUPS = {
    "enhancing": (ENHANCING,),
    "edema": (EDEMA,),
    "necrosis": (NECROSIS,),
    "whole_lesion": (ENHANCING, NECROSIS),
}
# BraTS regions expressed on internal values: ET = enhancing, TC = ET + NETC, WT = TC + SNFH.
BRATS_GROUPS = {
    "ET": (ENHANCING,),
    "TC": (ENHANCING, NECROSIS),
    "WT": (ENHANCING, NECROSIS, EDEMA),
}


def format_value(value) -> str:
    """A label value as stored: 2 for 2.0, 0.5, 1.0000001 (float32's shortest repr), nan."""
    value = np.asarray(value)[()]
    if isinstance(value, np.floating):
        if np.isfinite(value) and value == np.trunc(value):
            return str(int(value))
        return np.format_float_positional(value, trim="-")
    return str(value.item() if hasattr(value, "item") else value)


def _lookup(mapping: dict[int, int], labels: np.ndarray, convention: str) -> np.ndarray:
    labels = np.asarray(labels)
    values = np.unique(labels)
    # Fractional, non-finite and unknown values are named as stored (0.5 must not read as 0).
    unknown = [v for v in values if not np.isfinite(v) or v != np.trunc(v) or int(v) not in mapping]
    if unknown:
        shown = ", ".join(format_value(v) for v in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise ValueError(
            f"label values [{shown}{more}] are not part of the {convention!r} convention "
            f"(allowed {sorted(mapping)}; stored as {labels.dtype})"
        )
    table = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    return table[labels.astype(np.int64)]


def check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}; use one of {CONVENTIONS}")


def to_internal(labels: np.ndarray, convention: str) -> np.ndarray:
    """Convert a label map from ``convention`` to the internal one (uint8)."""
    check_convention(convention)
    return _lookup(_TO_INTERNAL[convention], labels, convention)


def from_internal(labels: np.ndarray, convention: str) -> np.ndarray:
    """Convert an internal label map to ``convention`` (uint8)."""
    check_convention(convention)
    inverse = {dst: src for src, dst in _TO_INTERNAL[convention].items()}
    return _lookup(inverse, labels, "internal")


def whole_lesion(labels: np.ndarray) -> np.ndarray:
    """Binary whole-lesion mask (enhancing + necrosis) of an internal label map."""
    return np.isin(labels, INTERNAL_GROUPS["whole_lesion"])


# Voxels touching by a face, an edge or a corner are one lesion (BraTS 2023 lesion-wise).
CONNECTIVITY = 26


def lesion_components(mask_or_label: np.ndarray) -> tuple[np.ndarray, int]:
    """``(component map, count)``: the lesions (``CONNECTIVITY``-connected components, cc3d
    label order, 0 background) of the non-zero voxels of a mask or a label map.

    A label map is binarised first: touching enhancing and necrotic voxels are one lesion
    (cc3d on the raw labels would split them by value)."""
    # Imported here: cc3d adds 70 ms (python -X importtime) to every process that reads labels.
    import cc3d

    mask = np.asarray(mask_or_label)
    if mask.dtype != bool:
        mask = mask != 0
    components, count = cc3d.connected_components(mask, connectivity=CONNECTIVITY, return_N=True)
    return components, int(count)


def components_touching(mask: np.ndarray, region: np.ndarray, keep: bool = True) -> np.ndarray:
    """Union of the lesions (``lesion_components``) of ``mask`` that touch the boolean
    ``region`` (``keep``) or do not touch it (``keep=False``)."""
    components, _ = lesion_components(mask)
    touching = np.unique(components[np.asarray(region, dtype=bool) & (components > 0)])
    selected = np.isin(components, touching)
    return (selected if keep else ~selected) & (components > 0)
