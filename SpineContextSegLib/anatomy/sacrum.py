"""The upper sacrum (VerSe 26) below the lowest lumbar vertebra, segmented from the CT alone.

The sacrum is not part of the binary spine mask (see
:data:`SpineContextSegLib.labels.SPINE_MASK_INCLUDES_SACRUM`); the naming uses it as an anchor
(:func:`~SpineContextSegLib.anatomy.evidence.bone_beyond_column`) and, with
``include_sacrum=True`` (:func:`~SpineContextSegLib.inference.vertebra_labelling.label_vertebrae`),
its upper part is segmented here (:func:`segment_upper_sacrum`).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from SpineContextSegLib.anatomy.centreline import Centreline, _padded_box, _points_mm, _spacing3, _sub_centreline, _tube_voxels, centreline_frame, fill_holes
from SpineContextSegLib.anatomy.split import _CUBE

#: Bone threshold (HU) for the sacrum segment: lower than :data:`BONE_HU` so that its cancellous
#: core counts, still above muscle and the L5/S1 disc.
SACRUM_HU = 130.0


def segment_upper_sacrum(verse_labels: np.ndarray, ct_hu: np.ndarray, line: Centreline, spacing_mm, field_of_view: Optional[np.ndarray] = None, *, depth_factor: float = 1.0) -> np.ndarray:
    """The sacrum's first segment (S1 level) below the lowest lumbar vertebra, from the CT alone.

    Bone (CT >= :data:`SACRUM_HU`) outside the spine labels, from 2 mm below the lowest
    labelled vertebral body down to ``depth_factor`` times that body's height, within 3 body
    radii to either side (the alae; the sacroiliac joints lie further out) and 1.5 radii in
    front of to 2.5 radii behind the centreline; cavities filled; the largest 26-connected
    piece. A threshold segment, not a network's: edges follow the 150 HU contour.

    Parameters
    ----------
    verse_labels : (D, H, W) int, canonical grid (z, y, x); the lowest label is L5 (or L6)
    ct_hu : (D, H, W) float, HU
    line : Centreline
    spacing_mm : float or (3,) float, (z, y, x) mm
    field_of_view : (D, H, W) bool, optional

    Returns
    -------
    (D, H, W) bool; empty when no bone is found there.
    """
    from scipy import ndimage

    spacing = _spacing3(spacing_mm)
    labelled = verse_labels > 0
    inside_fov = np.ones(labelled.shape, dtype=bool) if field_of_view is None else np.asarray(field_of_view, dtype=bool)
    values = [v for v in np.unique(verse_labels) if v > 0]
    from SpineContextSegLib.labels import CRANIO_CAUDAL_ORDER

    lowest = max(values, key=CRANIO_CAUDAL_ORDER.index)
    flat = np.flatnonzero(verse_labels == lowest)
    arc, distance, _, _ = centreline_frame(_points_mm(flat, labelled.shape, spacing), line)
    core = distance <= 0.6 * line.radius_at_arc(arc)
    body_arc = arc[core] if core.sum() >= 10 else arc
    low, high = (float(v) for v in np.percentile(body_arc, [1, 99]))
    radius = float(line.radius_at_arc(0.5 * (low + high)))
    window = (low - 2.0 - depth_factor * (high - low), low - 2.0)
    z_ends = line.at_arc(np.array(window))[0]
    z_lo = 0 if window[0] < line.arc_mm[0] else max(0, int(math.floor((float(np.min(z_ends)) - 3.0 * radius) / spacing[0])))
    z_hi = min(labelled.shape[0], int(math.ceil((float(np.max(z_ends)) + 3.0 * radius) / spacing[0])) + 1)
    out = np.zeros(labelled.shape, dtype=bool)
    if z_hi <= z_lo:
        return out
    sub_shape = (z_hi - z_lo,) + labelled.shape[1:]
    tube = _tube_voxels(sub_shape, _sub_centreline(line, z_lo, z_hi), spacing, 3.6 * radius)
    points = _points_mm(tube, sub_shape, spacing)
    points[:, 0] += z_lo * spacing[0]
    arc, _, posterior, left = centreline_frame(points, line)
    region = (arc >= window[0]) & (arc <= window[1]) & (posterior >= -1.5 * radius) & (posterior <= 2.5 * radius) & (np.abs(left) <= 3.0 * radius)
    flat = tube[region] + z_lo * labelled.shape[1] * labelled.shape[2]
    keep = (ct_hu.reshape(-1)[flat] >= SACRUM_HU) & inside_fov.reshape(-1)[flat] & ~labelled.reshape(-1)[flat]
    out.reshape(-1)[flat[keep]] = True
    if not out.any():
        return out
    inside = np.zeros(labelled.shape, dtype=bool)
    inside.reshape(-1)[flat] = True
    # in the bone's box plus two voxels (the closing reaches one voxel out, and the filling needs
    # background around that): the same result as over the whole grid, a tenth of the work
    box = _padded_box(out, pad=2)
    part = fill_holes(ndimage.binary_closing(out[box], structure=_CUBE)) & inside[box] & ~labelled[box]
    pieces, count = ndimage.label(part, structure=_CUBE)
    if count > 1:
        part = pieces == (np.argmax(np.bincount(pieces.ravel())[1:]) + 1)
    out[:] = False
    out[box] = part
    return out
