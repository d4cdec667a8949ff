"""The phantom's canvas: the output grid, signed-distance shapes and painting.

:class:`_Grid` holds the requested grid and the CT, label and tissue arrays that every
structure is painted into (each on the voxels of its own index box only);
:data:`TISSUE_CODES` names the tissue map's values. The signed-distance primitives (mm,
negative inside) and the painting helpers (:func:`_paint`, :func:`_paint_local`,
:func:`_paint_bone`: a union of primitives with its cortex) are shared by the anatomy
modules (:mod:`.spine`, :mod:`.thorax`, :mod:`.body`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

#: Values of ``Phantom.tissue`` (uint8).
TISSUE_CODES: Dict[str, int] = {
    "air": 0, "fat": 1, "muscle": 2, "organ": 3, "lung": 4, "blood": 5, "csf": 6, "disc": 7,
    "vertebra": 8, "sacrum": 9, "rib": 10, "sternum": 11, "pelvis": 12, "cartilage": 13,
    "table": 14, "metal": 15, "gas": 16, "scapula": 17,
}


# --------------------------------------------------------------------------------------
# Grid and boxes


class _Grid:
    """The output grid and painting canvases (numpy arrays in (k, j, i) = (z, y, x) order)."""

    def __init__(self, origin: np.ndarray, spacing: np.ndarray, direction: np.ndarray, size: Tuple[int, int, int]):
        self.origin = origin
        self.spacing = spacing
        self.direction = direction
        self.size = size  # (ni, nj, nk)
        self.matrix = direction * spacing[None, :]  # physical = origin + matrix @ index
        self.inverse = np.linalg.inv(self.matrix)
        shape = (size[2], size[1], size[0])
        self.ct = np.full(shape, -1000.0, dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)
        self.tissue = np.zeros(shape, dtype=np.uint8)

    def index_box(self, corners_world: np.ndarray, margin_mm: float = 0.0):
        """Slices (k, j, i) of the voxels whose centres can lie in the AABB of ``corners_world``."""
        lo = corners_world.min(axis=0) - margin_mm
        hi = corners_world.max(axis=0) + margin_mm
        box = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        index = (box - self.origin) @ self.inverse.T
        start = np.maximum(np.floor(index.min(axis=0)).astype(int), 0)
        stop = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 1, np.array(self.size))
        if np.any(stop <= start):
            return None
        return (slice(start[2], stop[2]), slice(start[1], stop[1]), slice(start[0], stop[0]))

    def local_coordinates(self, slices, centre: np.ndarray, axes: np.ndarray):
        """Coordinates (mm) along ``axes`` (rows: unit vectors) of the voxel centres in ``slices``.

        Returns three arrays broadcastable to the box shape (a term is dropped where an
        axis is parallel to the box's index axes, so axis-aligned boxes stay thin).
        """
        ramps = [
            np.arange(slices[2].start, slices[2].stop, dtype=np.float32)[None, None, :],
            np.arange(slices[1].start, slices[1].stop, dtype=np.float32)[None, :, None],
            np.arange(slices[0].start, slices[0].stop, dtype=np.float32)[:, None, None],
        ]
        out = []
        for axis in axes:
            coefficients = axis @ self.matrix  # d(local)/d(index i, j, k)
            value = np.float32(axis @ (self.origin - centre))
            for c, ramp in zip(coefficients, ramps):
                if abs(c) > 1e-7:
                    value = value + np.float32(c) * ramp
            out.append(np.asarray(value, dtype=np.float32))
        return out

    def world_coordinates(self, slices):
        return self.local_coordinates(slices, np.zeros(3), np.eye(3))

    def full(self):
        return (slice(0, self.size[2]), slice(0, self.size[1]), slice(0, self.size[0]))


def _box_shape(slices) -> Tuple[int, int, int]:
    return tuple(s.stop - s.start for s in slices)


# --------------------------------------------------------------------------------------
# Signed-distance primitives (mm, negative inside); arguments are broadcastable arrays.


def _max_of(arrays):
    """Elementwise maximum of broadcastable arrays (intersection of shapes)."""
    out = arrays[0]
    for a in arrays[1:]:
        out = np.maximum(out, a)
    return out


def _sd_ellipse(x, y, a: float, b: float):
    """First-order signed distance to the ellipse (x/a)^2 + (y/b)^2 = 1."""
    rho = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    grad = np.sqrt((x / (a * a)) ** 2 + (y / (b * b)) ** 2)
    return (rho - 1.0) * rho / np.maximum(grad, 1e-6)


def _sd_ellipsoid(x, y, z, a: float, b: float, c: float):
    rho = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    grad = np.sqrt((x / (a * a)) ** 2 + (y / (b * b)) ** 2 + (z / (c * c)) ** 2)
    return (rho - 1.0) * rho / np.maximum(grad, 1e-6)


def _sd_capsule(x, y, z, p0, p1, radius: float):
    d = np.asarray(p1, dtype=np.float64) - np.asarray(p0, dtype=np.float64)
    length2 = float(d @ d)
    px, py, pz = x - p0[0], y - p0[1], z - p0[2]
    if length2 < 1e-9:
        return np.sqrt(px * px + py * py + pz * pz) - radius
    t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / length2, 0.0, 1.0)
    qx, qy, qz = px - t * d[0], py - t * d[1], pz - t * d[2]
    return np.sqrt(qx * qx + qy * qy + qz * qz) - radius


class _Primitive:
    """A shape in a vertebra frame: its local AABB and a signed-distance function."""

    def __init__(self, lo, hi, function):
        self.lo = np.asarray(lo, dtype=float)
        self.hi = np.asarray(hi, dtype=float)
        self.function = function


def _capsule(p0, p1, r) -> _Primitive:
    p0 = np.asarray(p0, dtype=float)
    p1 = np.asarray(p1, dtype=float)
    return _Primitive(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r, lambda u, v, w: _sd_capsule(u, v, w, p0, p1, r))


def _ellipsoid(c, radii) -> _Primitive:
    c = np.asarray(c, dtype=float)
    a, b, cc = radii
    return _Primitive(c - radii, c + np.asarray(radii), lambda u, v, w: _sd_ellipsoid(u - c[0], v - c[1], w - c[2], a, b, cc))


def _elliptic_cylinder(cu, cv, a, b, w0, w1) -> _Primitive:
    mid, half = 0.5 * (w0 + w1), 0.5 * (w1 - w0)
    return _Primitive(
        [cu - a, cv - b, w0], [cu + a, cv + b, w1],
        lambda u, v, w: np.maximum(_sd_ellipse(u - cu, v - cv, a, b), np.abs(w - mid) - half),
    )


# --------------------------------------------------------------------------------------
# Painting helpers


def _corners(lo, hi) -> np.ndarray:
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])], dtype=float)


def _to_world(local_points: np.ndarray, lv_centre: np.ndarray, axes: np.ndarray) -> np.ndarray:
    return lv_centre[None, :] + local_points @ axes


def _paint(grid: _Grid, slices, mask, hu, tissue: int, label: Optional[int] = None, protect_labels: bool = False):
    """Write ``hu`` (scalar or array like ``mask``) and ``tissue`` where ``mask``."""
    if mask is None or not np.any(mask):
        return
    shape = _box_shape(slices)
    mask = np.broadcast_to(mask, shape)
    if protect_labels:
        mask = mask & (grid.labels[slices] == 0)
    ct = grid.ct[slices]
    if np.ndim(hu) == 0:
        ct[mask] = hu
    else:
        ct[mask] = np.broadcast_to(hu, shape)[mask]
    grid.tissue[slices][mask] = tissue
    if label is not None:
        grid.labels[slices][mask] = label


def _paint_local(grid: _Grid, centre, axes, lo, hi, function, hu, tissue: int, margin: float = 1.0):
    """Paint ``function(u, v, w) < 0`` of a shape given in a local frame."""
    slices = grid.index_box(_to_world(_corners(lo, hi), centre, axes), margin)
    if slices is None:
        return
    u, v, w = grid.local_coordinates(slices, centre, axes)
    _paint(grid, slices, function(u, v, w) < 0, hu, tissue)


def _paint_bone(grid: _Grid, centre, axes, primitives: List[_Primitive], carve: List[_Primitive],
                cortical: float, core: float, cortex_mm: float, tissue: int, label: Optional[int]):
    """Union of primitives (minus carve), cortex = its outer ``cortex_mm``; labels never overwritten."""
    lo = np.min([q.lo for q in primitives], axis=0)
    hi = np.max([q.hi for q in primitives], axis=0)
    slices = grid.index_box(_to_world(_corners(lo, hi), centre, axes), 1.0)
    if slices is None:
        return None
    shape = _box_shape(slices)
    distance = np.full(shape, 1e3, dtype=np.float32)
    for q in primitives:
        sub = grid.index_box(_to_world(_corners(q.lo, q.hi), centre, axes), 1.0)
        if sub is None:
            continue
        inner = tuple(slice(max(s.start, b.start) - b.start, min(s.stop, b.stop) - b.start) for s, b in zip(sub, slices))
        if any(x.stop <= x.start for x in inner):
            continue
        absolute = tuple(slice(x.start + b.start, x.stop + b.start) for x, b in zip(inner, slices))
        u, v, w = grid.local_coordinates(absolute, centre, axes)
        distance[inner] = np.minimum(distance[inner], q.function(u, v, w))
    if carve:
        u, v, w = grid.local_coordinates(slices, centre, axes)
        for q in carve:
            distance = np.maximum(distance, -q.function(u, v, w))
    inside = distance < 0
    hu = np.where(distance > -cortex_mm, np.float32(cortical), np.float32(core))
    _paint(grid, slices, inside, hu, tissue, label, protect_labels=label is not None)
    return slices
