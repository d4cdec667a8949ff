"""The body profile along the centreline and the intervertebral discs in it (step 2, first half).

Along the centreline's arc length, the share of a cylinder around the body centreline that lies
in the mask (:func:`body_profile`) drops at every intervertebral disc (discs are not bone).
Discs are the deep minima of that profile, no closer together than about half a vertebra; a
segment as long as two vertebrae is searched again for a shallow minimum (a disc bridged by
osteophytes), one three vertebrae long for its faintest minima (:func:`find_disc_levels`, with
:func:`find_peaks`).
:func:`~SpineContextSegLib.anatomy.split.split_vertebrae` cuts the mask at these discs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from SpineContextSegLib.anatomy.centreline import Centreline, _points_mm, _spacing3, _tube_voxels, centreline_frame


@dataclass
class BodyProfile:
    """Share of a cylinder around the body centreline that lies in the mask, along the arc.

    Attributes
    ----------
    arc_mm : (B,) float
        Bin centres, mm of arc length (one bin per z voxel).
    occupancy : (B,) float
        Mask voxels / all voxels of the cylinder in the bin; NaN where the bin is empty.
    radius_mm : (B,) float
        Body radius (:attr:`Centreline.body_radius_mm`) at the bin.
    probability : (B,) float or None
        Mean spine probability (the network's, the mask was thresholded from) in the same
        cylinder and bins; ``None`` without one.
    """

    arc_mm: np.ndarray
    occupancy: np.ndarray
    radius_mm: np.ndarray
    probability: Optional[np.ndarray] = None


def body_profile(mask: np.ndarray, line: Centreline, spacing_mm, *, radius_factor: float = 0.6, probability: Optional[np.ndarray] = None) -> BodyProfile:
    """Occupancy of the cylinder of radius ``radius_factor`` x body radius around the centreline.

    ``mask`` is (D, H, W) bool on the canonical grid; ``spacing_mm`` (z, y, x) mm;
    ``probability`` (D, H, W) float in [0, 1], optional: also its mean in the same bins.
    """
    spacing = _spacing3(spacing_mm)
    cylinder = radius_factor * line.body_radius_mm
    tube = _tube_voxels(mask.shape, line, spacing, float(cylinder.max()) + 2.0 * float(spacing.max()))
    step = float(spacing[0])
    if tube.size == 0:
        return BodyProfile(np.zeros(0), np.zeros(0), np.zeros(0))
    arc, distance, _, _ = centreline_frame(_points_mm(tube, mask.shape, spacing), line)
    inside = distance <= np.interp(arc, line.arc_mm, cylinder)
    bins = np.floor(arc / step).astype(np.int64)
    first = int(bins.min())
    bins -= first
    count = int(bins.max()) + 1
    total = np.bincount(bins[inside], minlength=count).astype(np.float64)
    in_cylinder = tube[inside]

    def mean_in_bins(volume: np.ndarray) -> np.ndarray:
        summed = np.bincount(bins[inside], weights=volume.reshape(-1)[in_cylinder].astype(np.float64), minlength=count)
        with np.errstate(invalid="ignore", divide="ignore"):
            return summed / total

    centres = (np.arange(count) + first + 0.5) * step
    return BodyProfile(centres, mean_in_bins(mask), line.radius_at_arc(centres), None if probability is None else mean_in_bins(np.asarray(probability)))


def find_disc_levels(profile: BodyProfile, *, min_height_factor: float = 0.55) -> Tuple[List[float], float, float]:
    """Arc positions (mm) of the intervertebral discs: the deep minima of the body profile.

    A minimum counts when it lies below 75 % of the typical body occupancy and is at least
    25 % of it deeper than its surroundings; the disc sits at the middle of the minimum's
    floor (a ground-truth mask leaves a flat run of zeros). Of two minima closer than
    ``min_height_factor`` x the expected vertebra height (twice the body radius, ~ the
    body's depth) only the deeper one stays. A segment between discs longer than
    :data:`OVERLONG_SEGMENT_RADII` body radii is then searched again for a shallow minimum
    (down to 90 % of the body occupancy, 8 % prominence): a disc the mask partly bridges.
    With the profile's ``probability`` that search looks there instead: a disc that slices
    thicker than it blur into the bodies leaves the mask full but the probability lower
    (0.75-0.9 of the bodies'). A segment three vertebrae long or more (its length over
    :data:`VERTEBRA_PITCH_RADII` body radii) is cut at the probability's deepest minima however
    faint (2 % prominence, up to 97 %), one per hidden disc (3 mm slices: dips to 0.89-0.93).

    Returns
    -------
    discs : list of float
        Arc positions, ascending (inferior first).
    column_start_mm, column_end_mm : float
        Arc range of the body column (first and last bin with the body occupancy at least
        half its typical value).
    """
    from scipy import ndimage

    if profile.arc_mm.size == 0:
        return [], 0.0, 0.0
    step = float(profile.arc_mm[1] - profile.arc_mm[0]) if profile.arc_mm.size > 1 else 1.0
    occupancy = np.nan_to_num(profile.occupancy, nan=0.0)
    smooth = ndimage.gaussian_filter1d(occupancy, max(0.5, 1.0 / step), mode="nearest")
    solid = smooth > 0.2
    if not solid.any():
        return [], float(profile.arc_mm[0]), float(profile.arc_mm[-1])
    body_level = float(np.percentile(smooth[solid], 90))
    present = np.flatnonzero(smooth >= 0.5 * body_level)
    lo, hi = int(present[0]), int(present[-1]) + 1
    start, end = float(profile.arc_mm[lo]), float(profile.arc_mm[hi - 1])
    minima, properties = find_peaks(-smooth[lo:hi], prominence=0.25 * body_level, distance=max(1, int(round(6.0 / step))))
    minima = minima + lo
    depth = properties["prominences"]
    keep = smooth[minima] <= 0.75 * body_level
    minima, depth = minima[keep], depth[keep]
    positions = [_plateau_centre(profile.arc_mm, smooth, index, lo, hi, 0.1 * body_level) for index in minima]
    accepted: List[float] = []
    for order in np.argsort(-depth, kind="stable"):
        position = positions[order]
        expected_height = 2.0 * float(np.interp(position, profile.arc_mm, profile.radius_mm))
        if all(abs(position - other) >= min_height_factor * expected_height for other in accepted):
            accepted.append(position)
    # a segment as long as two vertebrae hides a disc the mask partly bridges (osteophytes,
    # a filled disc, thick slices): look inside it for the deepest shallower minimum
    shallow, shallow_level = smooth, body_level
    if profile.probability is not None:
        shallow = ndimage.gaussian_filter1d(np.nan_to_num(profile.probability, nan=0.0), max(0.5, 1.0 / step), mode="nearest")
        shallow_level = float(np.percentile(shallow[solid], 90))
    for _ in range(len(profile.arc_mm)):
        bounds = [start] + sorted(accepted) + [end]
        added = False
        for low, high in zip(bounds[:-1], bounds[1:]):
            radius = float(np.interp(0.5 * (low + high), profile.arc_mm, profile.radius_mm))
            if high - low <= OVERLONG_SEGMENT_RADII * radius:
                continue
            inner = (profile.arc_mm > low + min_height_factor * 2.0 * radius) & (profile.arc_mm < high - min_height_factor * 2.0 * radius)
            if not inner.any():
                continue
            first = int(np.flatnonzero(inner)[0])
            held = int(round((high - low) / (VERTEBRA_PITCH_RADII * radius)))
            # as long as three vertebrae or more, the segment surely hides discs: take the
            # probability's deepest minima however shallow, one per hidden disc (a mask's own
            # occupancy has faint dips inside bodies too); two vertebrae long, it may be one
            # long vertebra (C2 with its dens): only a clear minimum counts
            faint = held >= 3 and profile.probability is not None
            prominence, ceiling, wanted = (0.02, 0.97, held - 1) if faint else (0.08, 0.9, 1)
            found, _ = find_peaks(-shallow[inner], prominence=prominence * shallow_level)
            found = found[shallow[found + first] <= ceiling * shallow_level] + first
            cuts: List[float] = []
            for index in found[np.argsort(shallow[found], kind="stable")]:
                position = _plateau_centre(profile.arc_mm, shallow, int(index), lo, hi, 0.03 * shallow_level)
                if all(abs(position - other) >= min_height_factor * 2.0 * radius for other in cuts):
                    cuts.append(position)
                if len(cuts) == wanted:
                    break
            accepted.extend(cuts)
            added = added or bool(cuts)
        if not added:
            break
    return sorted(accepted), start, end


def find_peaks(values: np.ndarray, *, prominence: float, distance: int = 1) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Peaks of a 1-D signal with at least ``prominence``, at least ``distance`` samples apart.

    The same peaks as ``scipy.signal.find_peaks(values, prominence=..., distance=...)`` (a
    flat peak counts at its middle; of two peaks closer than ``distance`` the higher one
    stays, then the prominence is measured), without importing :mod:`scipy.signal` (over a
    second on its own). Returns ``(indices, {"prominences": ...})``.
    """
    x = np.asarray(values, dtype=np.float64)
    size = x.size
    peaks = []
    i = 1
    while i < size - 1:
        if x[i - 1] < x[i]:
            ahead = i + 1
            while ahead < size - 1 and x[ahead] == x[i]:
                ahead += 1
            if x[ahead] < x[i]:
                peaks.append((i + ahead - 1) // 2)
                i = ahead
        i += 1
    peaks = np.array(peaks, dtype=np.intp)
    if peaks.size > 1 and distance > 1:
        keep = np.ones(peaks.size, dtype=bool)
        order = np.argsort(x[peaks])
        for j in order[::-1]:
            if not keep[j]:
                continue
            k = j - 1
            while k >= 0 and peaks[j] - peaks[k] < distance:
                keep[k] = False
                k -= 1
            k = j + 1
            while k < peaks.size and peaks[k] - peaks[j] < distance:
                keep[k] = False
                k += 1
        peaks = peaks[keep]
    prominences = np.zeros(peaks.size)
    for n, peak in enumerate(peaks):
        i, left_min = peak, x[peak]
        while i >= 0 and x[i] <= x[peak]:
            left_min = min(left_min, x[i])
            i -= 1
        i, right_min = peak, x[peak]
        while i < size and x[i] <= x[peak]:
            right_min = min(right_min, x[i])
            i += 1
        prominences[n] = x[peak] - max(left_min, right_min)
    kept = prominences >= prominence
    return peaks[kept], {"prominences": prominences[kept]}


#: A segment between two discs longer than this many body radii holds two vertebrae (one
#: vertebra plus its disc measures 2-2.5 radii from C3 to L5; C2 with its dens about 4).
OVERLONG_SEGMENT_RADII = 3.6

#: One vertebra plus its disc, in body radii (2-2.5 from C3 to L5): a segment holds about
#: its length / this many vertebrae.
VERTEBRA_PITCH_RADII = 2.25


def _plateau_centre(arc_mm: np.ndarray, smooth: np.ndarray, index: int, lo: int, hi: int, tolerance: float) -> float:
    """Arc at the middle of the run of bins around ``index`` within ``tolerance`` of its value."""
    floor = smooth[index] + tolerance
    left = index
    while left > lo and smooth[left - 1] <= floor:
        left -= 1
    right = index
    while right < hi - 1 and smooth[right + 1] <= floor:
        right += 1
    return float(0.5 * (arc_mm[left] + arc_mm[right]))
