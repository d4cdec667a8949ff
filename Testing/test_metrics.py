"""Tests of SpineContextSegLib.evaluation.metrics: overlap, surface distances, S-I axis, slab, identification."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial import cKDTree

from SpineContextSegLib.evaluation import metrics

# --------------------------------------------------------------------------- overlap


def test_overlap_scores_match_hand_computed_values():
    pred = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    gt = np.array([0, 1, 1, 1, 1, 0], dtype=bool)
    # tp = 2, fp = 1, fn = 2
    assert metrics.confusion_counts(pred, gt) == (2, 1, 2)
    assert metrics.dice(pred, gt) == pytest.approx(4 / 7)
    assert metrics.iou(pred, gt) == pytest.approx(2 / 5)
    assert metrics.precision(pred, gt) == pytest.approx(2 / 3)
    assert metrics.recall(pred, gt) == pytest.approx(1 / 2)
    assert metrics.f1(pred, gt) == pytest.approx(4 / 7)


def test_non_boolean_masks_count_nonzero_as_foreground():
    assert metrics.dice(np.array([0, 3, 7]), np.array([0, 1, 0])) == pytest.approx(2 / 3)


def test_empty_mask_conventions():
    empty = np.zeros((3, 3, 3), dtype=bool)
    full = np.ones((3, 3, 3), dtype=bool)
    both_empty = metrics.overlap_scores(*metrics.confusion_counts(empty, empty))
    assert both_empty == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    missed = metrics.overlap_scores(*metrics.confusion_counts(empty, full))
    assert missed == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    invented = metrics.overlap_scores(*metrics.confusion_counts(full, empty))
    assert invented["dice"] == 0.0 and invented["recall"] == 0.0 and invented["precision"] == 0.0
    assert metrics.surface_distances_mm(empty, empty, (1, 1, 1)) == (0.0, 0.0)
    assert metrics.surface_distances_mm(full, empty, (1, 1, 1)) == (math.inf, math.inf)
    assert metrics.surface_distances_mm(empty, full, (1, 1, 1)) == (math.inf, math.inf)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(np.zeros((2, 2)), np.zeros((2, 3)))


# --------------------------------------------------------------------------- surface distances
# Two 10-voxel cubes, the prediction shifted by 3 voxels along numpy axis 0, spacing
# (0.6, 2.0, 3.0) mm: a shift of 1.8 mm is shorter than any lateral step (>= 2 mm), so every
# surface voxel's nearest other-surface voxel lies straight along axis 0. Per cube (488 surface
# voxels): 100 (outer face) + 64 (inner face interior) at 1.8 mm, 36 at 1.2, 36 at 0.6, the rest
# at 0 -> sum 360 mm in each direction; 164/488 of the values are 1.8 mm, so P95 = 1.8 mm.
SPACING = (0.6, 2.0, 3.0)
SURFACE_COUNT = 488
DISTANCE_SUM_MM = 164 * 1.8 + 36 * 1.2 + 36 * 0.6  # 360.0


def _offset_cubes(shape=(24, 40, 24)):
    gt = np.zeros(shape, dtype=bool)
    pred = np.zeros(shape, dtype=bool)
    gt[5:15, 5:15, 5:15] = True
    pred[8:18, 5:15, 5:15] = True
    return pred, gt


def test_offset_cubes_anisotropic_spacing_analytic():
    pred, gt = _offset_cubes()
    hd95, assd = metrics.surface_distances_mm(pred, gt, SPACING)
    assert hd95 == pytest.approx(1.8)
    assert assd == pytest.approx(2 * DISTANCE_SUM_MM / (2 * SURFACE_COUNT))
    assert assd == pytest.approx(360.0 / 488)
    # symmetric
    assert metrics.surface_distances_mm(gt, pred, SPACING) == pytest.approx((hd95, assd))


def test_single_outlier_moves_assd_not_hd95():
    pred, gt = _offset_cubes()
    pred[10, 30, 10] = True  # nearest ground-truth surface voxel: (10, 14, 10), 16 voxels * 2 mm away
    hd95, assd = metrics.surface_distances_mm(pred, gt, SPACING)
    assert hd95 == pytest.approx(1.8)
    assert assd == pytest.approx((2 * DISTANCE_SUM_MM + 32.0) / (2 * SURFACE_COUNT + 1))


def test_region_scores_only_surface_voxels_inside_it():
    pred, gt = _offset_cubes()
    pred[10, 30, 10] = True
    full = (slice(None), slice(None), slice(None))
    # excluding the outlier's rows brings back the plain-cube values
    hd95, assd = metrics.surface_distances_mm(pred, gt, SPACING, region=(slice(None), slice(0, 20), slice(None)))
    assert (hd95, assd) == pytest.approx((1.8, 360.0 / 488))
    assert metrics.surface_distances_mm(pred, gt, SPACING, region=full)[1] > assd
    # layers 14-15: the cut does not create surfaces. Scored: ground truth's top face (36 rim
    # voxels at 0, 64 at 1.8 mm from the prediction's top face at layer 17) and the prediction's
    # side rims (36 at 0 in layer 14, 36 at 0.6 mm above the ground truth's top face in layer 15).
    hd95, assd = metrics.surface_distances_mm(pred, gt, SPACING, region=(slice(14, 16), slice(None), slice(None)))
    assert hd95 == pytest.approx(1.8)
    assert assd == pytest.approx((64 * 1.8 + 36 * 0.6) / 172)


def _reference_surface(mask):
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1]
    all_neighbours = np.ones_like(mask)
    for axis in range(3):
        for shift in (-1, 1):
            all_neighbours &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return inner & ~all_neighbours


def _reference_distances(pred, gt, spacing):
    spacing = np.asarray(spacing)
    pred_points = np.argwhere(_reference_surface(pred)) * spacing
    gt_points = np.argwhere(_reference_surface(gt)) * spacing
    d_pg = cKDTree(gt_points).query(pred_points)[0]
    d_gp = cKDTree(pred_points).query(gt_points)[0]
    hd95 = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    return hd95, np.concatenate([d_pg, d_gp]).mean()


@pytest.mark.parametrize("seed", [0, 1])
def test_surface_distances_agree_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    shape = (30, 60, 50)
    gt = ndimage.binary_opening(ndimage.gaussian_filter(rng.random(shape), 2) > 0.52)
    pred = ndimage.binary_dilation(gt, iterations=1) ^ (rng.random(shape) > 0.97)
    pred[2:4, 50:55, 40:45] = True  # a far false-positive blob: the search box must grow to be exact
    gt[0, 0, 0] = True  # touches the array border (counts as surface)
    spacing = (2.5, 0.7, 1.1)
    hd95, assd = metrics.surface_distances_mm(pred, gt, spacing)
    expected_hd95, expected_assd = _reference_distances(pred, gt, spacing)
    assert hd95 == pytest.approx(expected_hd95)
    assert assd == pytest.approx(expected_assd)


def test_far_apart_masks_grow_the_search_box_until_exact():
    # The 10 mm starting box around the lone voxel holds no target, and the cube's box does not
    # reach it: both directions need the search to grow.
    gt = np.zeros((20, 220, 20), dtype=bool)
    gt[5:15, 5:15, 5:15] = True
    pred = np.zeros_like(gt)
    pred[10, 200, 10] = True
    spacing = (2.0, 0.5, 1.5)
    hd95, assd = metrics.surface_distances_mm(pred, gt, spacing)
    expected_hd95, expected_assd = _reference_distances(pred, gt, spacing)
    assert hd95 == pytest.approx(expected_hd95)
    assert assd == pytest.approx(expected_assd)
    assert metrics.surface_distances_mm(pred, gt, spacing, region=(slice(None), slice(190, None), slice(None))) == pytest.approx(((200 - 14) * 0.5,) * 2)


def test_target_found_beyond_the_search_margin_is_rechecked():
    # The lone predicted voxel's first search box (10 mm) holds a ground-truth voxel 14.2 mm away
    # (in a corner of the box): it is only certain after a second, larger search.
    gt = np.zeros((20, 220, 20), dtype=bool)
    gt[5:15, 5:15, 5:15] = True
    gt[14, 78, 15] = True
    pred = gt.copy()
    pred[10, 60, 10] = True
    spacing = (2.0, 0.5, 1.5)
    expected = math.sqrt((4 * 2.0) ** 2 + (18 * 0.5) ** 2 + (5 * 1.5) ** 2)
    result = metrics.surface_distances_mm(pred, gt, spacing, region=(slice(None), slice(50, 70), slice(None)))
    assert result == pytest.approx((expected, expected))


# --------------------------------------------------------------------------- orientation and slab
PIR = (0, 0, -1, 1, 0, 0, 0, -1, 0)  # columns: i -> posterior, j -> inferior, k -> right
# The header of VerSe sub-verse014 (PIR, oblique by a few degrees).
VERSE014_DIRECTION = (
    0.025837170224020344, -0.13518968515552351, -0.9904828057400059,
    0.9996661645943639, 0.003494179649992972, 0.02559980674986842,
    9.514921214847798e-08, -0.9908135746628243, 0.13523483806983702,
)


def _image(shape_zyx=(4, 5, 6), direction=None):
    image = sitk.Image(list(reversed(shape_zyx)), sitk.sitkUInt8)
    if direction is not None:
        image.SetDirection(direction)
    return image


@pytest.mark.parametrize(
    "direction, expected",
    [
        (None, 0),  # LPS axial stack: slices run S-I
        ((-1, 0, 0, 0, -1, 0, 0, 0, 1), 0),  # RAS axial
        (PIR, 1),  # VerSe sagittal slabs
        (VERSE014_DIRECTION, 1),
        ((0, 0, 1, 0, 1, 0, 1, 0, 0), 2),  # i -> superior
    ],
)
def test_superior_inferior_axis_from_direction_cosines(direction, expected):
    assert metrics.superior_inferior_axis(_image(direction=direction)) == expected


def test_superior_inferior_axis_after_reorienting_to_pir():
    labels = np.zeros((30, 8, 9), dtype=np.uint8)  # LPS: numpy axis 0 is S-I
    labels[5:10, 2:6, 2:7] = 1
    labels[15:20, 2:6, 2:7] = 2
    image = sitk.GetImageFromArray(labels)
    pir = sitk.DICOMOrient(image, "PIR")
    axis = metrics.superior_inferior_axis(pir)
    assert axis == 1
    pir_labels = sitk.GetArrayFromImage(pir)
    assert pir_labels.shape[axis] == 30
    # same slab, counted from the other end because PIR's j runs inferior
    assert metrics.label_slab(labels, 0) == slice(7, 18)
    assert metrics.label_slab(pir_labels, axis) == slice(30 - 18, 30 - 7)


def test_label_slab_keeps_slices_between_extreme_centroids():
    labels = np.zeros((30, 4, 4), dtype=np.int16)
    labels[4:8] = 20  # centroid 5.5
    labels[10:14] = 21  # centroid 11.5
    labels[16:19] = 22  # centroid 17.0
    assert metrics.label_slab(labels, 0) == slice(6, 18)
    assert metrics.label_slab(np.moveaxis(labels, 0, 2), 2) == slice(6, 18)


def test_label_slab_single_label_uses_its_extent_and_empty_raises():
    labels = np.zeros((20, 3, 3), dtype=np.uint8)
    labels[4:9, 1, 1] = 7
    assert metrics.label_slab(labels, 0) == slice(4, 9)
    with pytest.raises(metrics.EmptyLabelMapError):
        metrics.label_slab(np.zeros((4, 4, 4), dtype=np.uint8), 0)


def test_label_centroids():
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0, 0, 0] = 3
    labels[2, 2, 0] = 3
    labels[3, 1, 2] = 5
    centroids = metrics.label_centroids(labels)
    assert sorted(centroids) == [3, 5]
    np.testing.assert_allclose(centroids[3], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(centroids[5], [3.0, 1.0, 2.0])


# --------------------------------------------------------------------------- score_masks

def _labelled_column():
    """Two labelled vertebrae (centroids at slices 6 and 12 -> slab 6..12) in a 24-slice LPS volume."""
    labels = np.zeros((24, 10, 10), dtype=np.uint8)
    labels[4:9, 3:7, 3:7] = 20
    labels[10:15, 3:7, 3:7] = 21
    return labels


def _to_image(array, spacing=(0.8, 0.8, 1.5)):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    return image


@pytest.mark.parametrize("orientation", [None, "PIR"])
def test_slab_ignores_false_positives_on_unlabelled_levels(orientation):
    labels = _labelled_column()
    gt = labels > 0
    outside = gt.copy()
    outside[18:22, 3:7, 3:7] = True  # an unlabelled vertebra below: outside the slab
    inside = gt.copy()
    inside[9, 0:2, 0:10] = True  # 20 false-positive voxels (a rib) inside the slab

    def score(pred):
        images = [_to_image(a) for a in (pred, gt, labels)]
        if orientation:
            images = [sitk.DICOMOrient(image, orientation) for image in images]
        return metrics.score_masks(images[0], images[1], slab_labels_img=images[2])

    result = score(outside)
    assert result["dice"] == 1.0 and result["hd95_mm"] == 0.0
    tp = 6 * 16  # slab = slices 6..12; slice 9 is the disc gap
    assert result["voxels"] == {"tp": tp, "fp": 0, "fn": 0}
    result = score(inside)
    assert result["dice"] == pytest.approx(2 * tp / (2 * tp + 20))
    assert result["precision"] == pytest.approx(tp / (tp + 20))
    assert result["recall"] == 1.0
    assert result["hd95_mm"] > 0.0
    # without the slab, the unlabelled vertebra counts against the prediction
    whole = metrics.score_masks(_to_image(outside), _to_image(gt), use_slab=False)
    assert whole["dice"] == pytest.approx(2 * 160 / (2 * 160 + 64))
    assert whole["slab"] == (0, 24)


def test_slab_labels_outside_ground_truth_are_ignored():
    labels = _labelled_column()
    organ_map = labels.copy()
    organ_map[0:3, 0:2, 0:2] = 90  # e.g. a TotalSegmentator organ far from the vertebrae
    result = metrics.score_masks(_to_image(labels > 0), _to_image(labels > 0), slab_labels_img=_to_image(organ_map))
    assert result["slab"] == (6, 13)


def test_score_masks_rejects_different_grids():
    gt = _to_image(_labelled_column() > 0)
    shifted = _to_image(_labelled_column() > 0)
    shifted.SetOrigin((0.0, 0.0, 5.0))
    with pytest.raises(ValueError, match="grid"):
        metrics.score_masks(shifted, gt)
    with pytest.raises(ValueError, match="size"):
        metrics.score_masks(_to_image(np.zeros((24, 10, 9))), gt)


def test_threshold_baseline_is_strictly_above_hu_on_same_grid():
    ct = sitk.GetImageFromArray(np.array([[[-1000, 200, 201, 1500]]], dtype=np.int16))
    ct.SetSpacing((0.5, 0.6, 2.0))
    ct.SetOrigin((1.0, 2.0, 3.0))
    mask = metrics.threshold_baseline(ct, 200)
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert sitk.GetArrayFromImage(mask).tolist() == [[[0, 0, 1, 1]]]
    assert mask.GetSpacing() == ct.GetSpacing() and mask.GetOrigin() == ct.GetOrigin()


# --------------------------------------------------------------------------- per-vertebra

def test_per_label_dice_hand_computed():
    gt = np.array([1, 1, 2, 2, 0, 0])
    pred = np.array([1, 2, 2, 2, 3, 0])
    result = metrics.per_label_dice(pred, gt)
    assert result == pytest.approx({1: 2 / 3, 2: 4 / 5, 3: 0.0})


def _vertebral_column(count=5, height=8, gap=2, pad=12):
    """Labels 20.. stacked along numpy axis 0, centroids 10 slices (30 mm at 3 mm) apart."""
    labels = np.zeros((pad + count * (height + gap) + pad, 6, 6), dtype=np.uint8)
    for index in range(count):
        start = pad + index * (height + gap)
        labels[start:start + height, 1:5, 1:5] = 20 + index
    return labels


SPACING_COLUMN = (3.0, 1.0, 1.0)


def test_identification_rate_one_mislabelled_vertebra():
    gt = _vertebral_column()
    pred = gt.copy()
    pred[gt == 22] = 26  # L3 called sacrum
    rate, details = metrics.identification_rate(pred, gt, SPACING_COLUMN)
    assert rate == pytest.approx(4 / 5)
    assert details[22]["identified"] is False and details[22]["distance_mm"] == math.inf
    assert all(details[label]["identified"] for label in (20, 21, 23, 24))
    assert details[20]["distance_mm"] == pytest.approx(0.0)


def test_identification_rate_swapped_labels_fail_closest_check():
    gt = _vertebral_column()
    pred = gt.copy()
    pred[gt == 21], pred[gt == 22] = 22, 21
    rate, details = metrics.identification_rate(pred, gt, SPACING_COLUMN)
    assert rate == pytest.approx(3 / 5)
    assert details[21]["closest_gt_label"] == 22
    assert details[21]["distance_mm"] == pytest.approx(30.0)


@pytest.mark.parametrize("shift, identified", [(2, 5), (6, 1)])
def test_identification_rate_shifted_prediction(shift, identified):
    gt = _vertebral_column()
    # 6 mm: all fine; 18 mm: each is closer to the next vertebra's centroid, except the last
    # (no ground-truth vertebra below it, and 18 mm <= 20 mm)
    pred = np.roll(gt, shift, axis=0)
    rate, details = metrics.identification_rate(pred, gt, SPACING_COLUMN)
    assert rate == pytest.approx(identified / 5)
    assert details[20]["distance_mm"] == pytest.approx(3.0 * shift)
    assert details[24]["identified"] is True


@pytest.mark.parametrize("shift, identified", [(6, True), (7, False)])
def test_identification_distance_limit(shift, identified):
    gt = _vertebral_column(count=1)
    pred = np.roll(gt, shift, axis=0)  # 18 mm or 21 mm from the only vertebra
    rate, details = metrics.identification_rate(pred, gt, SPACING_COLUMN, max_distance_mm=20.0)
    assert details[20]["identified"] is identified
    assert rate == (1.0 if identified else 0.0)


def test_identification_rate_without_ground_truth_is_nan():
    rate, details = metrics.identification_rate(np.ones((3, 3, 3), int), np.zeros((3, 3, 3), int), (1, 1, 1))
    assert math.isnan(rate) and details == {}


def test_per_label_hd95_is_zero_for_a_match_the_shift_for_a_moved_label_and_inf_for_a_missing_one():
    gt = np.zeros((30, 12, 12), np.uint8)
    gt[2:8, 3:9, 3:9] = 20
    gt[12:18, 3:9, 3:9] = 21
    gt[22:28, 3:9, 3:9] = 22
    pred = np.zeros_like(gt)
    pred[2:8, 3:9, 3:9] = 20  # exact
    pred[13:19, 3:9, 3:9] = 21  # one slice (3 mm) lower in the array
    hd95 = metrics.per_label_hd95_mm(pred, gt, SPACING_COLUMN)  # 22 is missing
    assert hd95[20] == 0.0
    assert hd95[21] == pytest.approx(3.0)
    assert math.isinf(hd95[22])
    assert set(hd95) == {20, 21, 22}
    # the box shortcut gives what the whole arrays give
    whole, _ = metrics.surface_distances_mm(pred == 21, gt == 21, SPACING_COLUMN)
    assert hd95[21] == pytest.approx(whole)
