"""The phantom's torso: body outline, table, organs, pelvis, muscles and great vessels.

:class:`_Profile` gives the torso's half-width, half-depth and back distance along z;
:func:`_paint_body` paints the full-volume layers (CT table, skin fat, muscle wall, lungs,
heart and abdominal organs), :func:`_paint_pelvis` the iliac wings beside the sacrum and
:func:`_paint_muscles_and_vessels` the paraspinal and psoas muscles, aorta and vena cava.
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from SpineContextSegLib.labels import SACRUM_ID
from SpineContextSegLib.phantoms.canvas import (
    TISSUE_CODES,
    _corners,
    _Grid,
    _max_of,
    _paint,
    _paint_bone,
    _paint_local,
    _Primitive,
    _sd_ellipse,
    _sd_ellipsoid,
)
from SpineContextSegLib.phantoms.spine import _Level, _level_z


def _profile(levels: List[_Level], p: Dict[str, Any]):
    """Torso half-width, half-depth and back distance (mm) at each level's z, cranio-caudal."""
    s = p["size_scale"]
    z = np.array([lv.centre[2] for lv in levels])
    pos = np.array([lv.position for lv in levels])
    half_width = np.interp(pos, [0, 5.5, 7.5, 12, 18, 21, 24], [62, 62, 145, 160, 160, 160, 170]) * s * p["torso_width_scale"]
    half_depth = np.interp(pos, [0, 5.5, 7.5, 12, 18, 21, 24], [60, 60, 95, 110, 110, 110, 105]) * s * p["torso_depth_scale"]
    back = np.interp(pos, [0, 5.5, 7.5, 12, 18, 21, 24], [50, 50, 80, 85, 90, 92, 95]) * s
    return z, half_width, half_depth, back


class _Profile:
    """Torso half-width, half-depth and back distance (mm from the spine) as functions of z."""

    def __init__(self, levels: List[_Level], p: Dict[str, Any]):
        z, self._hw, self._hd, self._back = _profile(levels, p)
        order = np.argsort(z)
        self._z = z[order]
        self._hw, self._hd, self._back = self._hw[order], self._hd[order], self._back[order]

    def half_width(self, z):
        return np.interp(z, self._z, self._hw)

    def half_depth(self, z):
        return np.interp(z, self._z, self._hd)

    def back(self, z):
        return np.interp(z, self._z, self._back)

    def front(self, z):
        """y (mm) of the anterior skin."""
        return self.back(z) - 2.0 * self.half_depth(z)


# --------------------------------------------------------------------------------------
# Torso, organs, table


def _paint_body(grid: _Grid, levels: List[_Level], p: Dict[str, Any], profile: _Profile):
    """Table, skin fat, muscle wall, lungs and organs (the full-volume passes)."""
    hu = p["hu"]
    full = grid.full()
    x, y, z = grid.world_coordinates(full)
    hw = profile.half_width(z).astype(np.float32)
    hd = profile.half_depth(z).astype(np.float32)
    back = profile.back(z).astype(np.float32)
    yc = back - hd  # torso centre (the spine is near y = 0)
    # Table: a plate curving up at the sides, under the back.
    ty = p["table_y_mm"] - 0.0008 * x * x
    thick = p["table_thickness_mm"]
    table = (y >= ty) & (y <= ty + thick) & (np.abs(x) < 230.0)
    _paint(grid, full, table, hu["table"], TISSUE_CODES["table"])
    if p["table_kind"] == "foam":  # a foam core between two shells
        core = (y >= ty + 2.5) & (y <= ty + thick - 2.5) & (np.abs(x) < 225.0)
        _paint(grid, full, core, hu["table_foam"], TISSUE_CODES["table"])
    # Torso layers.
    rho = np.sqrt((x / hw) ** 2 + ((y - yc) / hd) ** 2)
    r_min = np.minimum(hw, hd)
    depth = (1.0 - rho) * r_min  # approximate depth under the skin (mm)
    _paint(grid, full, depth > 0, hu["fat"], TISSUE_CODES["fat"])
    fat = p["fat_mm"] * np.clip(r_min / 110.0, 0.4, 1.0)
    wall = fat + p["muscle_wall_mm"]
    _paint(grid, full, depth > fat, hu["muscle"], TISSUE_CODES["muscle"])
    inner = depth > wall
    z_t1 = _level_z(levels, 8)
    z_dia = _level_z(levels, 17)
    z_l1 = _level_z(levels, 20)
    z_s = _level_z(levels, SACRUM_ID)
    neck = z > z_t1 + 15.0
    _paint(grid, full, inner & ~neck, hu["organ"], TISSUE_CODES["organ"])
    _paint(grid, full, inner & neck, hu["muscle"], TISSUE_CODES["muscle"])
    # Lungs above a domed diaphragm, around the mediastinum and the paravertebral gutter.
    s = p["size_scale"]
    dome = z_dia + 35.0 * np.clip(1.0 - (np.abs(x) / (hw + 1e-3)) ** 2, 0.0, 1.0) + 10.0 * (x < 0)
    apex = np.clip(1.0 - ((z - z_t1) / 40.0), 0.0, 1.0)  # lungs narrow above T1
    front = back - 2.0 * hd + wall  # inner anterior wall
    mediastinum = (((x - 10.0 * s) / (38.0 * s)) ** 2 + ((y - 0.5 * front) / (0.5 * np.abs(front) + 8.0)) ** 2) < 1.0
    paravertebral = ((x / (32.0 * s)) ** 2 + ((y - 8.0 * s) / (36.0 * s)) ** 2) < 1.0
    lung = (depth > wall + 4.0) & (z > dome) & (z < z_t1 + 40.0) & ~mediastinum & ~paravertebral
    lung &= (z < z_t1) | (rho < 1.0 - (1.0 - apex) * 0.9)
    _paint(grid, full, lung, hu["lung"], TISSUE_CODES["lung"])
    contrast = p["contrast"]
    s = p["size_scale"]
    # Heart, liver, kidneys, bowel (ellipsoids in the world frame).
    z_t8 = _level_z(levels, 15)
    _paint_world_ellipsoid(grid, [20.0 * s, -90.0 * s, z_t8 - 20.0], [60 * s, 50 * s, 55 * s], hu["heart_contrast"] if contrast else hu["blood"], "blood", within=inner)
    _paint_world_ellipsoid(grid, [-70.0 * s, -70.0 * s, z_dia - 30.0], [75 * s, 75 * s, 70 * s], hu["liver"], "organ", below_z=z_dia + 30.0, within=inner)
    z_l2 = _level_z(levels, 21)
    kidney = hu["kidney_contrast"] if contrast else hu["kidney"]
    for side in (-1, 1):
        _paint_world_ellipsoid(grid, [side * 65.0 * s, 10.0 * s, z_l2 + 20.0], [28 * s, 25 * s, 55 * s], kidney, "organ", within=inner)
    for bx, by, bz, br, gas in p["bowel"]:
        centre = [bx * 90.0 * s, -60.0 * s + by * 40.0 * s, z_s + 30.0 + bz * (z_l1 - z_s)]
        value = -1000.0 if gas else hu["organ"] - 15.0
        br = br * (0.4 if gas else 1.0)  # gas pockets are small
        _paint_world_ellipsoid(grid, centre, [br * s, br * s, br * s * 1.3], value, "gas" if gas else "organ", within=inner)


def _paint_world_ellipsoid(grid: _Grid, centre, radii, value, tissue: str, below_z=None, within=None):
    """Paint an axis-aligned ellipsoid (world mm), optionally below ``below_z`` and inside the mask ``within``."""
    centre = np.asarray(centre, dtype=float)
    radii = np.asarray(radii, dtype=float)
    slices = grid.index_box(_corners(centre - radii, centre + radii), 1.0)
    if slices is None:
        return
    x, y, z = grid.local_coordinates(slices, centre, np.eye(3))
    mask = (x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2 < 1.0
    if below_z is not None:
        mask = mask & (z + centre[2] < below_z)
    if within is not None:
        mask = mask & np.broadcast_to(within, grid.ct.shape)[slices]
    _paint(grid, slices, mask, value, TISSUE_CODES[tissue])


def _paint_pelvis(grid: _Grid, sacrum: _Level, p):
    hu = p["hu"]
    s = p["size_scale"]
    cortical, core = p["hu"]["cortical"] * 0.9, hu["thin_bone_core"]
    top = 0.5 * sacrum.height
    length = 95.0 * s
    for side in (-1, 1):
        c = np.array([side * 45.0 * s, -40.0 * s, 5.0 * s])
        radii = (85.0 * s, 60.0 * s, 75.0 * s)

        def wing(u, v, w, side=side, c=c, radii=radii):
            d = np.abs(_sd_ellipsoid(u - c[0], v - c[1], w - c[2], *radii)) - 4.0 * s
            t = np.clip((top - w) / length, 0.0, 1.0)
            half_sacrum = 52.0 * s * (1.0 - 0.75 * t)
            medial = np.where(w > top, 58.0 * s, half_sacrum + 3.0 * s) - side * u
            return _max_of([d, medial, w - 50.0 * s, -55.0 * s - w, -45.0 * s - v])

        lo = [min(side * 40.0 * s, side * 135.0 * s), -50.0 * s, -60.0 * s]
        hi = [max(side * 40.0 * s, side * 135.0 * s), 40.0 * s, 55.0 * s]
        _paint_bone(grid, sacrum.centre, sacrum.axes, [_Primitive(lo, hi, wing)], [], cortical, core, 1.5, TISSUE_CODES["pelvis"], None)


def _paint_muscles_and_vessels(grid: _Grid, levels: List[_Level], drawn_index: List[int], p: Dict[str, Any]):
    """Erector spinae and psoas muscles, aorta and vena cava, per level in its frame."""
    hu = p["hu"]
    s = p["size_scale"]
    muscle = hu["muscle"]
    contrast = p["contrast"]
    aorta_hu = hu["aorta_contrast"] if contrast else hu["blood"]
    cava_hu = 0.5 * (hu["aorta_contrast"] + hu["blood"]) if contrast else hu["blood"]
    for lv in levels[max(0, drawn_index[0] - 2): drawn_index[-1] + 3]:
        if lv.verse_id == SACRUM_ID:
            continue
        half = 0.5 * (lv.height + lv.disc_below) + 2.0
        a, b = 0.5 * lv.width, 0.5 * lv.depth
        vc = b + lv.canal_b + 1.0
        size = float(np.interp(lv.position, [0, 7, 18, 23], [12, 15, 20, 26])) * s
        for side in (-1, 1):
            cu, cv = side * (lv.canal_a + lv.arch_t + 0.8 * size), vc + 0.6 * lv.canal_b + 0.7 * size
            _paint_local(grid, lv.centre, lv.axes, [cu - size, cv - size, -half], [cu + size, cv + size, half],
                         lambda u, v, w, cu=cu, cv=cv, r=size: np.maximum(_sd_ellipse(u - cu, v - cv, r, r * 0.9), np.abs(w) - half),
                         muscle, TISSUE_CODES["muscle"])
            if lv.position >= 18.5:  # psoas grows caudally
                r = (6.0 + 4.0 * (lv.position - 18.5)) * s
                cu = side * (a + r * 0.8)
                _paint_local(grid, lv.centre, lv.axes, [cu - r, -r, -half], [cu + r, r, half],
                             lambda u, v, w, cu=cu, r=r: np.maximum(_sd_ellipse(u - cu, v, r, r * 0.9), np.abs(w) - half),
                             muscle, TISSUE_CODES["muscle"])
        if 10 <= lv.position <= 22.5:  # descending aorta (left) and vena cava (right) down to L4
            r = float(np.interp(lv.position, [10, 22], [13, 10])) * s
            for cu, cv, value, rr in ((0.3 * lv.width + r, -(b + r + p["aorta_gap_mm"] * s), aorta_hu, r),
                                       (-(0.3 * lv.width + r + 8.0 * s), -(b + r + 8.0 * s), cava_hu, r * 1.1)):
                if lv.position < 17 and value is cava_hu:
                    continue  # the cava runs into the heart above the diaphragm
                _paint_local(grid, lv.centre, lv.axes, [cu - rr, cv - rr, -half], [cu + rr, cv + rr, half],
                             lambda u, v, w, cu=cu, cv=cv, rr=rr: np.maximum(_sd_ellipse(u - cu, v - cv, rr, rr), np.abs(w) - half),
                             value, TISSUE_CODES["blood"])
