"""Spine geometry for downstream tools: the region of interest (``--roi``) and the centreline (``--centreline``).

Both are computed from the mask on the input's exact grid and written as JSON, atomically
(temporary file beside the target, renamed at the end). Coordinates are the DICOM/ITK
patient frame, **LPS millimetres** (x = patient left, y = posterior, z = superior), like
the STL output; voxel indices are SimpleITK's (i, j, k) = (x, y, z) index order, 0-based.

Region of interest (:func:`spine_roi`)
    The box around every spine voxel (whole voxels, not their centres), grown by
    ``margin_mm`` on every side, with its edges along the image's own axes (its direction
    cosines), so it is the tightest box a model working on the image's grid can crop:
    ``centre_lps_mm``, ``size_mm`` (along ``axes``), ``axes`` (the unit vectors of the
    image's index axes i, j, k in LPS), ``corners_lps_mm`` and its LPS-axis-aligned extent
    (``lps_min_mm``/``lps_max_mm``); and the same box in voxel indices (``index`` start and
    ``size``, ``index_max`` inclusive), rounded outwards and clipped to the image
    (``clipped`` says whether the margin reached beyond it). ``segments`` gives each
    label's own box (vertebrae task: one per vertebra).

Centreline (:func:`spine_centreline`)
    Points along the vertebral bodies' centreline (``points_lps_mm``, inferior to superior,
    one per ``step_mm`` of height) from :func:`SpineContextSegLib.anatomy.centreline.body_centreline`
    on a ``step_mm`` isotropic grid; each vertebral body found (``vertebrae``: centre and
    tilt, with its name for a vertebrae-task label map); and the curvature in the sagittal
    (y-z) and coronal (x-z) planes from the vertebrae's tilts. In each plane a tilt is the
    column's angle to the superior axis: ``atan(dy/dz)``, positive when the column runs
    posteriorly going up; ``atan(dx/dz)``, positive when it runs to the patient's left
    going up. Reported per plane: ``end_angle_deg``, top minus bottom vertebra's tilt (a
    Cobb-like angle between the end vertebrae, signed); ``cobb_like_angle_deg``, the largest
    tilt difference between any two vertebrae (>= |end angle|; the same for a single curve);
    ``max_curvature_deg_per_cm``, the largest tilt change between neighbouring vertebrae per
    cm of projected length, and where. The sacrum (vertebrae task) is left out. These are
    measurements on the mask for orientation and follow-up, not a diagnostic Cobb angle
    (which is measured on endplates chosen by a reader).
"""
from __future__ import annotations

import itertools
import json
import math
import os
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import numpy as np

from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.io.files import atomic_output, output_suffix

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

    from SpineContextSegLib.labels import LabelInfo

ROI_FORMAT = "spinecontextseg-roi/1"
CENTRELINE_FORMAT = "spinecontextseg-centreline/1"
#: Default margin of ``--roi`` (mm on every side).
DEFAULT_ROI_MARGIN_MM = 10.0
#: Working grid spacing of the centreline (mm, isotropic) and the step between its points.
CENTRELINE_STEP_MM = 2.0
#: Runs of vertebral-body slices shorter than this (mm) are not counted as a vertebra.
MIN_BODY_RUN_MM = 6.0
#: Vertebrae whose centres the parabola giving a vertebra's tilt is fitted to (least squares):
#: five halve the error of three on 3 mm masks (centroids move by voxel steps).
TILT_FIT_VERTEBRAE = 5


def check_json_path(path: str, option: str) -> None:
    """Raise ``output_format`` now, before any computing, unless ``path`` ends in ``.json``."""
    if output_suffix(path).lower() != ".json":
        raise SegmentationError("output_format", f"{option} writes JSON: the file name must end in .json, not '{output_suffix(path) or path}'.")


def _geometry(image: "sitk.Image"):
    return (
        np.array(image.GetOrigin(), dtype=float),
        np.array(image.GetSpacing(), dtype=float),
        np.array(image.GetDirection(), dtype=float).reshape(3, 3),
        np.array(image.GetSize(), dtype=int),
    )


def _round(values, digits: int = 3):
    return [round(float(v), digits) for v in np.asarray(values, dtype=float).reshape(-1)]


def _box(low_ijk: np.ndarray, high_ijk: np.ndarray, image: "sitk.Image", margin_mm: float) -> Dict[str, object]:
    """The box of voxels ``low..high`` (inclusive, i j k) grown by ``margin_mm``, physical and in indices."""
    origin, spacing, direction, size = _geometry(image)
    margin_voxels = margin_mm / spacing
    edge_low = (low_ijk - 0.5) * spacing - margin_mm  # mm from the origin along each index axis
    edge_high = (high_ijk + 0.5) * spacing + margin_mm
    centre = origin + direction @ (0.5 * (edge_low + edge_high))
    corners = np.array([origin + direction @ np.array(c) for c in itertools.product(*zip(edge_low, edge_high))])
    first = np.floor(low_ijk - margin_voxels + 1e-6).astype(int)  # every voxel the box overlaps
    last = np.ceil(high_ijk + margin_voxels - 1e-6).astype(int)
    first_clipped, last_clipped = np.maximum(first, 0), np.minimum(last, size - 1)
    return {
        "centre_lps_mm": _round(centre),
        "size_mm": _round(edge_high - edge_low),
        "axes": [_round(direction[:, axis], 6) for axis in range(3)],
        "corners_lps_mm": [_round(c) for c in corners],
        "lps_min_mm": _round(corners.min(axis=0)),
        "lps_max_mm": _round(corners.max(axis=0)),
        "index": [int(v) for v in first_clipped],
        "size": [int(v) for v in last_clipped - first_clipped + 1],
        "index_max": [int(v) for v in last_clipped],
        "clipped": bool(np.any(first < 0) or np.any(last > size - 1)),
    }


def spine_roi(mask: "sitk.Image", *, margin_mm: float = DEFAULT_ROI_MARGIN_MM, labels: Optional[Sequence["LabelInfo"]] = None) -> Dict[str, object]:
    """The spine's bounding box (see the module docstring) as a JSON-ready dict.

    Parameters
    ----------
    mask : SimpleITK.Image
        Label map (non-zero = spine) on the input's grid.
    margin_mm : float
        Added on every side, mm (>= 0).
    labels : sequence of LabelInfo, optional
        Names of the label values, for ``segments``.

    Raises
    ------
    SegmentationError
        ``no_spine_found`` for an empty mask.
    """
    import SimpleITK as sitk
    from scipy import ndimage

    margin_mm = float(margin_mm)
    if not (math.isfinite(margin_mm) and margin_mm >= 0):
        raise ValueError(f"margin_mm must be a finite number >= 0, got {margin_mm!r}")
    array = sitk.GetArrayViewFromImage(mask)
    values = np.asarray(array)
    if not np.issubdtype(values.dtype, np.integer):
        values = values.astype(np.int32)
    objects = ndimage.find_objects(values)  # one box per value 1..max, without copying a uint8 map
    present = [value for value, box in enumerate(objects, start=1) if box is not None]
    if not present:
        raise SegmentationError("no_spine_found", "The mask is empty: there is no spine to put a box around.")

    def ijk_bounds(boxes) -> tuple:
        low = np.min([[b[2].start, b[1].start, b[0].start] for b in boxes], axis=0)
        high = np.max([[b[2].stop - 1, b[1].stop - 1, b[0].stop - 1] for b in boxes], axis=0)
        return low.astype(float), high.astype(float)

    names = {int(label.value): label.name for label in (labels or [])}
    origin, spacing, direction, size = _geometry(mask)
    roi: Dict[str, object] = {
        "format": ROI_FORMAT,
        "space": "LPS",
        "units": "mm",
        "margin_mm": margin_mm,
        "image": {"size": [int(v) for v in size], "spacing_mm": _round(spacing, 6), "origin_lps_mm": _round(origin, 6), "direction": _round(direction.reshape(-1), 8)},
    }
    roi.update(_box(*ijk_bounds([objects[v - 1] for v in present]), mask, margin_mm))
    roi["segments"] = [
        {"value": int(v), "name": names.get(v, str(v)), **_box(*ijk_bounds([objects[v - 1]]), mask, margin_mm)} for v in present
    ]
    return roi


def write_json(data: Dict[str, object], path: str) -> str:
    """Write ``data`` as indented JSON, atomically; return the absolute path."""
    text = json.dumps(data, indent=1) + "\n"
    with atomic_output(path) as temp_path:
        with open(temp_path, "w", encoding="utf-8") as handle:
            handle.write(text)
    return os.path.abspath(path)


def write_roi_json(mask: "sitk.Image", path: str, *, margin_mm: float = DEFAULT_ROI_MARGIN_MM, labels: Optional[Sequence["LabelInfo"]] = None) -> str:
    """:func:`spine_roi` written to ``path`` (``.json``), atomically; returns the absolute path."""
    check_json_path(path, "--roi")
    return write_json(spine_roi(mask, margin_mm=margin_mm, labels=labels), path)


# --------------------------------------------------------------------------- centreline
def _spine_only(array: np.ndarray) -> np.ndarray:
    """Vertebrae of a label map: non-zero, without the sacrum when the map holds VerSe ids."""
    from SpineContextSegLib.labels import SACRUM_ID

    spine = array != 0
    if array.size and int(array.max()) > 1:
        spine &= array != SACRUM_ID
    return spine


def _body_runs(body_slice: np.ndarray, step_mm: float) -> List[tuple]:
    """(first, last) slice of every run of body slices at least :data:`MIN_BODY_RUN_MM` long: one per vertebra."""
    runs = []
    index = np.flatnonzero(body_slice)
    if index.size:
        for run in np.split(index, np.flatnonzero(np.diff(index) > 1) + 1):
            if (run[-1] - run[0] + 1) * step_mm >= MIN_BODY_RUN_MM:
                runs.append((int(run[0]), int(run[-1])))
    return runs


def _body_centroid(thickness: np.ndarray, first: int, last: int, step_mm: float) -> np.ndarray:
    """(x, y, z) mm from voxel 0 of one vertebral body: the voxels of slices ``first..last`` at
    least 60 % as thick as their slice's thickest (the body), weighted by thickness squared."""
    block = thickness[first : last + 1]
    peak = block.reshape(block.shape[0], -1).max(axis=1)
    threshold = np.where(peak > 0, 0.6 * peak, np.inf)
    z, y, x = np.nonzero(block >= threshold[:, None, None])
    weight = block[z, y, x].astype(np.float64) ** 2
    total = float(weight.sum()) or 1.0
    return np.array([np.sum(x * weight) / total, np.sum(y * weight) / total, np.sum((z + first) * weight) / total]) * step_mm


def _tangent_slopes(z: np.ndarray, values: np.ndarray) -> np.ndarray:
    """d(values)/dz at every sample from the least-squares parabola through it and its nearest
    neighbours (:data:`TILT_FIT_VERTEBRAE` samples, centred where possible; two samples: the chord)."""
    count = z.size
    slopes = np.zeros(count)
    if count == 2:
        slopes[:] = (values[1] - values[0]) / (z[1] - z[0])
    window = min(count, TILT_FIT_VERTEBRAE)
    for i in range(count if count >= 3 else 0):
        j = min(max(i - window // 2, 0), count - window)
        coefficients = np.polyfit(z[j : j + window], values[j : j + window], 2)
        slopes[i] = np.polyval(np.polyder(coefficients), z[i])
    return slopes


def _plane_summary(angles_deg: np.ndarray, centres: np.ndarray, slopes: np.ndarray) -> Dict[str, object]:
    """End angle, Cobb-like angle and largest curvature of one projection from the vertebrae's tangent angles."""
    if angles_deg.size < 2:
        return {"end_angle_deg": None, "cobb_like_angle_deg": None, "max_curvature_deg_per_cm": None, "max_curvature_at_lps_mm": None}
    # projected length between neighbouring centres: dz * sqrt(1 + slope^2), with the mean slope
    dz = np.diff(centres[:, 2])
    length = np.abs(dz) * np.sqrt(1.0 + (0.5 * (slopes[1:] + slopes[:-1])) ** 2)
    curvature = np.abs(np.diff(angles_deg)) / np.maximum(length, 1e-6) * 10.0
    peak = int(np.argmax(curvature))
    return {
        "end_angle_deg": round(float(angles_deg[-1] - angles_deg[0]), 2),
        "cobb_like_angle_deg": round(float(angles_deg.max() - angles_deg.min()), 2),
        "max_curvature_deg_per_cm": round(float(curvature[peak]), 3),
        "max_curvature_at_lps_mm": _round(0.5 * (centres[peak] + centres[peak + 1])),
    }


def spine_centreline(mask: "sitk.Image", *, step_mm: float = CENTRELINE_STEP_MM, labels: Optional[Sequence["LabelInfo"]] = None) -> Dict[str, object]:
    """The vertebral bodies' centreline and its sagittal and coronal curvature.

    The mask (the sacrum left out) is resampled onto an isotropic LPS-aligned grid of
    ``step_mm`` around the spine; :func:`SpineContextSegLib.anatomy.centreline.body_centreline` gives
    the centreline there (one point per slice, ``points_lps_mm`` from the first to the last
    body slice). Every run of body slices between two discs is a vertebra; its ``centre``
    is the centroid of its body (per slice, the voxels at least 60 % as thick as the
    thickest, as body_centreline takes them, but unsmoothed: the smoothed centreline
    flattens towards its ends), and its tilt in each plane is the slope of the least-squares
    parabola through its centre and its nearest neighbours' (:data:`TILT_FIT_VERTEBRAE`,
    centred where possible; the end vertebrae: the end ones).
    The angles (module docstring) compare these tilts: ``end_angle_deg`` top minus bottom
    vertebra, ``cobb_like_angle_deg`` the most tilted pair, ``max_curvature_deg_per_cm``
    the largest tilt change between neighbours per cm of projected length. Fewer than two
    vertebrae found (a short field of view, or discs the mask bridges): the angles are ``None``.

    Raises
    ------
    SegmentationError
        ``no_spine_found`` for an empty mask (or one with the sacrum only).
    """
    import SimpleITK as sitk
    from scipy import ndimage

    from SpineContextSegLib.inference.preprocessing import canonical_reference, resample_to_reference
    from SpineContextSegLib.anatomy.centreline import body_centreline, in_plane_thickness_mm

    array = np.asarray(sitk.GetArrayViewFromImage(mask))
    spine = _spine_only(array)
    if not spine.any():
        raise SegmentationError("no_spine_found", "The mask is empty: there is no spine to draw a centreline through.")
    # the spine's box (plus a voxel), cut out and resampled onto an isotropic LPS-aligned grid
    boxes = ndimage.find_objects(spine.view(np.uint8))[0]
    size = np.array(mask.GetSize())
    low = np.maximum(np.array([boxes[2].start, boxes[1].start, boxes[0].start]) - 1, 0)
    high = np.minimum(np.array([boxes[2].stop, boxes[1].stop, boxes[0].stop]) + 1, size)
    spine_image = sitk.GetImageFromArray(spine.view(np.uint8))
    spine_image.CopyInformation(mask)
    roi = sitk.RegionOfInterest(spine_image, [int(v) for v in high - low], [int(v) for v in low])
    reference = canonical_reference(roi, [float(step_mm)] * 3)
    # linear interpolation of the 0/1 mask, cut at one half: smoother body outlines than nearest
    # neighbour, whose voxel steps move the bodies' centres by up to half a source voxel
    work = sitk.GetArrayFromImage(resample_to_reference(roi, reference, method="linear", default_value=0, pixel_type=sitk.sitkFloat32)) >= 0.5
    if not work.any():
        raise SegmentationError("no_spine_found", f"The spine mask vanishes on a {step_mm:g} mm grid: it is too thin to be a spine.")
    filled = ndimage.binary_fill_holes(work)
    thickness = in_plane_thickness_mm(filled, step_mm)
    line = body_centreline(filled, step_mm, thickness=thickness)

    # the column: from the first to the last body slice (else the mask's own extent)
    slices = np.flatnonzero(line.body_slice) if np.any(line.body_slice) else np.flatnonzero(work.any(axis=(1, 2)))
    first, last = int(slices[0]), int(slices[-1])
    keep = slice(first, last + 1)
    origin = np.array(reference.GetOrigin(), dtype=float)
    points = origin + np.stack([line.x_mm, line.y_mm, line.z_mm], axis=1)  # identity direction: LPS
    arc = line.arc_mm[keep] - line.arc_mm[first]

    runs = _body_runs(line.body_slice, step_mm)
    centres = origin + np.array([_body_centroid(thickness, a, b, step_mm) for a, b in runs]).reshape(-1, 3)
    slope_x = _tangent_slopes(centres[:, 2], centres[:, 0]) if runs else np.zeros(0)
    slope_y = _tangent_slopes(centres[:, 2], centres[:, 1]) if runs else np.zeros(0)
    sagittal = np.degrees(np.arctan(slope_y))
    coronal = np.degrees(np.arctan(slope_x))
    names = {int(label.value): label.name for label in (labels or [])}
    labelled = bool(array.size) and int(array.max()) > 1  # a vertebrae-task map (VerSe ids): name the bodies
    vertebrae = []
    for centre, sagittal_deg, coronal_deg in zip(centres, sagittal, coronal):
        entry: Dict[str, object] = {"centre_lps_mm": _round(centre), "sagittal_tilt_deg": round(float(sagittal_deg), 2), "coronal_tilt_deg": round(float(coronal_deg), 2)}
        value = _label_at(mask, array, centre) if labelled else 0
        if value:
            entry["label"] = names.get(value, str(value))
        vertebrae.append(entry)
    return {
        "format": CENTRELINE_FORMAT,
        "space": "LPS",
        "units": "mm",
        "step_mm": float(step_mm),
        "length_mm": round(float(arc[-1]), 2),
        "points_lps_mm": [_round(p) for p in points[keep]],
        "arc_mm": _round(arc, 2),
        "vertebrae": vertebrae,  # inferior to superior
        "sagittal": {"plane": "y-z", "tilt": "atan(dy/dz): + when the column runs posteriorly going up", **_plane_summary(sagittal, centres, slope_y)},
        "coronal": {"plane": "x-z", "tilt": "atan(dx/dz): + when the column runs to the patient's left going up", **_plane_summary(coronal, centres, slope_x)},
    }


def _label_at(mask: "sitk.Image", array: np.ndarray, point_lps: np.ndarray) -> int:
    """The label-map value at the voxel nearest ``point_lps`` (0 outside the image)."""
    i, j, k = (int(round(c)) for c in mask.TransformPhysicalPointToContinuousIndex([float(c) for c in point_lps]))
    size = mask.GetSize()
    if not (0 <= i < size[0] and 0 <= j < size[1] and 0 <= k < size[2]):
        return 0
    return int(array[k, j, i])


def write_centreline_json(mask: "sitk.Image", path: str, *, step_mm: float = CENTRELINE_STEP_MM, labels: Optional[Sequence["LabelInfo"]] = None) -> str:
    """:func:`spine_centreline` written to ``path`` (``.json``), atomically; returns the absolute path."""
    check_json_path(path, "--centreline")
    return write_json(spine_centreline(mask, step_mm=step_mm, labels=labels), path)
