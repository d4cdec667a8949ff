"""Real bone shapes for the phantom generator: signed-distance maps of T1-L5 and the scapula.

``resources/anatomy/bone_shapes.npz`` holds the surface meshes of MyoSuite's musculoskeletal
model (PyPI ``myo-sim`` 0.2.4, Apache-2.0; ``resources/anatomy/NOTICE.txt``) as signed distance
maps (int8, mm = value x ``step``, negative inside), built by ``scripts/make_bone_shapes.py``.
Each vertebra's map lies in the phantom's vertebra frame: u = patient left, v = posterior,
w = superior (mm), origin at the centre of the vertebral body, whose width, depth and height
are stored beside it, so a shape can be stretched onto any drawn body size.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from SpineContextSegLib import RESOURCES_DIR

BONE_SHAPES_PATH = os.path.join(RESOURCES_DIR, "anatomy", "bone_shapes.npz")


@dataclass(frozen=True)
class ShapeTemplate:
    """One bone's signed distance map.

    Attributes
    ----------
    sdf_mm : ndarray, float32, shape (nw, nv, nu)
        Signed distance (mm, negative inside), clipped to +-``clip_mm``.
    origin_mm : ndarray, shape (3,)
        (u, v, w) of voxel (0, 0, 0) relative to the body centre (vertebrae) or the bone's centre.
    grid_mm : float
        Spacing of the map.
    body_mm : ndarray, shape (3,)
        Width (u), depth (v) and height (w) of the vertebral body (the scapula: its extent).
    """

    sdf_mm: np.ndarray
    origin_mm: np.ndarray
    grid_mm: float
    body_mm: np.ndarray
    clip_mm: float

    def extent_mm(self, scale_uvw) -> tuple:
        """(lo, hi) local corners (mm) of the map stretched by ``scale_uvw``."""
        lo = self.origin_mm * scale_uvw
        hi = (self.origin_mm + (np.array(self.sdf_mm.shape[::-1]) - 1) * self.grid_mm) * scale_uvw
        return np.minimum(lo, hi), np.maximum(lo, hi)

    def distance_mm(self, u, v, w, scale_uvw) -> np.ndarray:
        """Signed distance (mm, approximate) at local points, the shape stretched by ``scale_uvw``.

        ``u, v, w`` are broadcastable arrays (mm); a negative scale mirrors that axis. The
        distance of the template is scaled by the mean absolute stretch (exact for an isotropic
        stretch; near the surface, where the phantom uses it, a good approximation otherwise).
        """
        from scipy import ndimage

        u, v, w = np.broadcast_arrays(u, v, w)
        scale = np.asarray(scale_uvw, dtype=np.float64)
        index = [
            (np.asarray(c, dtype=np.float32) / np.float32(s) - np.float32(o)) / np.float32(self.grid_mm)
            for c, s, o in ((w, scale[2], self.origin_mm[2]), (v, scale[1], self.origin_mm[1]), (u, scale[0], self.origin_mm[0]))
        ]
        values = ndimage.map_coordinates(self.sdf_mm, [i.ravel() for i in index], order=1, mode="constant", cval=self.clip_mm)
        return values.reshape(u.shape) * np.float32(np.mean(np.abs(scale)))


@functools.lru_cache(maxsize=1)
def load_bone_shapes(path: Optional[str] = None) -> Dict[str, ShapeTemplate]:
    """Templates by key: ``"8"`` ... ``"24"`` (VerSe ids T1-L5) and ``"scapula"`` (right side).

    Returns an empty dict when the file is absent (the phantom then keeps its geometric shapes).
    """
    path = path or BONE_SHAPES_PATH
    if not os.path.isfile(path):
        return {}
    out: Dict[str, ShapeTemplate] = {}
    with np.load(path) as data:
        step = float(data["step_mm"])
        clip = float(data["clip_mm"])
        for name in data.files:
            if not name.endswith("_sdf"):
                continue
            prefix = name[: -len("_sdf")]
            key = prefix[1:] if prefix.startswith("v") and prefix[1:].isdigit() else prefix
            out[key] = ShapeTemplate(
                sdf_mm=data[name].astype(np.float32) * np.float32(step),
                origin_mm=data[f"{prefix}_origin_mm"].astype(np.float64),
                grid_mm=float(data[f"{prefix}_grid_mm"]),
                body_mm=data[f"{prefix}_body_mm"].astype(np.float64),
                clip_mm=clip,
            )
    return out
