"""The spinal column of the phantom: the levels, their curve and the vertebrae.

:class:`_Level` (one level of the chain: body, disc, canal, arch dimensions and its frame) and
:func:`_build_levels` (the curve: lordosis, kyphosis, scoliosis, sacral tilt); the geometric
vertebra (:func:`_vertebra_primitives`), the sacrum, the real-shape vertebrae
(:mod:`.bone_shapes`), discs and spinal canal, and pedicle screws with rods.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import numpy as np

from SpineContextSegLib.labels import L6_ID, SACRUM_ID, STANDARD_CHAIN, T13_ID
from SpineContextSegLib.phantoms.canvas import (
    TISSUE_CODES,
    _capsule,
    _elliptic_cylinder,
    _ellipsoid,
    _Grid,
    _max_of,
    _paint_bone,
    _paint_local,
    _Primitive,
    _sd_capsule,
    _sd_ellipse,
    _to_world,
)

# Anatomical position along the standard chain C1=0 ... L5=23, sacrum=24 (T13, L6 in between).
_POSITION = {v: float(i) for i, v in enumerate(STANDARD_CHAIN)}
_POSITION[T13_ID] = 18.5
_POSITION[L6_ID] = 23.5

# Anchor positions (C3, C7, T1, T6, T12, L3, L5) and body width, depth, height, disc below (mm).
_ANCHOR_POS = np.array([2.0, 6.0, 7.0, 12.0, 18.0, 21.0, 23.0])
_BODY_WIDTH = np.array([17.0, 22.0, 26.0, 30.0, 40.0, 46.0, 50.0])
_BODY_DEPTH = np.array([15.0, 16.0, 17.0, 25.0, 30.0, 33.0, 34.0])
_BODY_HEIGHT = np.array([13.0, 14.0, 16.0, 20.0, 24.0, 27.0, 27.0])
_DISC_HEIGHT = np.array([5.0, 5.0, 4.0, 5.0, 7.0, 10.0, 11.0])
# Canal half-width / half-depth, arch thickness, pedicle radius.
_CANAL_A = np.array([12.0, 12.0, 9.0, 8.5, 10.0, 11.5, 12.0])
_CANAL_B = np.array([8.0, 8.0, 7.5, 7.5, 8.5, 9.0, 9.0])
_ARCH_T = np.array([4.0, 4.5, 5.0, 5.0, 6.0, 7.0, 7.0])
_PEDICLE_R = np.array([2.5, 3.0, 3.5, 3.5, 4.5, 5.0, 5.5])


# --------------------------------------------------------------------------------------
# Frames and the spine curve


def _frame(tangent_up: np.ndarray) -> np.ndarray:
    """Rows e_u (left), e_v (posterior), e_w (superior) for a superior-pointing tangent."""
    e_w = tangent_up / np.linalg.norm(tangent_up)
    e_u = np.array([1.0, 0.0, 0.0]) - e_w[0] * e_w
    e_u /= np.linalg.norm(e_u)
    e_v = np.cross(e_w, e_u)
    return np.stack([e_u, e_v, e_w])


def _rotate_about_u(axes: np.ndarray, angle: float) -> np.ndarray:
    """Tilt a frame about its u axis: positive angle moves the caudal end posteriorly."""
    e_u, e_v, e_w = axes
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([e_u, c * e_v + s * e_w, c * e_w - s * e_v])


def _bump_integral(p: np.ndarray, a: float, b: float) -> np.ndarray:
    """Smooth step 0 -> 1 over [a, b] (integral of a half-sine bump of unit area)."""
    t = np.clip((p - a) / max(b - a, 1e-6), 0.0, 1.0)
    return 0.5 * (1.0 - np.cos(np.pi * t))


class _Level:
    """One level of the chain with its dimensions and frame."""

    def __init__(self, verse_id: int, chain_index: int, scale: float):
        self.verse_id = verse_id
        self.chain_index = chain_index
        pos = _POSITION[verse_id]
        self.position = pos
        interp = lambda table: float(np.interp(pos, _ANCHOR_POS, table)) * scale  # noqa: E731
        self.width = interp(_BODY_WIDTH)
        self.depth = interp(_BODY_DEPTH)
        self.height = interp(_BODY_HEIGHT)
        self.disc_below = float(np.interp(pos + 0.5, _ANCHOR_POS, _DISC_HEIGHT)) * scale
        self.canal_a = interp(_CANAL_A)
        self.canal_b = interp(_CANAL_B)
        self.arch_t = interp(_ARCH_T)
        self.pedicle_r = interp(_PEDICLE_R)
        if verse_id == 1:  # C1 has no body; its "height" is the ring's
            self.height = 12.0 * scale
            self.disc_below = 2.5 * scale
        elif verse_id == 2:
            self.height = 17.0 * scale
        elif verse_id == SACRUM_ID:
            self.width, self.depth, self.height = 50.0 * scale, 34.0 * scale, 26.0 * scale
        self.centre = np.zeros(3)
        self.axes = np.eye(3)

    @property
    def region(self) -> str:
        v = self.verse_id
        if v <= 7:
            return "cervical"
        if v <= 19 or v == T13_ID:
            return "thoracic"
        if v == SACRUM_ID:
            return "sacral"
        return "lumbar"


# --------------------------------------------------------------------------------------
# Building the chain geometry


def _build_levels(p: Dict[str, Any]) -> List[_Level]:
    scale = p["size_scale"]
    chain = p["chain"]
    levels = [_Level(v, i, scale) for i, v in enumerate(chain)]
    for lv, jitter in zip(levels, p["level_jitter"]):
        lv.height *= 1.0 + 0.03 * jitter
    n = len(levels)
    index = np.arange(n, dtype=float)
    mid = index[:-1] + 0.5
    i_t1, i_l1, i_s = chain.index(8), chain.index(20), chain.index(SACRUM_ID)
    # Sagittal tangent angle (positive: moving posteriorly while going down the chain).
    deg = math.pi / 180.0

    def sagittal(q):
        return (p["cervical_lordosis_deg"] * _bump_integral(q, 0.5, i_t1)
                - p["thoracic_kyphosis_deg"] * _bump_integral(q, i_t1, i_l1)
                + p["lumbar_lordosis_deg"] * _bump_integral(q, i_l1, i_s)) * deg

    def coronal(q):
        a = p["scoliosis_start"]
        return p["scoliosis_deg"] * deg * (0.5 - _bump_integral(q, a, a + p["scoliosis_length"]))

    chosen = [chain.index(v) for v in p["levels"]]
    ref = np.arange(chosen[0], chosen[-1] + 1, dtype=float)
    alpha0 = float(np.mean(sagittal(ref))) - p["sagittal_tilt_deg"] * deg
    beta0 = float(np.mean(coronal(ref))) - p["coronal_tilt_deg"] * deg

    def tangent_down(q):
        a, b = sagittal(q) - alpha0, coronal(q) - beta0
        t = np.array([math.tan(b), math.tan(a), -1.0])
        return t / np.linalg.norm(t)

    pos = np.zeros(3)
    for k, lv in enumerate(levels):
        lv.centre = pos.copy()
        lv.axes = _frame(-tangent_down(float(k)))
        if k + 1 < n:
            pitch = 0.5 * lv.height + lv.disc_below + 0.5 * levels[k + 1].height
            pos = pos + tangent_down(mid[k]) * pitch
    sacrum = levels[i_s]
    sacrum.axes = _rotate_about_u(sacrum.axes, p["sacral_tilt_deg"] * deg)
    centres = np.array([levels[i].centre for i in chosen])
    shift = centres.mean(axis=0)
    for lv in levels:
        lv.centre = lv.centre - shift
    p["vertebra_centres_mm"] = {str(levels[i].verse_id): [round(float(c), 4) for c in levels[i].centre] for i in chosen}
    p["vertebra_axes"] = {str(levels[i].verse_id): [[round(float(c), 6) for c in row] for row in levels[i].axes] for i in chosen}
    return levels


def _level_z(levels: List[_Level], verse_id: int) -> float:
    for lv in levels:
        if lv.verse_id == verse_id:
            return float(lv.centre[2])
    # variants missing from the chain never asked for here
    return float(levels[-1].centre[2])


# --------------------------------------------------------------------------------------
# Vertebra shapes (local frame, mm)


def _vertebra_primitives(lv: _Level, p: Dict[str, Any], disc_above: float, min_radius: float = 0.0) -> Tuple[List[_Primitive], List[_Primitive]]:
    """(bone primitives to union, primitives carved out) of one vertebra (C1-L6, T13).

    ``disc_above`` (mm) is the height of the disc above, which the superior articular
    processes reach into by 35 % (the inferior ones of the vertebra above by another 35 %).

    ``min_radius`` (mm) thickens thin processes on coarse grids: a capsule of radius at
    least half a voxel diagonal always samples to a 26-connected voxel chain, so each
    vertebra's label stays one connected component.
    """
    a, b, h = 0.5 * lv.width, 0.5 * lv.depth, 0.5 * lv.height
    ca, cb, t, pr = lv.canal_a, lv.canal_b, lv.arch_t, lv.pedicle_r
    t = max(t, 2.0 * min_radius)
    pr = max(pr, min_radius)
    vc = b + cb + 1.0  # canal centre: just behind the body
    region = lv.region
    pos = lv.position
    bone: List[_Primitive] = []
    carve: List[_Primitive] = []
    fracture = p["fracture_level"] == lv.verse_id
    severity = p["fracture_severity"] if fracture else 0.0
    kind = p["fracture_kind"]

    if lv.verse_id == 1:  # atlas: ring + lateral masses + transverse processes
        s = p["size_scale"]
        cv, bo, ao = 14.0 * s, 26.0 * s, 24.0 * s
        bone.append(_Primitive([-ao, cv - bo, -5 * s], [ao, cv + bo, 5 * s],
                               lambda u, v, w: np.maximum(np.maximum(_sd_ellipse(u, v - cv, ao, bo), -_sd_ellipse(u, v - cv + 2 * s, 16 * s, 21 * s)), np.abs(w) - 5 * s)))
        for side in (-1, 1):
            bone.append(_ellipsoid([side * 18 * s, 4 * s, 0.0], [7 * s, 9 * s, 8 * s]))
            bone.append(_capsule([side * 22 * s, 4 * s, 0.0], [side * 36 * s, 4 * s, 0.0], max(4 * s, min_radius)))
        return bone, carve

    # Body with slightly concave endplates; a fracture lowers it (wedge: anteriorly).
    concavity = 0.8 * p["size_scale"]

    def body(u, v, w, a=a, b=b, h=h):
        rho2 = (u / a) ** 2 + (v / b) ** 2
        half = h - concavity * np.clip(1.0 - rho2, 0.0, 1.0)
        if severity > 0:
            if kind == "wedge":
                profile = np.clip(0.5 * (1.0 - v / b), 0.0, 1.0)
            elif kind == "biconcave":
                profile = np.clip(1.0 - rho2, 0.0, 1.0)
            else:
                profile = 1.0
            half = half - severity * h * profile
        return np.maximum(_sd_ellipse(u, v, a, b), np.abs(w) - half)

    bone.append(_Primitive([-a, -b, -h], [a, b, h], body))
    if lv.verse_id == 2:  # dens rising into the atlas
        s = p["size_scale"]
        bone.append(_capsule([0, 0.0, h], [0, 0.0, h + 13 * s], max(5 * s, min_radius)))

    # Neural arch: ring around the canal minus its anterior third.
    ao, bo = ca + t, cb + t
    w_lo, w_hi = -0.55 * h, 0.6 * h
    v_cut = vc - 0.3 * cb
    bone.append(_Primitive([-ao, v_cut, w_lo], [ao, vc + bo, w_hi],
                           lambda u, v, w: _max_of([_sd_ellipse(u, v - vc, ao, bo), v_cut - v, w - w_hi, w_lo - w])))
    carve.append(_elliptic_cylinder(0.0, vc, ca, cb, -h - 30.0, h + 30.0))
    # Pedicles: from inside the posterolateral body to the arch.
    xu = ca + 0.5 * t
    pu = min(xu, 0.6 * a)  # starts inside the body (cervical canals are wider than the body)
    v_body = b * math.sqrt(1.0 - (pu / a) ** 2)
    for side in (-1, 1):
        bone.append(_capsule([side * pu, v_body - pr - 1.0, 0.1 * h], [side * xu, vc, 0.1 * h], pr))

    # Spinous process.
    v0 = vc + cb + 0.5 * t
    if region == "cervical":
        length, angle, r = (15.0 if lv.verse_id < 7 else 25.0) * p["size_scale"], 15.0, 3.0 * p["size_scale"]
        if lv.verse_id == 2:
            length, r = 22.0 * p["size_scale"], 4.5 * p["size_scale"]
    elif region == "thoracic":
        length = float(np.interp(pos, [7, 12, 18], [30, 32, 28])) * p["size_scale"]
        angle = float(np.interp(pos, [7, 10, 15, 18], [35, 55, 50, 30]))
        r = 4.0 * p["size_scale"]
    else:
        length, angle, r = 28.0 * p["size_scale"], 5.0, 4.0 * p["size_scale"]
    r = max(r, min_radius)
    angle_rad = math.radians(angle)
    tip = np.array([0.0, v0 + (length - r) * math.cos(angle_rad), -(length - r) * math.sin(angle_rad)])
    if region == "lumbar":
        for dz in (-0.22 * h, 0.22 * h):
            bone.append(_capsule([0, v0 - 2.0, dz], [0, tip[1], dz + tip[2]], r))
    else:
        bone.append(_capsule([0, v0 - 2.0, 0.0], tip, r))

    # Transverse processes.
    if region == "cervical":
        tp_len, tp_ang, tp_r = 10.0, -25.0, 3.0
    elif region == "thoracic":
        tp_len, tp_ang, tp_r = float(np.interp(pos, [7, 18], [22, 14])), 35.0, 4.5
    else:
        tp_len, tp_ang, tp_r = float(np.interp(pos, [19, 21, 23], [20, 26, 22])), 5.0, 4.0
    tp_len, tp_r = tp_len * p["size_scale"], max(tp_r * p["size_scale"], min_radius)
    start_v = vc - 0.2 * cb
    for side in (-1, 1):
        end = [side * (xu + tp_len * math.cos(math.radians(tp_ang))), start_v + tp_len * math.sin(math.radians(tp_ang)), 0.15 * h]
        bone.append(_capsule([side * xu, start_v, 0.15 * h], end, tp_r))

    # Articular processes: each reaches 0.35 disc heights beyond its endplate level.
    ar = max(0.45 * lv.arch_t, min_radius)
    gap_reach = 0.35 * lv.disc_below
    for side in (-1, 1):
        su = side * (ca + 0.7 * t)
        bone.append(_capsule([su, vc - 0.1 * cb, 0.2 * h], [su, vc - 0.1 * cb, h + 0.35 * disc_above - ar], ar))
        iu = side * (ca + 0.4 * t)
        bone.append(_capsule([iu, vc + 0.5 * cb, -0.2 * h], [iu, vc + 0.6 * cb, -h - gap_reach + ar], ar))
    return bone, carve


def _sacrum_shape(p: Dict[str, Any], lv: _Level):
    """(local lo, local hi, sd function, canal function) of the sacrum (origin: S1 body centre)."""
    s = p["size_scale"]
    top, length = 0.5 * lv.height, 95.0 * s
    bottom = top - length

    def shape(u, v, w):
        t = np.clip((top - w) / length, 0.0, 1.0)
        a = 52.0 * s * (1.0 - 0.75 * t)
        bb = 17.0 * s * (1.0 - 0.5 * t)
        shift = 25.0 * s * t * t
        d = np.maximum(_sd_ellipse(u, v - shift, a, bb), np.maximum(w - top, bottom - w))
        # posterior wall of the sacral canal and the median crest
        crest = _sd_ellipse(u, v - shift - bb - 6.0 * s * (1 - 0.5 * t), 14.0 * s * (1 - 0.6 * t), 8.0 * s * (1 - 0.5 * t))
        crest = np.maximum(crest, np.maximum(w - top + 4.0 * s, bottom + 10 * s - w))
        d = np.minimum(d, crest)
        canal = np.maximum(_sd_ellipse(u, v - shift - bb - 3.0 * s, 11.0 * s * (1 - 0.6 * t), 5.0 * s * (1 - 0.5 * t)),
                           np.maximum(w - top - 2.0, bottom + 15 * s - w))
        return np.maximum(d, -canal), canal

    lo = np.array([-53.0 * s, -18.0 * s, bottom])
    hi = np.array([53.0 * s, 60.0 * s, top + 10 * s])
    return lo, hi, shape


def _paint_spine_soft_tissue(grid: _Grid, levels: List[_Level], drawn: List[_Level], p: Dict[str, Any]):
    """Intervertebral discs and the spinal canal (CSF, cord above L1) around the drawn levels."""
    hu = p["hu"]
    first, last = drawn[0].chain_index, drawn[-1].chain_index
    near = levels[max(0, first - 1): min(len(levels), last + 2)]
    for upper, lower in zip(near[:-1], near[1:]):
        if upper.verse_id == 1:  # no disc between C1 and C2
            continue
        centre = 0.5 * (upper.centre + lower.centre)
        axes = _frame(upper.axes[2] + lower.axes[2])
        a = 0.5 * (upper.width + lower.width) * 0.48
        b = 0.5 * (upper.depth + lower.depth) * 0.48
        # From body centre to body centre: the bodies, painted later, leave only the disc.
        half = 0.5 * float(np.linalg.norm(upper.centre - lower.centre)) + 1.0
        if lower.verse_id == SACRUM_ID:
            half = 0.5 * upper.height
        _paint_local(grid, centre, axes, [-a, -b, -half], [a, b, half],
                     lambda u, v, w, a=a, b=b, half=half: np.maximum(_sd_ellipse(u, v, a, b), np.abs(w) - half), hu["disc"], TISSUE_CODES["disc"])
    for lv in near:
        if lv.verse_id == SACRUM_ID:
            continue
        half = 0.5 * (lv.height + lv.disc_below) + 1.0
        vc = 0.5 * lv.depth + lv.canal_b + 1.0
        ca, cb = lv.canal_a, lv.canal_b
        _paint_local(grid, lv.centre, lv.axes, [-ca, vc - cb, -half], [ca, vc + cb, half],
                     lambda u, v, w, vc=vc, ca=ca, cb=cb, half=half: np.maximum(_sd_ellipse(u, v - vc, ca, cb), np.abs(w) - half),
                     hu["csf"], TISSUE_CODES["csf"])
        if lv.position < 20:  # the cord ends at L1-L2
            _paint_local(grid, lv.centre, lv.axes, [-ca, vc - cb, -half], [ca, vc + cb, half],
                         lambda u, v, w, vc=vc, ca=ca, cb=cb, half=half: np.maximum(_sd_ellipse(u, v - vc + 0.1 * cb, 0.55 * ca, 0.6 * cb), np.abs(w) - half),
                         hu["cord"], TISSUE_CODES["csf"])


def _paint_vertebrae(grid: _Grid, levels: List[_Level], drawn: List[_Level], p: Dict[str, Any], min_radius: float):
    """The labelled vertebrae (and sacrum), cranio-caudal; a label is never overwritten."""
    hu = p["hu"]
    s = p["size_scale"]
    cortical = hu["cortical"]
    trabecular = hu["trabecular"] * (1.0 - 0.6 * p["osteoporosis"])
    for lv in drawn:
        jitter = p["level_jitter"][lv.chain_index % 30]
        cort = cortical + 40.0 * jitter
        core = trabecular + 15.0 * jitter
        disc_above = levels[lv.chain_index - 1].disc_below if lv.chain_index > 0 else lv.disc_below
        if lv.verse_id == SACRUM_ID:
            lo, hi, shape = _sacrum_shape(p, lv)
            bone = [_Primitive(lo, hi, lambda u, v, w, shape=shape: shape(u, v, w)[0])]
            vc = 23.0 * s  # superior articular processes, on the median crest (see _sacrum_shape)
            r = max(4.0 * s, min_radius)
            reach = 0.5 * lv.height + 0.3 * disc_above
            for side in (-1, 1):
                bone.append(_capsule([side * 11 * s, vc, 0.5 * lv.height - 6.0 * s], [side * 13 * s, vc + 2, reach - r], r))
            _paint_bone(grid, lv.centre, lv.axes, bone, [], cort, core, 1.5, TISSUE_CODES["sacrum"], SACRUM_ID)
            continue
        real = _real_vertebra(lv, p, min_radius) if p["anatomy"] == "real" and p["fracture_level"] != lv.verse_id else None
        bone, carve = real if real is not None else _vertebra_primitives(lv, p, disc_above, min_radius=min_radius)
        if p["fracture_level"] == lv.verse_id:
            core += 40.0  # impacted trabeculae
        _paint_bone(grid, lv.centre, lv.axes, bone, carve, cort, core, 1.5, TISSUE_CODES["vertebra"], lv.verse_id)


#: Which real shape a level takes (variants take their neighbour's).
_SHAPE_OF_LEVEL = {T13_ID: 19, L6_ID: 24}


def _real_vertebra(lv: _Level, p: Dict[str, Any], min_radius: float):
    """(bone, carve) primitives of a vertebra from its real shape, or None (no shape for the level).

    The template is stretched per axis so that its body has the level's drawn width, depth and
    height (times a few per cent of per-level jitter), and thickened on coarse grids the way the
    geometric processes are (``min_radius``), so each label stays one piece.
    """
    from SpineContextSegLib.phantoms.bone_shapes import load_bone_shapes

    template = load_bone_shapes().get(str(_SHAPE_OF_LEVEL.get(lv.verse_id, lv.verse_id)))
    if template is None or lv.region == "cervical":
        return None
    jitter = 1.0 + np.asarray(p["shape_jitter"][lv.chain_index % 30])
    scale = np.array([lv.width, lv.depth, lv.height]) / template.body_mm * jitter
    thicken = max(0.0, min_radius - 1.5)
    lo, hi = template.extent_mm(scale)
    return [_Primitive(lo, hi, lambda u, v, w: template.distance_mm(u, v, w, scale) - thicken)], []


def _paint_screws(grid: _Grid, by_id: Dict[int, _Level], p: Dict[str, Any]):
    """Bilateral pedicle screws (shaft through the pedicle into the body, a tulip head) and rods."""
    hu = p["hu"]
    heads: Dict[int, List[np.ndarray]] = {-1: [], 1: []}
    for v in p["screws"]:
        lv = by_id.get(v)
        if lv is None or lv.verse_id in (1, SACRUM_ID):
            continue
        b = 0.5 * lv.depth
        vc = b + lv.canal_b + 1.0
        xu = lv.canal_a + 0.5 * lv.arch_t
        radius = min(3.2, 0.8 * lv.pedicle_r)
        for side in (-1, 1):
            entry = np.array([side * (xu + 1.0), vc + lv.canal_b, 0.1 * lv.height])
            target = np.array([side * 0.2 * lv.width, -0.55 * b, 0.1 * lv.height])
            head = entry + np.array([side * 2.0, 12.0, 0.0])
            _paint_local(grid, lv.centre, lv.axes, np.minimum(head, target) - 6, np.maximum(head, target) + 6,
                         lambda u, v_, w, e=head, t_=target, r=radius: np.minimum(_sd_capsule(u, v_, w, e, t_, r), _sd_capsule(u, v_, w, e, e - [0, 4.0, 0], 5.5)),
                         hu["metal"], TISSUE_CODES["metal"])
            heads[side].append(_to_world(head[None, :], lv.centre, lv.axes)[0])
    for side in (-1, 1):
        for h0, h1 in zip(heads[side][:-1], heads[side][1:]):
            _paint_local(grid, np.zeros(3), np.eye(3), np.minimum(h0, h1) - 4, np.maximum(h0, h1) + 4,
                         lambda x, y, z, h0=h0, h1=h1: _sd_capsule(x, y, z, h0, h1, 3.0), hu["metal"], TISSUE_CODES["metal"])
