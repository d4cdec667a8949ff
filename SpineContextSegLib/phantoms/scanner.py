"""What the scan adds to the phantom: its field of view and low-dose streaks.

:func:`_field_of_view` chooses the scanned box (whole torso and table, around the spine, or a
sagittal slab) and where the table lies; :func:`_add_streaks` draws low-dose streak artefacts.
Bone texture, blur and noise are applied by
:func:`~SpineContextSegLib.phantoms.generator.generate_phantom_arrays`, the table is painted with
the torso (:mod:`.body`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import numpy as np

from SpineContextSegLib.labels import SACRUM_ID
from SpineContextSegLib.phantoms.body import _Profile
from SpineContextSegLib.phantoms.canvas import TISSUE_CODES, _corners, _Grid, _to_world
from SpineContextSegLib.phantoms.spine import _Level, _level_z


def _field_of_view(p: Dict[str, Any], levels: List[_Level], drawn: List[_Level]):
    """World AABB (lo, hi in mm) of the field of view, and the torso :class:`~SpineContextSegLib.phantoms.body._Profile`."""
    s = p["size_scale"]
    # A generous local box around the first and last vertebra (spinous processes hang down).
    z_top = float(_to_world(_corners([-40, -30, -30], [40, 80, 30]), drawn[0].centre, drawn[0].axes)[:, 2].max())
    z_bottom = float(_to_world(_corners([-40, -30, -40], [40, 80, 30]), drawn[-1].centre, drawn[-1].axes)[:, 2].min())
    if drawn[-1].verse_id == SACRUM_ID:
        z_bottom = min(z_bottom, float(_to_world(_corners([-60, -20, -100 * s], [60, 80, 20]), drawn[-1].centre, drawn[-1].axes)[:, 2].min()))
    z_top += p["margin_top_mm"] - 15.0
    z_bottom -= p["margin_bottom_mm"] - 15.0
    profile = _Profile(levels, p)
    zs = np.linspace(z_bottom, z_top, 16)
    max_hw = float(profile.half_width(zs).max())
    y_front = float(profile.front(zs).min())
    y_back = float(profile.back(zs).max())
    p["table_y_mm"] = y_back + p["table_gap_mm"]
    spine_x = [float(lv.centre[0]) for lv in drawn]
    fov = p["field_of_view"]
    if fov == "torso":
        lo = np.array([-max_hw - 10.0, y_front - 10.0, z_bottom])
        hi = np.array([max_hw + 10.0, p["table_y_mm"] + p["table_thickness_mm"] + 5.0, z_top])
    elif fov == "spine":
        half = p["spine_fov_half_width_mm"] * s
        lo = np.array([min(spine_x) - half, -60.0 * s - 30.0, z_bottom])
        hi = np.array([max(spine_x) + half, y_back + 10.0, z_top])
    else:
        half = p["fov_half_width_mm"]
        lo = np.array([float(np.mean(spine_x)) - half, y_front - 10.0, z_bottom])
        hi = np.array([float(np.mean(spine_x)) + half, y_back + 10.0, z_top])
    return lo, hi, profile


def _add_streaks(ct: np.ndarray, grid: _Grid, levels: List[_Level], p: Dict[str, Any]) -> None:
    """Low-dose streaks in place: thin bright and dark lines across axial slices, inside the body.

    Eight lines at random angles through the torso, strongest at the shoulders (above T3) and
    fading to a fifth by T8, as photon starvation draws them in a real low-dose chest CT.
    """
    x, y, z = grid.world_coordinates(grid.full())
    z_top, z_bottom = _level_z(levels, 10), _level_z(levels, 15)
    envelope = np.clip((z - z_bottom) / max(z_top - z_bottom, 1.0), 0.2, 1.0).astype(np.float32)
    y0 = float(np.mean([lv.centre[1] for lv in levels])) - 60.0 * p["size_scale"]
    pattern = np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=np.float32)
    for angle, offset, sign in zip(p["streak_angles_deg"], p["streak_offsets"], p["streak_signs"]):
        theta = math.radians(angle)
        distance = (x - 100.0 * offset) * math.sin(theta) - (y - y0) * math.cos(theta)
        pattern += np.float32(sign) * np.exp(-np.square(distance / np.float32(1.2)))
    inside = grid.tissue != TISSUE_CODES["air"]
    ct += np.where(inside, pattern * envelope * np.float32(p["streaks_hu"]), np.float32(0.0))
