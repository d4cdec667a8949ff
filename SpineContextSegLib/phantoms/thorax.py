"""The chest wall of the phantom: ribs with costal cartilage, the sternum and the scapulae.

Lungs and heart are painted with the torso (:mod:`.body`); the scapulae only in the real
anatomy style (:mod:`.bone_shapes`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import numpy as np

from SpineContextSegLib.phantoms.body import _Profile
from SpineContextSegLib.phantoms.canvas import (
    TISSUE_CODES,
    _capsule,
    _Grid,
    _paint,
    _paint_bone,
    _paint_local,
    _Primitive,
    _sd_capsule,
    _sd_ellipse,
    _to_world,
)
from SpineContextSegLib.phantoms.spine import _frame, _Level, _level_z

_RIB_SCALE = (0.45, 0.62, 0.74, 0.83, 0.9, 0.95, 1.0, 1.0, 0.98, 0.95, 0.9, 0.85, 0.8)
_RIB_END = (0.85, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85, 0.75, 0.75, 0.72, 0.55, 0.4, 0.35)


def _paint_ribs(grid: _Grid, levels: List[_Level], p: Dict[str, Any], profile: _Profile):
    """Ribs of the thoracic levels (drawn or not), costal cartilage and the sternum."""
    hu = p["hu"]
    s = p["size_scale"]
    thoracic = [lv for lv in levels if lv.region == "thoracic"]
    cortical, core = hu["cortical"] * 0.9, hu["thin_bone_core"]
    for k, lv in enumerate(thoracic):
        hw = float(profile.half_width(lv.centre[2]))
        hd = float(profile.half_depth(lv.centre[2]))
        back = float(profile.back(lv.centre[2]))
        wall = p["fat_mm"] + p["muscle_wall_mm"] * 0.5
        scale = _RIB_SCALE[min(k, 12)]
        c_off = 0.5 * lv.width + 25.0 * s
        a_r = max(20.0, (hw - wall - c_off) * scale)
        v_post = 0.5 * lv.depth + 18.0 * s
        v_front = -(2 * hd - back) + wall
        b_r = 0.5 * (v_post - v_front) * (0.6 + 0.4 * scale)
        v_e = v_post - b_r
        end = _RIB_END[min(k, 12)] * math.pi
        drop = (10.0 + 25.0 * scale) * s
        t_r, h_r = 3.0 * s, 5.0 * s
        for side in (-1, 1):
            start_u = 0.5 * lv.width + 1.0
            phi0 = -math.asin(min(0.99, (c_off - start_u) / a_r))
            phis = np.linspace(phi0, end, 9)
            if p["anatomy"] == "real":  # head at the costovertebral joint, neck to the transverse process
                head = np.array([side * (0.5 * lv.width - 2.0 * s), 0.3 * lv.depth, p["rib_head_rise"] * lv.height])
                tubercle = np.array([side * (c_off + a_r * math.sin(phi0)), v_e + b_r * math.cos(phi0), 0.0])
                _paint_bone(grid, lv.centre, lv.axes, [_capsule(head, tubercle, 4.0 * s)], [], cortical, core, 1.2, TISSUE_CODES["rib"], None)

            def rib_sd(u, v, w, side=side, phi0=phi0, end=end, a_r=a_r, b_r=b_r, v_e=v_e, c_off=c_off, drop=drop):
                du = side * u - c_off
                dv = v - v_e
                phi = np.arctan2(du / a_r, dv / b_r)
                rho = np.sqrt((du / a_r) ** 2 + (dv / b_r) ** 2)
                radial = np.sqrt(du * du + dv * dv) * (1.0 - 1.0 / np.maximum(rho, 1e-3))
                phi_c = np.clip(phi, phi0, end)
                w_c = -drop * (phi_c - phi0) / math.pi
                along = np.abs(phi - phi_c) * np.sqrt(a_r * b_r)
                return np.sqrt((radial / t_r) ** 2 + ((w - w_c) / h_r) ** 2 + (along / t_r) ** 2) * t_r - t_r

            for c0, c1 in zip(phis[:-1], phis[1:]):
                sub = np.linspace(c0, c1, 4)
                pts = np.stack([side * (c_off + a_r * np.sin(sub)), v_e + b_r * np.cos(sub), -drop * (sub - phi0) / math.pi], axis=1)
                slices = grid.index_box(_to_world(pts, lv.centre, lv.axes), h_r + 3.0)
                if slices is None:
                    continue
                u, v, w = grid.local_coordinates(slices, lv.centre, lv.axes)
                d = rib_sd(u, v, w)
                # keep only this chunk's part of the arc (avoid double work at chunk ends)
                inside = d < 0
                if not np.any(inside):
                    continue
                hu_box = np.where(d > -1.2, np.float32(cortical), np.float32(core))
                _paint(grid, slices, inside, hu_box, TISSUE_CODES["rib"])
            if _RIB_END[min(k, 12)] >= 0.85 and k < 7:  # costal cartilage towards the sternum
                phi_a, phi_b = end, 0.98 * math.pi
                pts = np.stack([side * (c_off + a_r * np.sin(np.linspace(phi_a, phi_b, 4))), v_e + b_r * np.cos(np.linspace(phi_a, phi_b, 4)), -drop * (np.linspace(phi_a, phi_b, 4) - phi0) / math.pi], axis=1)
                world = _to_world(pts, lv.centre, lv.axes)
                for q0, q1 in zip(world[:-1], world[1:]):
                    _paint_local(grid, np.zeros(3), np.eye(3), np.minimum(q0, q1) - 5, np.maximum(q0, q1) + 5,
                                 lambda x, y, z, q0=q0, q1=q1: _sd_capsule(x, y, z, q0, q1, 3.5 * s), hu["cartilage"], TISSUE_CODES["cartilage"])
    # Sternum: a plate in front, from T2 to T9 level.
    ids = {lv.verse_id: lv for lv in levels}
    if 9 in ids and 16 in ids:
        top, bottom = ids[9], ids[16]
        hd_top = float(profile.half_depth(top.centre[2]))
        back_top = float(profile.back(top.centre[2]))
        hd_bot = float(profile.half_depth(bottom.centre[2]))
        back_bot = float(profile.back(bottom.centre[2]))
        wall = p["fat_mm"] + 6.0
        y_top = -(2 * hd_top - back_top) + wall + 8.0
        y_bot = -(2 * hd_bot - back_bot) + wall + 8.0
        q0 = np.array([top.centre[0], y_top, top.centre[2] - 10.0])
        q1 = np.array([bottom.centre[0], y_bot, bottom.centre[2] - 20.0])
        axis = (q0 - q1) / np.linalg.norm(q0 - q1)
        axes = _frame(axis)
        length = float(np.linalg.norm(q0 - q1))
        centre = 0.5 * (q0 + q1)
        half_w = 16.0 * s

        def sternum(u, v, w):
            return np.maximum(_sd_ellipse(u, v, half_w, 6.0 * s), np.abs(w) - 0.5 * length)

        _paint_bone(grid, centre, axes, [_Primitive([-half_w, -6 * s, -0.5 * length], [half_w, 6 * s, 0.5 * length], sternum)], [],
                    cortical, core, 1.5, TISSUE_CODES["sternum"], None)


#: Turn of the scapula template about the vertical axis: its blade then lies ~35 deg from the
#: coronal plane over the posterior ribs, as in a supine chest CT (the mesh's frame is steeper).
SCAPULA_TURN_DEG = 20.0


def _paint_scapulae(grid: _Grid, levels: List[_Level], p: Dict[str, Any], profile: _Profile):
    """Both scapulae (real shape, the left one mirrored) on the back of the chest, T2-T7."""
    from SpineContextSegLib.phantoms.bone_shapes import load_bone_shapes

    template = load_bone_shapes().get("scapula")
    if template is None:
        return
    hu = p["hu"]
    scale = p["size_scale"] * p["scapula_scale"]
    z = 0.5 * (_level_z(levels, 10) + _level_z(levels, 12))  # T3-T5: the middle of the blade
    _, hi = template.extent_mm(np.array([scale] * 3))
    y = float(profile.back(z)) - p["fat_mm"] - 5.0 * p["size_scale"] - 0.6 * float(hi[1])  # the blade just under the fat
    turn = math.radians(SCAPULA_TURN_DEG)
    for side in (-1, 1):  # the template is a right scapula (patient right = -x)
        stretch = np.array([-side * scale, scale, scale])
        lo, hi = template.extent_mm(stretch)
        centre = np.array([side * p["scapula_spread"] * float(profile.half_width(z)), y, z])
        c, s_ = math.cos(side * turn), math.sin(side * turn)
        axes = np.array([[c, s_, 0.0], [-s_, c, 0.0], [0.0, 0.0, 1.0]])
        _paint_bone(grid, centre, axes, [_Primitive(lo, hi, lambda u, v, w, st=stretch: template.distance_mm(u, v, w, st))], [],
                    hu["cortical"] * 0.9, hu["thin_bone_core"], 1.2, TISSUE_CODES["scapula"], None)
