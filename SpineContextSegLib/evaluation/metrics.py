"""Segmentation scores: overlap, surface distances, the labelled slab, vertebra identification.

Plain functions on numpy arrays (axis order of ``SimpleITK.GetArrayFromImage``, i.e.
``(k, j, i)``) plus two thin wrappers on SimpleITK images (:func:`score_masks`,
:func:`threshold_baseline`). Distances are in millimetres; ``spacing_mm`` is always
given in the same numpy axis order as the arrays, i.e. ``image.GetSpacing()[::-1]``.

The scoring method (slab Dice on partly labelled CT, HU > 200 threshold for scale)
is described in ``docs/evaluation.md``.

Conventions for empty masks (a ratio whose denominator is 0):

* Dice, IoU, precision, recall and F1 are 1.0 when prediction and ground truth are
  both empty (nothing to find, nothing claimed), and 0.0 in every other 0/0 case
  (e.g. precision of an empty prediction against a non-empty ground truth).
* HD95 and ASSD are 0.0 when both masks are empty and ``inf`` when exactly one is.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from SpineContextSegLib.io.grids import check_same_grid

if TYPE_CHECKING:  # SimpleITK is imported where it is used; annotations only here.
    import SimpleITK as sitk

#: Initial search margin (mm) around surface points when looking for the nearest other surface.
#: Only a speed setting: the search grows until every distance is exact.
_INITIAL_SEARCH_MARGIN_MM = 10.0


# --------------------------------------------------------------------------------------
# Overlap
# --------------------------------------------------------------------------------------

def _as_bool_pair(pred: np.ndarray, gt: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.dtype != bool:
        pred = pred != 0
    if gt.dtype != bool:
        gt = gt != 0
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    return pred, gt


def confusion_counts(pred: np.ndarray, gt: np.ndarray) -> Tuple[int, int, int]:
    """Voxel counts of true positives, false positives and false negatives.

    Parameters
    ----------
    pred, gt : ndarray, any shape (the same for both)
        Binary masks; any non-zero value counts as foreground.

    Returns
    -------
    tp, fp, fn : int
        Voxels in both, in ``pred`` only, in ``gt`` only.
    """
    pred, gt = _as_bool_pair(pred, gt)
    tp = int(np.count_nonzero(np.logical_and(pred, gt)))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(gt)) - tp


def _ratio(numerator: float, denominator: float, both_empty: bool) -> float:
    if denominator == 0:
        return 1.0 if both_empty else 0.0
    return float(numerator) / float(denominator)


def overlap_scores(tp: int, fp: int, fn: int) -> Dict[str, float]:
    """Dice, IoU, precision, recall and F1 from voxel counts.

    Returns
    -------
    dict
        ``dice`` = 2TP / (2TP + FP + FN), ``iou`` = TP / (TP + FP + FN),
        ``precision`` = TP / (TP + FP), ``recall`` = TP / (TP + FN),
        ``f1`` = harmonic mean of precision and recall (equal to Dice for binary
        masks; kept because the papers report both). 0/0 is 1.0 when both masks are
        empty, else 0.0 (see the module docstring).
    """
    both_empty = tp == 0 and fp == 0 and fn == 0
    precision = _ratio(tp, tp + fp, both_empty)
    recall = _ratio(tp, tp + fn, both_empty)
    f1 = 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient 2|P∩G| / (|P| + |G|) of two binary masks; 1.0 when both are empty."""
    return overlap_scores(*confusion_counts(pred, gt))["dice"]


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union |P∩G| / |P∪G|; 1.0 when both masks are empty."""
    return overlap_scores(*confusion_counts(pred, gt))["iou"]


def precision(pred: np.ndarray, gt: np.ndarray) -> float:
    """|P∩G| / |P|; 1.0 when both masks are empty, 0.0 when only the prediction is."""
    return overlap_scores(*confusion_counts(pred, gt))["precision"]


def recall(pred: np.ndarray, gt: np.ndarray) -> float:
    """|P∩G| / |G| (sensitivity); 1.0 when both masks are empty, 0.0 when only the ground truth is."""
    return overlap_scores(*confusion_counts(pred, gt))["recall"]


def f1(pred: np.ndarray, gt: np.ndarray) -> float:
    """Harmonic mean of precision and recall (equals :func:`dice` on binary masks)."""
    return overlap_scores(*confusion_counts(pred, gt))["f1"]


# --------------------------------------------------------------------------------------
# Surface distances
# --------------------------------------------------------------------------------------

def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with at least one face neighbour (6-connectivity in 3D) in the background.

    Voxels on the array border count as surface (the outside of the array is background).

    Parameters
    ----------
    mask : ndarray of bool, any dimension

    Returns
    -------
    ndarray of bool, same shape
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _bounding_box(mask: np.ndarray, margin: int = 0) -> Optional[Tuple[slice, ...]]:
    """Smallest box holding every non-zero voxel, grown by ``margin`` voxels and clipped; None if empty."""
    box = []
    for axis in range(mask.ndim):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        occupied = np.flatnonzero(np.any(mask, axis=other_axes))
        if occupied.size == 0:
            return None
        box.append(slice(max(int(occupied[0]) - margin, 0), min(int(occupied[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _distances_to_surface_mm(points: np.ndarray, target_surface: np.ndarray, spacing_mm: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance (mm) from each voxel in ``points`` (n, ndim) to the nearest True voxel of ``target_surface``.

    The distance transform runs only on the box around the pending points grown by a
    search margin. A distance no longer than the margin is exact (every voxel outside
    the box is farther than the margin); the others are redone once with the margin set
    to the largest distance found, which bounds their true distance.
    """
    shape = np.asarray(target_surface.shape)
    distances = np.empty(len(points), dtype=np.float64)
    pending = np.arange(len(points))
    margin_mm = _INITIAL_SEARCH_MARGIN_MM
    while pending.size:
        pending_points = points[pending]
        pad = np.ceil(margin_mm / spacing_mm).astype(np.intp)
        low = np.maximum(pending_points.min(axis=0) - pad, 0)
        high = np.minimum(pending_points.max(axis=0) + 1 + pad, shape)
        covers_everything = bool(np.all(low == 0) and np.all(high == shape))
        targets = target_surface[tuple(slice(a, b) for a, b in zip(low, high))]
        if not targets.any():
            margin_mm *= 4.0  # terminates: the whole array holds a target
            continue
        field = ndimage.distance_transform_edt(~targets, sampling=spacing_mm)
        found = field[tuple((pending_points - low).T)]
        exact = np.ones(found.shape, dtype=bool) if covers_everything else found <= margin_mm
        distances[pending[exact]] = found[exact]
        if not exact.all():
            margin_mm = max(float(found[~exact].max()), 2.0 * margin_mm)
        pending = pending[~exact]
    return distances


def surface_distances_mm(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    region: Optional[Tuple[slice, ...]] = None,
) -> Tuple[float, float]:
    """Symmetric 95th-percentile Hausdorff distance and average symmetric surface distance.

    Surface voxels come from a 6-connected erosion of each full mask (so cutting a mask
    at ``region`` does not create surfaces); distances are Euclidean between voxel
    centres with anisotropic ``spacing_mm``, computed by distance transforms on boxes
    around the masks, never on the whole array.

    Parameters
    ----------
    pred, gt : ndarray, 3D (any dimension works), same shape
        Binary masks (non-zero = foreground), numpy axis order ``(k, j, i)``.
    spacing_mm : sequence of float, length ``pred.ndim``
        Voxel size in mm per numpy axis, i.e. ``image.GetSpacing()[::-1]``.
    region : tuple of slices, optional
        Only surface voxels inside this box are scored (their nearest point on the
        other surface may lie outside it). Default: the whole array.

    Returns
    -------
    hd95_mm : float
        ``max(P95(d(P→G)), P95(d(G→P)))``, the usual symmetric HD95 (MONAI, DeepMind
        surface-distance), where ``d(P→G)`` are distances from each scored surface voxel
        of the prediction to the nearest ground-truth surface voxel.
    assd_mm : float
        Mean of ``d(P→G)`` and ``d(G→P)`` pooled together.

    Both are 0.0 when both masks are empty, ``inf`` when exactly one is empty, and NaN
    when both are non-empty but neither has a surface voxel inside ``region``; when
    only one has, only that direction is scored.
    """
    pred, gt = _as_bool_pair(pred, gt)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (pred.ndim,) or not np.all(spacing > 0):
        raise ValueError(f"spacing_mm must hold {pred.ndim} positive numbers, got {tuple(spacing_mm)}")
    pred_any, gt_any = bool(pred.any()), bool(gt.any())
    if not pred_any and not gt_any:
        return 0.0, 0.0
    if not pred_any or not gt_any:
        return math.inf, math.inf

    # Work on the union's box; one voxel of margin keeps the erosion exact at its edges.
    box = _bounding_box(pred | gt, margin=1)
    offset = np.array([s.start for s in box])
    pred_surface = surface_voxels(pred[box])
    gt_surface = surface_voxels(gt[box])

    scored = np.ones(pred_surface.shape, dtype=bool)
    if region is not None:
        if len(region) != pred.ndim:
            raise ValueError(f"region must hold {pred.ndim} slices, got {len(region)}")
        scored[...] = False
        local = []
        for axis, (sl, start) in enumerate(zip(region, offset)):
            first, last, step = sl.indices(pred.shape[axis])
            if step != 1:
                raise ValueError("region slices must have step 1")
            local.append(slice(max(first - start, 0), max(last - start, 0)))
        scored[tuple(local)] = True

    directed = []
    for query_surface, target_surface in ((pred_surface, gt_surface), (gt_surface, pred_surface)):
        points = np.argwhere(query_surface & scored)
        if len(points):
            directed.append(_distances_to_surface_mm(points, target_surface, spacing))
    if not directed:
        return math.nan, math.nan
    hd95 = max(float(np.percentile(d, 95)) for d in directed)
    pooled = np.concatenate(directed)
    return hd95, float(pooled.mean())


# --------------------------------------------------------------------------------------
# Orientation and the labelled slab
# --------------------------------------------------------------------------------------

class EmptyLabelMapError(ValueError):
    """The label map has no labelled voxel, so no slab can be placed (raised by :func:`label_slab`)."""


def superior_inferior_axis(image: "sitk.Image") -> int:
    """The numpy axis of ``sitk.GetArrayFromImage(image)`` closest to the patient's S-I direction.

    Read from the direction cosines, not from the array order: VerSe files are often
    stored as sagittal slabs (PIR), where S-I runs along numpy axis 1, not 0.

    Parameters
    ----------
    image : SimpleITK.Image, 3D

    Returns
    -------
    int
        0, 1 or 2 in numpy ``(k, j, i)`` order. With an exactly 45° oblique axis the
        first index axis in ``(i, j, k)`` order wins.
    """
    dimension = image.GetDimension()
    if dimension != 3:
        raise ValueError(f"expected a 3D image, got {dimension}D")
    # Column c of the direction matrix is index axis c in LPS; row 2 holds the S components.
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    index_axis = int(np.argmax(np.abs(direction[2, :])))
    return 2 - index_axis


def label_centroids(labels: np.ndarray) -> Dict[int, np.ndarray]:
    """Centroid of every positive label, in voxel index units.

    Parameters
    ----------
    labels : ndarray of int, any shape
        Label map; values <= 0 are background.

    Returns
    -------
    dict
        ``{label: array of shape (labels.ndim,)}``: mean voxel index per numpy axis.
        Multiply by ``spacing_mm`` for millimetres relative to voxel 0 (distances are
        then correct; add origin and direction for patient coordinates).
    """
    labels = np.asarray(labels)
    flat = labels.reshape(-1)
    foreground = np.flatnonzero(flat > 0)  # indices of labelled voxels only: memory ~ foreground
    if foreground.size == 0:
        return {}
    values = flat[foreground].astype(np.intp)
    counts = np.bincount(values)
    present = np.flatnonzero(counts)
    coordinates = np.unravel_index(foreground, labels.shape)
    sums = np.stack([np.bincount(values, weights=c, minlength=counts.size) for c in coordinates], axis=1)
    return {int(label): sums[label] / counts[label] for label in present}


def label_slab(labels: np.ndarray, si_axis: int) -> slice:
    """Slices along ``si_axis`` between the highest and the lowest label centroid (docs/evaluation.md).

    Unlabelled neighbouring levels (a visible but unlabelled T12 or sacrum) then fall
    outside the slab.

    Parameters
    ----------
    labels : ndarray of int, 3D
        Per-vertebra label map (values <= 0 are background), numpy axis order.
    si_axis : int
        Numpy axis closest to superior-inferior (:func:`superior_inferior_axis`).

    Returns
    -------
    slice
        ``slice(start, stop)`` of the slices whose index lies in
        ``[min centroid, max centroid]``. With a single label, or centroids closer than
        one slice, the extent of the labelled voxels along ``si_axis`` instead.

    Raises
    ------
    EmptyLabelMapError
        If ``labels`` has no positive voxel (a ValueError).
    """
    labels = np.asarray(labels)
    centroids = label_centroids(labels)
    if not centroids:
        raise EmptyLabelMapError("the label map has no labelled voxel inside the ground truth: cannot place the slab")
    along = np.array([c[si_axis] for c in centroids.values()])
    start, stop = int(math.ceil(along.min() - 1e-9)), int(math.floor(along.max() + 1e-9)) + 1
    if len(centroids) < 2 or stop <= start:
        other_axes = tuple(a for a in range(labels.ndim) if a != si_axis)
        occupied = np.flatnonzero(np.any(labels > 0, axis=other_axes))
        start, stop = int(occupied[0]), int(occupied[-1]) + 1
    return slice(start, stop)


# --------------------------------------------------------------------------------------
# Scoring SimpleITK images
# --------------------------------------------------------------------------------------

def score_masks(
    pred_img: "sitk.Image",
    gt_img: "sitk.Image",
    *,
    slab_labels_img: Optional["sitk.Image"] = None,
    use_slab: bool = True,
    surface_distances: bool = True,
) -> dict:
    """Slab Dice and friends of a predicted spine mask against the ground truth.

    Parameters
    ----------
    pred_img, gt_img : SimpleITK.Image, 3D, same voxel grid
        Binary masks (non-zero = spine).
    slab_labels_img : SimpleITK.Image, optional
        Per-vertebra label map whose centroids place the slab; default ``gt_img``.
        Only its voxels inside the ground-truth mask count, so a full multi-organ map
        (TotalSegmentator) can be passed as is.
    use_slab : bool
        False scores the whole volume.
    surface_distances : bool
        False skips HD95/ASSD (returned as NaN), e.g. for a quick baseline.

    Returns
    -------
    dict
        ``dice``, ``iou``, ``precision``, ``recall``, ``f1`` (floats), ``hd95_mm``,
        ``assd_mm`` (mm; surfaces scored inside the slab), ``slab`` ``(start, stop)``
        along ``si_axis`` (numpy axis), ``si_axis``, and ``voxels``
        ``{"tp", "fp", "fn"}`` counted inside the slab (to pool cases).

    Raises
    ------
    ValueError
        If the images are not on the same grid, or the slab label map is empty.
    """
    import SimpleITK as sitk

    check_same_grid(pred_img, gt_img)
    gt = sitk.GetArrayViewFromImage(gt_img) != 0
    pred = sitk.GetArrayViewFromImage(pred_img) != 0
    si_axis = superior_inferior_axis(gt_img)
    if use_slab:
        if slab_labels_img is None:
            slab_labels = gt.astype(np.uint8)
        else:
            check_same_grid(slab_labels_img, gt_img, what="slab label map")
            slab_labels = np.where(gt, sitk.GetArrayViewFromImage(slab_labels_img), 0)
        slab = label_slab(slab_labels, si_axis)
    else:
        slab = slice(0, gt.shape[si_axis])
    region = tuple(slab if axis == si_axis else slice(None) for axis in range(gt.ndim))

    tp, fp, fn = confusion_counts(pred[region], gt[region])
    scores: dict = overlap_scores(tp, fp, fn)
    if surface_distances:
        spacing_mm = tuple(gt_img.GetSpacing())[::-1]
        scores["hd95_mm"], scores["assd_mm"] = surface_distances_mm(pred, gt, spacing_mm, region=region)
    else:
        scores["hd95_mm"] = scores["assd_mm"] = math.nan
    scores["slab"] = (slab.start, slab.stop)
    scores["si_axis"] = si_axis
    scores["voxels"] = {"tp": tp, "fp": fp, "fn": fn}
    return scores


def threshold_baseline(ct_img: "sitk.Image", hu: float = 200.0) -> "sitk.Image":
    """The plain-threshold reference mask: uint8, 1 where the CT is above ``hu`` Hounsfield units.

    Quoted beside every score for scale (docs/evaluation.md). Same grid as ``ct_img``.
    """
    import SimpleITK as sitk

    mask = sitk.GetImageFromArray((sitk.GetArrayViewFromImage(ct_img) > hu).astype(np.uint8))
    mask.CopyInformation(ct_img)
    return mask


# --------------------------------------------------------------------------------------
# Per-vertebra scores (vertebra labelling)
# --------------------------------------------------------------------------------------

def per_label_dice(pred_labels: np.ndarray, gt_labels: np.ndarray) -> Dict[int, float]:
    """Dice of every label, comparing ``pred_labels == l`` with ``gt_labels == l``.

    Parameters
    ----------
    pred_labels, gt_labels : ndarray of int, same shape
        Label maps; values <= 0 are background.

    Returns
    -------
    dict
        ``{label: dice}`` for every positive label present in either map (a label only
        in the prediction scores 0.0).
    """
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from ground-truth shape {gt_labels.shape}")
    foreground = (pred_labels > 0) | (gt_labels > 0)
    pred_values = np.where(pred_labels[foreground] > 0, pred_labels[foreground], 0).astype(np.intp)
    gt_values = np.where(gt_labels[foreground] > 0, gt_labels[foreground], 0).astype(np.intp)
    size = int(max(pred_values.max(initial=0), gt_values.max(initial=0))) + 1
    pred_counts = np.bincount(pred_values, minlength=size)
    gt_counts = np.bincount(gt_values, minlength=size)
    overlap_counts = np.bincount(gt_values[gt_values == pred_values], minlength=size)
    return {
        label: 2.0 * overlap_counts[label] / (pred_counts[label] + gt_counts[label])
        for label in range(1, size)
        if pred_counts[label] + gt_counts[label] > 0
    }


def per_label_hd95_mm(pred_labels: np.ndarray, gt_labels: np.ndarray, spacing_mm: Sequence[float]) -> Dict[int, float]:
    """Symmetric HD95 (mm, :func:`surface_distances_mm`) of every ground-truth label.

    Parameters
    ----------
    pred_labels, gt_labels : ndarray of int, same shape, numpy axis order ``(k, j, i)``
        Label maps; values <= 0 are background.
    spacing_mm : sequence of float
        Voxel size per numpy axis, mm.

    Returns
    -------
    dict
        ``{label: hd95_mm}`` for every positive label of ``gt_labels``; ``inf`` when the
        prediction does not have that label.
    """
    from scipy import ndimage

    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from ground-truth shape {gt_labels.shape}")
    result: Dict[int, float] = {}
    size = int(max(pred_labels.max(initial=0), gt_labels.max(initial=0))) + 1
    pred_boxes = ndimage.find_objects(np.clip(pred_labels, 0, None).astype(np.intp), max_label=size)
    gt_boxes = ndimage.find_objects(np.clip(gt_labels, 0, None).astype(np.intp), max_label=size)
    for label, gt_box in enumerate(gt_boxes, start=1):
        if gt_box is None:
            continue
        pred_box = pred_boxes[label - 1]
        if pred_box is None:
            result[label] = math.inf
            continue
        # both masks inside the union of their boxes plus a voxel (surfaces stay exact there)
        box = tuple(slice(max(0, min(a.start, b.start) - 1), max(a.stop, b.stop) + 1) for a, b in zip(gt_box, pred_box))
        result[label], _ = surface_distances_mm(pred_labels[box] == label, gt_labels[box] == label, spacing_mm)
    return result


def identification_rate(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    spacing_mm: Sequence[float],
    max_distance_mm: float = 20.0,
) -> Tuple[float, Dict[int, dict]]:
    """VerSe identification rate: the share of ground-truth vertebrae found at the right place.

    Following the VerSe benchmark's reference code (anjany/verse,
    ``utils/eval_utilities.get_hits``): ground-truth vertebra ``v`` is identified when
    the prediction has label ``v``, its predicted centroid is at most
    ``max_distance_mm`` from the ground-truth centroid of ``v``, and of the
    ground-truth centroids of the labels present in both maps, that of ``v`` is the
    closest to the predicted centroid. Predicted labels absent from the ground truth
    are not penalised.

    Parameters
    ----------
    pred_labels, gt_labels : ndarray of int, 3D, same shape
        Per-vertebra label maps (VerSe ids; values <= 0 are background).
    spacing_mm : sequence of float
        Voxel size per numpy axis (``image.GetSpacing()[::-1]``).
    max_distance_mm : float
        Largest accepted centroid error (20 mm in VerSe).

    Returns
    -------
    rate : float
        Identified / ground-truth vertebrae; NaN when the ground truth has none.
    details : dict
        ``{gt_label: {"identified": bool, "distance_mm": float (inf when the label was
        not predicted), "closest_gt_label": int or None}}``.
    """
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from ground-truth shape {gt_labels.shape}")
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    gt_centroids = {label: c * spacing for label, c in label_centroids(gt_labels).items()}
    pred_centroids = {label: c * spacing for label, c in label_centroids(pred_labels).items()}
    candidates = sorted(set(gt_centroids) & set(pred_centroids))
    candidate_positions = np.array([gt_centroids[label] for label in candidates]).reshape(-1, spacing.size)

    details: Dict[int, dict] = {}
    for label in sorted(gt_centroids):
        if label not in pred_centroids:
            details[label] = {"identified": False, "distance_mm": math.inf, "closest_gt_label": None}
            continue
        to_candidates = np.linalg.norm(candidate_positions - pred_centroids[label], axis=1)
        closest = candidates[int(np.argmin(to_candidates))]
        distance = float(np.linalg.norm(pred_centroids[label] - gt_centroids[label]))
        details[label] = {
            "identified": bool(closest == label and distance <= max_distance_mm),
            "distance_mm": distance,
            "closest_gt_label": int(closest),
        }
    if not details:
        return math.nan, details
    rate = sum(d["identified"] for d in details.values()) / len(details)
    return float(rate), details
