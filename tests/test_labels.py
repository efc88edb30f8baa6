import numpy as np
import pytest

from metsflow.core import labels


def brats_map() -> np.ndarray:
    # One voxel of each BraTS value plus background, in a 3D array.
    return np.array([[[0, 1], [2, 3]], [[3, 3], [1, 0]]], dtype=np.int16)


def test_brats_to_internal_swaps_et_and_netc():
    internal = labels.to_internal(brats_map(), "brats")
    expected = np.array([[[0, 3], [2, 1]], [[1, 1], [3, 0]]])
    np.testing.assert_array_equal(internal, expected)
    assert internal.dtype == np.uint8
    assert internal.shape == brats_map().shape


@pytest.mark.parametrize(
    ("brats_value", "internal_value"),
    [(3, labels.ENHANCING), (1, labels.NECROSIS), (2, labels.EDEMA), (0, labels.BACKGROUND)],
)
def test_each_brats_value_maps_to_its_internal_class(brats_value, internal_value):
    assert labels.to_internal(np.array([brats_value]), "brats")[0] == internal_value
    assert labels.from_internal(np.array([internal_value]), "brats")[0] == brats_value


def test_round_trips_are_identity():
    brats = brats_map()
    np.testing.assert_array_equal(
        labels.from_internal(labels.to_internal(brats, "brats"), "brats"), brats
    )
    internal = np.array([0, 1, 2, 3, 1], dtype=np.uint8)
    np.testing.assert_array_equal(
        labels.to_internal(labels.from_internal(internal, "brats"), "brats"), internal
    )


def test_internal_convention_is_identity():
    internal = np.array([0, 1, 2, 3], dtype=np.uint8)
    np.testing.assert_array_equal(labels.to_internal(internal, "internal"), internal)
    np.testing.assert_array_equal(labels.from_internal(internal, "internal"), internal)


@pytest.mark.parametrize("bad", [np.array([0, 4]), np.array([-1, 1]), np.array([1.5, 2.0])])
def test_unknown_values_raise_naming_them(bad):
    with pytest.raises(ValueError, match="not part of"):
        labels.to_internal(bad, "brats")
    with pytest.raises(ValueError, match="not part of"):
        labels.from_internal(bad, "brats")


def test_unknown_convention_raises():
    with pytest.raises(ValueError, match="unknown label convention"):
        labels.to_internal(np.array([0]), "nnunet")


def test_groups_membership():
    assert labels.BRATS_GROUPS["ET"] == (labels.ENHANCING,)
    assert set(labels.BRATS_GROUPS["TC"]) == {labels.ENHANCING, labels.NECROSIS}
    assert set(labels.BRATS_GROUPS["WT"]) == {labels.ENHANCING, labels.NECROSIS, labels.EDEMA}
    assert set(labels.INTERNAL_GROUPS["whole_lesion"]) == {labels.ENHANCING, labels.NECROSIS}
    assert labels.EDEMA not in labels.INTERNAL_GROUPS["whole_lesion"]
    # BraTS regions are nested: ET within TC within WT.
    assert set(labels.BRATS_GROUPS["ET"]) < set(labels.BRATS_GROUPS["TC"])
    assert set(labels.BRATS_GROUPS["TC"]) < set(labels.BRATS_GROUPS["WT"])


def test_whole_lesion_counts_brats_et_and_netc_but_not_edema():
    internal = labels.to_internal(np.array([0, 1, 2, 3]), "brats")
    np.testing.assert_array_equal(labels.whole_lesion(internal), [False, True, False, True])


def test_lesion_components_joins_corner_neighbours_and_touching_labels():
    volume = np.zeros((6, 6, 6), dtype=np.uint8)
    volume[1, 1, 1] = labels.ENHANCING
    volume[2, 2, 2] = labels.NECROSIS  # touches the first voxel by a corner only
    volume[4, 4, 4] = labels.EDEMA  # apart: a second lesion
    components, count = labels.lesion_components(volume)
    assert count == 2
    assert components[1, 1, 1] == components[2, 2, 2] != components[4, 4, 4]
    assert labels.lesion_components(volume.astype(bool))[1] == 2
    assert labels.lesion_components(np.zeros((3, 3, 3)))[1] == 0
