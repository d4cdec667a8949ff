""":func:`label_vertebrae`: a binary spine mask and its CT (SimpleITK images) -> VerSe label map.

Runs the steps of :mod:`SpineContextSegLib.anatomy` (centreline, split, evidence, naming; the
sacrum on request) on a canonical working grid resampled with
:mod:`SpineContextSegLib.inference.preprocessing`, and returns the VerSe label map on the input
grid (seconds per stage in ``info["timings_s"]``; the working grid is 1 mm, or coarser so that
it holds at most :data:`MAX_WORKING_VOXELS`). The sacrum is not part of the binary mask (see
:data:`SpineContextSegLib.labels.SPINE_MASK_INCLUDES_SACRUM`); it serves as the anchor and, with
``include_sacrum=True``, its upper part is segmented from the CT alone (VerSe 26,
:func:`~SpineContextSegLib.anatomy.sacrum.segment_upper_sacrum`). A mask that took in the top
of the sacrum leaves a small segment below L5;
:func:`~SpineContextSegLib.anatomy.evidence.caudal_fragment` tells it from a vertebra before
naming.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from SpineContextSegLib.anatomy.centreline import _padded_box
from SpineContextSegLib.anatomy.evidence import caudal_fragment, vertebra_geometry
from SpineContextSegLib.anatomy.missing_levels import missing_stretches, seed_missing_levels
from SpineContextSegLib.anatomy.naming import name_vertebrae
from SpineContextSegLib.anatomy.sacrum import segment_upper_sacrum
from SpineContextSegLib.anatomy.split import _CUBE, grow_labels, keep_largest_pieces, split_vertebrae
from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.io.grids import check_same_grid

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

#: Working grid spacing (mm) of :func:`label_vertebrae` (isotropic); coarser for very large crops.
WORKING_SPACING_MM = 1.0
#: Largest working grid (voxels) before the spacing is coarsened: a full-field chest CT
#: (mask box plus :data:`CONTEXT_MARGIN_MM`, ~19 M voxels at 1 mm) is labelled at ~1.45 mm in
#: about 1.5 s on two CPU cores (``scripts/labelling_speed.py``).
MAX_WORKING_VOXELS = 6_000_000
#: Working-grid marker of mask voxels that belong to no vertebra (a sacral fragment, see
#: :func:`caudal_fragment`) while the sacrum is not segmented; never written out.
NOT_A_VERTEBRA = 255
#: Context kept around the mask on the working grid, mm along (x, y, z) = (L, P, S):
#: ribs run sideways, the sacrum and skull base lie beyond the column's ends.
CONTEXT_MARGIN_MM = (60.0, 40.0, 60.0)


def _working_region(mask_image: "sitk.Image", mask: np.ndarray) -> Tuple[List[int], List[int]]:
    """Index and size (x, y, z order) of the mask's bounding box grown by :data:`CONTEXT_MARGIN_MM`."""
    direction = np.abs(np.array(mask_image.GetDirection(), dtype=float).reshape(3, 3))
    spacing = np.array(mask_image.GetSpacing(), dtype=float)
    # margin along each index axis: the physical margins weighted by that axis' direction cosines
    margin_mm = direction.T @ np.array(CONTEXT_MARGIN_MM)
    margin = np.ceil(margin_mm / spacing).astype(int)
    nonzero = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]  # numpy (z, y, x)
    low = np.array([nonzero[2][0], nonzero[1][0], nonzero[0][0]]) - margin
    high = np.array([nonzero[2][-1], nonzero[1][-1], nonzero[0][-1]]) + margin + 1
    size = np.array(mask_image.GetSize())
    low = np.maximum(low, 0)
    high = np.minimum(high, size)
    return [int(v) for v in low], [int(v) for v in high - low]


def _field_of_view(ct_image: "sitk.Image", reference: "sitk.Image") -> np.ndarray:
    """(D, H, W) bool on ``reference``'s grid: True inside the CT's extent.

    Built from a ones-image of only the part of the CT that ``reference`` overlaps.
    """
    import SimpleITK as sitk

    from SpineContextSegLib.inference.preprocessing import physical_corners, resample_to_reference

    size = np.array(ct_image.GetSize())
    shape = tuple(reversed(reference.GetSize()))
    # the usual case: every voxel centre of the working grid lies inside the CT (a box inside a box)
    centres = [ct_image.TransformPhysicalPointToContinuousIndex(reference.TransformIndexToPhysicalPoint([int(i), int(j), int(k)]))
               for i in (0, shape[2] - 1) for j in (0, shape[1] - 1) for k in (0, shape[0] - 1)]
    if np.all(np.array(centres) >= -0.5 + 1e-6) and np.all(np.array(centres) <= size - 0.5 - 1e-6):
        return np.ones(shape, dtype=bool)
    corners = [ct_image.TransformPhysicalPointToContinuousIndex([float(c) for c in corner]) for corner in physical_corners(reference)]
    low = np.clip(np.floor(np.min(corners, axis=0)).astype(int) - 1, 0, size - 1)
    high = np.clip(np.ceil(np.max(corners, axis=0)).astype(int) + 2, 1, size)
    ones = sitk.Image([int(v) for v in high - low], sitk.sitkUInt8) + 1
    ones.SetSpacing(ct_image.GetSpacing())
    ones.SetDirection(ct_image.GetDirection())
    ones.SetOrigin(ct_image.TransformIndexToPhysicalPoint([int(v) for v in low]))
    return sitk.GetArrayFromImage(resample_to_reference(ones, reference, method="nearest", default_value=0)) > 0


def label_vertebrae(
    mask_image: "sitk.Image",
    ct_image: "sitk.Image",
    *,
    spacing_mm: Optional[float] = None,
    include_sacrum: bool = False,
    name_votes: Optional["sitk.Image"] = None,
    fit_mask: Optional["sitk.Image"] = None,
    probability: Optional["sitk.Image"] = None,
) -> Tuple["sitk.Image", Dict[str, object]]:
    """Label every vertebra of a binary spine mask with its VerSe id.

    The mask's bounding box plus :data:`CONTEXT_MARGIN_MM` of CT around it is resampled onto
    a canonical grid (:func:`SpineContextSegLib.inference.preprocessing.canonical_reference`,
    isotropic ``spacing_mm``); there :func:`split_vertebrae` and :func:`name_vertebrae` run
    (optionally :func:`segment_upper_sacrum`); vertebrae the naming found missing from the mask
    but ``fit_mask`` holds get seeds of their own there (:func:`seed_missing_levels`), and the
    labels come back onto the mask's own grid with nearest neighbour. On that grid the labels
    are then fitted to the mask (and ``fit_mask``): mask voxels the resampling left unlabelled
    take the label of the vertebra they connect to (geodesically, inside the mask), voxels
    outside the mask are cleared (except the sacrum, which is not part of the mask) and every
    label is made one 26-connected piece (except a vertebra that the mask itself holds in
    pieces). A piece of the sacrum that the mask took in below L5 (:func:`caudal_fragment`) is no vertebra:
    it joins the sacrum, or stays unlabelled without ``include_sacrum``.

    Parameters
    ----------
    mask_image : SimpleITK.Image, 3D
        Binary spine mask (non-zero = spine, C1-L6, sacrum excluded), any orientation.
    ct_image : SimpleITK.Image, 3D
        The CT in HU, in the same physical space (any grid; usually the mask's).
    spacing_mm : float, optional
        Working grid spacing; default :data:`WORKING_SPACING_MM`, coarser if the crop would
        exceed :data:`MAX_WORKING_VOXELS` voxels.
    include_sacrum : bool
        Also segment the upper sacrum (VerSe 26) below the last lumbar vertebra when the
        naming found it there (a CT-threshold segment, coarse).
    name_votes : SimpleITK.Image, optional
        A vertebrae network's most probable vertebra per voxel (uint8 VerSe ids, any grid in
        the same physical space), used as naming evidence (see :func:`name_vertebrae`).
    fit_mask : SimpleITK.Image, optional
        The mask the labels fill on the way back, on exactly ``mask_image``'s grid (default
        ``mask_image``): a larger outline of the same spine than the one split and named (the
        outline moved to the bone), whose extra voxels take the label of the vertebra they
        connect to; a vertebra missing from ``mask_image`` whose body ``fit_mask`` holds gets
        its own label there. The labels then cover ``mask_image`` | ``fit_mask``.
    probability : SimpleITK.Image, optional
        The spine probability ``mask_image`` was thresholded from (any grid in the same
        physical space): where thick slices blur a disc into the mask, the split cuts a segment
        as long as two vertebrae at the probability's dip (see :func:`split_vertebrae`).

    Returns
    -------
    labels : SimpleITK.Image
        uint8 VerSe ids (see :mod:`SpineContextSegLib.labels`) on exactly ``mask_image``'s grid.
    info : dict
        :func:`name_vertebrae`'s info plus ``working_spacing_mm``, ``timings_s`` (seconds per
        stage: resample, split, evidence, naming, missing, sacrum, map_back, total),
        ``filled_levels`` (missing levels labelled in ``fit_mask``; moved from
        ``missing_levels`` to ``names``), ``discs`` (count),
        ``unlabelled_ml`` (mask voxels left without a label: islands away from the column),
        ``sacrum_ml``, ``sacral_fragment_in_mask``.

    Raises
    ------
    SegmentationError
        ``no_spine_found`` when the mask is empty.
    """
    import time

    import SimpleITK as sitk

    from SpineContextSegLib.labels import SACRUM_ID
    from SpineContextSegLib.inference.preprocessing import AIR_HU, canonical_reference, physical_corners, resample_to_reference

    timings: Dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + now - clock
        clock = now

    mask_full = sitk.GetArrayViewFromImage(mask_image) != 0
    if not mask_full.any():
        raise SegmentationError("no_spine_found", "The spine mask is empty: there are no vertebrae to label.")
    if fit_mask is not None:
        check_same_grid(fit_mask, mask_image, what="fit_mask", reference_name="mask_image")
    filled_full = mask_full if fit_mask is None else mask_full | (sitk.GetArrayViewFromImage(fit_mask) != 0)
    index, size = _working_region(mask_image, mask_full)
    mask_box = _mask_box(mask_full)  # (x, y, z) index and size of the mask's own bounding box
    mask_roi = sitk.Cast(sitk.RegionOfInterest(mask_image, size, index) != 0, sitk.sitkUInt8)
    extent_mm = np.ptp(physical_corners(mask_roi), axis=0)
    spacing = float(spacing_mm or WORKING_SPACING_MM)
    if spacing_mm is None and float(np.prod(extent_mm / spacing)) > MAX_WORKING_VOXELS:
        spacing = float((np.prod(extent_mm) / MAX_WORKING_VOXELS) ** (1.0 / 3.0))
    reference = canonical_reference(mask_roi, [spacing] * 3)
    ct_work = sitk.GetArrayFromImage(resample_to_reference(ct_image, reference, method="linear", default_value=AIR_HU, pixel_type=sitk.sitkFloat32))
    mask_tight = sitk.RegionOfInterest(mask_roi, mask_box[1], [int(i - j) for i, j in zip(mask_box[0], index)])
    mask_work = _resample_into(mask_tight, reference)
    field_of_view = _field_of_view(ct_image, reference)
    if not mask_work.any():  # a mask thinner than the working grid: take its nearest voxels anyway
        raise SegmentationError("no_spine_found", "The spine mask vanishes on the working grid: it is too thin to be a spine.")
    lap("resample")

    probability_work = None
    if probability is not None:
        probability_work = sitk.GetArrayFromImage(resample_to_reference(probability, reference, method="linear", default_value=0.0, pixel_type=sitk.sitkFloat32))
    instances, details = split_vertebrae(mask_work, ct_work, spacing, probability=probability_work, return_details=True)
    del probability_work
    line = details["centreline"]
    geometry = vertebra_geometry(instances, line, spacing, field_of_view)
    fragment = caudal_fragment(instances, line, spacing, field_of_view, geometry=geometry)
    not_vertebra = instances == fragment if fragment else np.zeros(mask_work.shape, dtype=bool)
    if fragment:
        instances[not_vertebra] = 0
        geometry = geometry[: fragment - 1]
    votes_work = None
    if name_votes is not None:
        votes_work = sitk.GetArrayFromImage(resample_to_reference(name_votes, reference, method="nearest", default_value=0, pixel_type=sitk.sitkUInt8))
    lap("split")
    verse_work, info = name_vertebrae(
        instances, ct_work, spacing, field_of_view=field_of_view, centreline=line, sacral_fragment=not_vertebra, name_votes=votes_work, geometry=geometry, timings=timings,
    )
    clock = time.perf_counter()
    seeded: List[int] = []
    stretches = missing_stretches(geometry, line, info["missing_between"]) if fit_mask is not None else []
    if stretches:
        # vertebrae the split outline lost whole but the filled one holds: seeds of their own
        fit_roi = sitk.Cast(sitk.RegionOfInterest(fit_mask, size, index) != 0, sitk.sitkUInt8)
        seeded = seed_missing_levels(verse_work, mask_work | _resample_into(fit_roi, reference), line, spacing, stretches)
    info = _with_seeded_levels(info, seeded)
    lap("missing")
    if include_sacrum and "sacrum" in str(info["method"]):
        # the fragment of the mask below L5 is the top of the sacrum (its marrow may lie under SACRUM_HU)
        verse_work[segment_upper_sacrum(verse_work, ct_work, line, spacing, field_of_view) | not_vertebra] = SACRUM_ID
    else:
        verse_work[not_vertebra] = NOT_A_VERTEBRA
    del ct_work, field_of_view
    lap("sacrum")

    # back onto the mask's grid, in the box of the mask and the labels only
    work_image = sitk.GetImageFromArray(verse_work)
    work_image.CopyInformation(reference)
    box_index, box_size = _labels_box(verse_work, reference, mask_image, mask_box if fit_mask is None else _mask_box(filled_full))
    mask_part = sitk.RegionOfInterest(mask_roi, box_size, [int(i - j) for i, j in zip(box_index, index)]) if _inside(box_index, box_size, index, size) else sitk.Cast(sitk.RegionOfInterest(mask_image, box_size, box_index) != 0, sitk.sitkUInt8)
    on_part = sitk.GetArrayFromImage(resample_to_reference(work_image, mask_part, method="nearest", default_value=0, pixel_type=sitk.sitkUInt8))
    box = tuple(slice(i, i + n) for i, n in zip(box_index[::-1], box_size[::-1]))
    part_mask = filled_full[box]
    sacrum_part = on_part == SACRUM_ID
    claimed = sacrum_part | (on_part == NOT_A_VERTEBRA)  # no vertebra grows into these
    vertebrae_part = np.where(part_mask & ~claimed, on_part, 0).astype(np.int32)
    # mask voxels the nearest-neighbour resampling missed join the vertebra they connect to
    vertebrae_part = grow_labels(vertebrae_part, part_mask & ~claimed)
    # pieces of one vertebra that the mask holds apart (named alike in the sequence step, or an
    # arch that lost its body) stay apart
    pieced = _labels_in_pieces(verse_work)
    vertebrae_part, _ = keep_largest_pieces(vertebrae_part, several_pieces=pieced)
    if sacrum_part.any():
        vertebrae_part[sacrum_part] = SACRUM_ID
        vertebrae_part, _ = keep_largest_pieces(vertebrae_part, several_pieces=pieced)
    out = np.zeros(mask_full.shape, dtype=np.uint8)
    out[box] = vertebrae_part.astype(np.uint8)
    labels = sitk.GetImageFromArray(out)
    labels.CopyInformation(mask_image)
    voxel_ml = float(np.prod(mask_image.GetSpacing())) / 1000.0
    present = [int(v) for v in np.unique(out[box]) if v > 0]
    info = dict(info)
    info.update(
        {
            "working_spacing_mm": round(spacing, 3),
            "discs": len(details["discs"]),
            "unlabelled_ml": round(float(np.count_nonzero(filled_full[box] & (out[box] == 0))) * voxel_ml, 2),
            "sacrum_ml": round(float(np.count_nonzero(out[box] == SACRUM_ID)) * voxel_ml, 2),
            "sacral_fragment_in_mask": bool(fragment),
            "labels_present": present,
        }
    )
    lap("map_back")
    info["timings_s"] = {key: round(value, 3) for key, value in timings.items()}
    info["timings_s"]["total"] = round(sum(timings.values()), 3)
    return labels, info


def _with_seeded_levels(info: Dict[str, object], seeded: Sequence[int]) -> Dict[str, object]:
    """``info`` with the missing levels that :func:`seed_missing_levels` placed moved to ``names`` (cranio-caudal order) and ``filled_levels``."""
    from SpineContextSegLib.labels import CRANIO_CAUDAL_ORDER, vertebra_by_verse_id

    verse_ids = sorted(set(info["verse_ids"]) | set(seeded), key=CRANIO_CAUDAL_ORDER.index)
    filled = [vertebra_by_verse_id(v).name for v in seeded]
    return dict(
        info,
        verse_ids=verse_ids,
        names=[vertebra_by_verse_id(v).name for v in verse_ids],
        missing_levels=[name for name in info["missing_levels"] if name not in filled],
        filled_levels=filled,
    )


#: A runner-up naming at least this likely makes the names uncertain, however likely the chosen
#: one: the chest CTA's right names (0.56) had T1-T12, one level off, at 0.36; a sixth lumbar
#: vertebra read as T12 without ribs leaves its L6 naming at about 0.24.
RUNNER_UP_PROBABILITY = 0.2


def names_uncertainty(info: Dict[str, object]) -> Optional[str]:
    """Why :func:`label_vertebrae`'s names (its ``info``) need checking, or ``None`` when they do not.

    Without an anchor in view (sacrum, the last rib-bearing level above a whole vertebra without
    ribs, the first rib-bearing level, skull base, a vertebrae network) the names are a guess
    from vertebra size and spacing (lungs and ribs tell only which stretch is thoracic), however
    likely that guess scores; a last rib above only a piece the scan's bottom cuts gets a
    message of its own. With an anchor, when the chosen names are less likely than not, or
    another naming is at least :data:`RUNNER_UP_PROBABILITY` likely.
    """
    confidence = float(info.get("confidence", 0.0))
    if not info.get("anchored", False) and (info.get("anchors") or {}).get("last_rib_unconfirmed"):
        return (
            f"The vertebra names count down to the last rib found, named T12, but the only vertebra seen below it is cut by the "
            f"bottom of the scan (confidence {confidence:.2f}): a T12 whose rib lies below the scan looks the same, so the names "
            "may all be one level too far down the spine (T11 named T12). Check the count before use."
        )
    if not info.get("anchored", False):
        return (
            f"No anatomical anchor (sacrum, a last rib with a whole rib-free vertebra below it, a first rib, skull base) is in view to confirm the vertebra names "
            f"(confidence {confidence:.2f}): they are a guess from vertebra size and spacing (lungs and ribs beside the column "
            "show only which stretch is thoracic) and may be off by a level or more. Check them before use."
        )
    alternatives = info.get("alternatives") or []
    runner_up = alternatives[0] if alternatives else None
    runner_up_probability = float(runner_up["probability"]) if runner_up else 0.0
    if confidence < 0.5 or runner_up_probability >= RUNNER_UP_PROBABILITY:
        next_naming = f"; the next most likely naming, {runner_up['names']}, {runner_up_probability:.2f}" if runner_up else ""
        return (
            f"The vertebra names are uncertain (confidence {confidence:.2f}{next_naming}; anchored by {info.get('method')}): "
            "the mask may be in pieces or miss vertebrae, "
            "or the spine may have 11 or 13 rib-bearing or 4 or 6 lumbar vertebrae. Check the count before use; "
            "per-vertebra confidence is in the run's info."
        )
    return None


def _resample_into(mask: "sitk.Image", reference: "sitk.Image") -> np.ndarray:
    """(D, H, W) bool: ``mask`` resampled (nearest) onto ``reference``, computed only in the part of the grid it covers."""
    import SimpleITK as sitk

    from SpineContextSegLib.inference.preprocessing import physical_corners, resample_to_reference

    corners = np.array([reference.TransformPhysicalPointToContinuousIndex([float(c) for c in corner]) for corner in physical_corners(mask)])
    size = np.array(reference.GetSize())
    low = np.clip(np.floor(corners.min(axis=0)).astype(int) - 1, 0, size)
    high = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 2, 0, size)
    out = np.zeros(tuple(reversed(reference.GetSize())), dtype=bool)
    if np.any(high <= low):
        return out
    part = sitk.RegionOfInterest(reference, [int(v) for v in high - low], [int(v) for v in low])
    values = sitk.GetArrayFromImage(resample_to_reference(mask, part, method="nearest", default_value=0)) > 0
    out[low[2] : high[2], low[1] : high[1], low[0] : high[0]] = values
    return out


def _mask_box(mask: np.ndarray) -> Tuple[List[int], List[int]]:
    """Index and size (x, y, z order) of the bounding box of the True voxels of a (z, y, x) array."""
    nonzero = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    low = [int(nonzero[2][0]), int(nonzero[1][0]), int(nonzero[0][0])]
    high = [int(nonzero[2][-1]) + 1, int(nonzero[1][-1]) + 1, int(nonzero[0][-1]) + 1]
    return low, [h - l for h, l in zip(high, low)]


def _inside(index: Sequence[int], size: Sequence[int], outer_index: Sequence[int], outer_size: Sequence[int]) -> bool:
    return all(i >= o and i + n <= o + m for i, n, o, m in zip(index, size, outer_index, outer_size))


def _labels_box(labels: np.ndarray, reference: "sitk.Image", image: "sitk.Image", mask_box: Tuple[List[int], List[int]]) -> Tuple[List[int], List[int]]:
    """Index and size (x, y, z) on ``image``'s grid of the box holding the mask and the working-grid labels."""
    low = np.array(mask_box[0])
    high = low + np.array(mask_box[1])
    if labels.any():
        zyx = _padded_box(labels > 0, pad=1)
        corners = []
        for i in (zyx[2].start, zyx[2].stop - 1):
            for j in (zyx[1].start, zyx[1].stop - 1):
                for k in (zyx[0].start, zyx[0].stop - 1):
                    point = reference.TransformIndexToPhysicalPoint([int(i), int(j), int(k)])
                    corners.append(image.TransformPhysicalPointToContinuousIndex(point))
        corners = np.array(corners)
        low = np.minimum(low, np.floor(corners.min(axis=0)).astype(int) - 1)
        high = np.maximum(high, np.ceil(corners.max(axis=0)).astype(int) + 2)
    low = np.maximum(low, 0)
    high = np.minimum(high, np.array(image.GetSize()))
    return [int(v) for v in low], [int(v) for v in high - low]


def _labels_in_pieces(labels: np.ndarray) -> List[int]:
    """Labels (VerSe ids, sacrum and markers excepted) that are more than one 26-connected piece."""
    from scipy import ndimage

    from SpineContextSegLib.labels import SACRUM_ID

    out = []
    for value, box in enumerate(ndimage.find_objects(np.where((labels == SACRUM_ID) | (labels == NOT_A_VERTEBRA), 0, labels)), start=1):
        if box is not None and ndimage.label(labels[box] == value, structure=_CUBE)[1] > 1:
            out.append(value)
    return out
