"""Synthetic CT phantoms of the spine with exact vertebra labels, for training and tests.

:func:`generate_phantom` draws one torso CT (int16 HU) with a per-vertebra VerSe label map
and the binary spine mask, deterministically from an integer seed. Everything random is
drawn first from ``numpy.random.default_rng(seed)`` and recorded in ``Phantom.params``;
the grid (spacing, direction) only decides where the anatomy is *sampled*, so the same
seed with another spacing or direction gives the same anatomy in the same physical place.

Coordinate frames
-----------------
World frame: LPS millimetres, x = patient left, y = posterior, z = superior; the patient
lies supine on a table (the table is at large y). The mean of the spine curve over the
requested levels is at x = y = 0.
Vertebra frame: origin at the body centre, ``w`` along the spine curve (superior), ``v``
posterior, ``u`` = patient left; every vertebra is built in its own frame, so the
curvature (lordosis, kyphosis, scoliosis) tilts whole vertebrae.
Each structure is evaluated only on the voxels of its own index box: the physical bounding
box of the structure is mapped to index ranges of the requested grid (conservatively for
oblique directions) and the structure's local coordinates there are affine in the index,
so they are built by broadcasting three 1-D ramps (no full-volume pass per structure).
Shapes are approximate signed distances in mm (negative inside): first-order distance for
ellipses/ellipsoids, exact for capsules; unions take the minimum, cuts the maximum. A
vertebra's bone is its union's inside; its cortex is the outer ``cortex_mm`` of that union.

Geometry (mm; ``size_scale`` multiplies everything anatomical)
--------------------------------------------------------------
Vertebral bodies are elliptic cylinders with slightly concave endplates. Width x depth x
height, interpolated along the chain: C3 17x15x13, C7 22x16x14, T1 26x17x16, T6 30x25x20,
T12 40x30x24, L3 46x33x27, L5 50x34x27. Discs (not labelled): cervical 5, thoracic 4-7,
lumbar 10-11. Posterior elements in the vertebra frame: the spinal canal (ellipse,
cervical 24x16, thoracic 17x15, lumbar 23x18) directly behind the body, pedicles (capsules
joining body and arch), the neural arch ring (lamina, thickness 4-7), a spinous process
(cervical 15 mm nearly horizontal, thoracic 28-32 mm angled 30-55 deg down, lumbar 28 mm
two-capsule plate), transverse processes (cervical short anterolateral, thoracic 20 mm
posterolateral, lumbar 25 mm lateral) and superior/inferior articular processes that stop
0.3 disc heights short of their neighbour's (so vertebra labels never touch through the
facets). Processes and the arch are never thinner than half a voxel diagonal of the
requested grid (so on coarse grids each vertebra's label stays one 26-connected component;
this widens them slightly above ~3.5 mm spacing). C1 is a ring (anterior arch, lateral masses, posterior arch); C2 carries the dens
(radius 5 mm) rising into the ring of C1. The sacrum is a tapering, posteriorly curving
wedge (S1 body 50x34, alae 104 mm wide, 95 mm long) with a sacral canal, tilted 5-20 deg
further than the lumbar curve. Iliac wings are 8 mm thick ellipsoidal shells lateral to the
sacrum up to the L4-L5 level; ribs (T1-T12, T13) are elliptic-arc tubes (6x10 mm cross-section)
leaving the vertebra laterally, curving back, round and forward while descending, with
costal cartilage to a sternum (T2-T9 levels) for ribs 1-7.
Curvature: the spine tangent's sagittal angle integrates a smooth bump per segment whose
integral is the segment's Cobb angle (cervical lordosis 10-35 deg, thoracic kyphosis
15-50 deg, lumbar lordosis 20-55 deg); scoliosis is a coronal bend of 0-25 deg (Cobb)
over 5-10 levels. The mean tangent over the requested levels is vertical, plus a small tilt.
Torso: an ellipse of ~320 x 220 mm (neck ~ 120 x 120 mm) whose back skin lies 85-95 mm
behind the vertebral bodies (50 mm in the neck): skin-side fat 8-25 mm, a muscle wall
8-15 mm, paraspinal (erector) and psoas muscles, lungs in the thorax above a domed
diaphragm (~T10), heart, liver, kidneys and bowel in the abdomen, an aorta left-anterior
of the spine and a curved CT table under the back.

HU values (each drawn per phantom in the given range)
-----------------------------------------------------
air -1000; lung -880..-800; fat -120..-80; muscle 35..60; organs 30..65 (liver 50..65,
kidney 30..40, or 140..200 with contrast); bowel gas -1000; CSF 5..20 and cord 30..40;
discs 80..120; blood 35..50, or 250..400 in the aorta and 150..300 in the heart with
``contrast``; cortical bone 700..1200 (cortex 1-2 mm); trabecular bone 150..300 times
(1 - 0.6 osteoporosis); ribs, sternum and pelvis have a 320..450 HU core (thin, mostly
cortical bones); a fractured body's core is 40 HU denser (impaction); costal cartilage
100..150; the table 200..400 (solid) or a foam core -900..-700 with 250..400 HU shells;
pedicle screws and rods 3000. Bone voxels get white "texture" (15..50 HU) before the blur,
which turns it into trabecular-like mottling. Noise is white Gaussian (``noise_hu``, default 10..40 HU)
added after a Gaussian blur (``blur_mm`` = standard deviation in mm, default 0.5..1.5);
neither touches the labels. The result is clipped to [-1024, 3071] and stored as int16.

Labels
------
``vertebra_labels`` holds VerSe ids (:mod:`.labels`): only the requested levels are drawn,
bone voxels only (discs, canal, ribs, sternum and pelvis are 0; screw voxels inside a
vertebra keep its label). ``spine_mask`` is :func:`.labels.spine_mask_from_vertebra_labels`
of it (without the sacrum). ``tissue`` is a debugging/testing map of :data:`TISSUE_CODES`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.labels import (
    L6_ID,
    SACRUM_ID,
    STANDARD_CHAIN,
    T13_ID,
    spine_mask_from_vertebra_labels,
    vertebra_by_name,
    vertebra_by_verse_id,
)

#: Values of ``Phantom.tissue`` (uint8).
TISSUE_CODES: Dict[str, int] = {
    "air": 0, "fat": 1, "muscle": 2, "organ": 3, "lung": 4, "blood": 5, "csf": 6, "disc": 7,
    "vertebra": 8, "sacrum": 9, "rib": 10, "sternum": 11, "pelvis": 12, "cartilage": 13,
    "table": 14, "metal": 15, "gas": 16, "scapula": 17,
}

FIELDS_OF_VIEW = ("torso", "spine", "slab")

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

_RIB_SCALE = (0.45, 0.62, 0.74, 0.83, 0.9, 0.95, 1.0, 1.0, 0.98, 0.95, 0.9, 0.85, 0.8)
_RIB_END = (0.85, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85, 0.75, 0.75, 0.72, 0.55, 0.4, 0.35)


@dataclass
class PhantomOptions:
    """What :func:`generate_phantom` may draw; ``None`` means "draw at random from the seed".

    Attributes
    ----------
    first_level, last_level : int or str, optional
        VerSe id or name (``"T11"``, ``"S"``) of the most cranial and most caudal level drawn.
        Default: a random run of 4-12 consecutive levels between C1 and the sacrum. Naming
        T13 (28) or L6 (25) adds that variant vertebra to the chain.
    extra_vertebra : str, optional
        ``"none"``, ``"T13"`` or ``"L6"`` (default: each with 3 % probability).
    spacing_mm : 3 floats or one float
        Grid spacing along the image's index axes i, j, k (SimpleITK order), 0.5-5 mm.
    direction : 9 floats or 3x3, optional
        Direction cosines (SimpleITK row-major: column j is index axis j in LPS). Default
        identity. Any orthonormal matrix is accepted; the anatomy stays where it is.
    size_scale : float, optional
        Multiplies all anatomical sizes (default 0.85-1.15).
    cervical_lordosis_deg, thoracic_kyphosis_deg, lumbar_lordosis_deg, scoliosis_deg : float, optional
        Cobb angles of the curvature (defaults in the module docstring).
    osteoporosis : float, optional
        0..1; trabecular HU times (1 - 0.6 osteoporosis). Default 0 (70 %) or 0..1.
    fracture_level : int or str, optional
        Level with a compressed body (wedge, crush or biconcave); ``0`` or ``"none"``: none.
        Default: none (80 %) or a random drawn level (not C1, C2, sacrum).
    fracture_severity : float, optional
        Fraction of body height lost at the most compressed point (default 0.2-0.5).
    screws : bool or sequence of levels, optional
        Bilateral pedicle screws (and rods) in these levels; ``True``: 2-4 adjacent random
        drawn thoracolumbar levels. Default: none (85 %) or ``True``.
    field_of_view : str, optional
        ``"torso"`` (whole cross-section and table), ``"spine"`` (~150-200 mm around the
        spine) or ``"slab"`` (a 60-100 mm wide sagittal slab, like VerSe's reformats).
    contrast : bool, optional
        Contrast-enhanced blood (aorta 250-400 HU). Default: 40 % yes.
    noise_hu, blur_mm : float, optional
        Gaussian noise standard deviation (HU) and blur standard deviation (mm).
    anatomy : str, optional
        ``"geometric"`` (vertebrae built from ellipses and capsules) or ``"real"``: T1-L5 from
        real bone shapes (:mod:`.bone_shapes`, stretched onto each level's drawn body size with
        a few per cent of random deformation per axis), rib heads meeting the vertebral body at
        the costovertebral joint (at the disc above, as in a chest CT) with the neck running to
        the transverse process, scapulae behind ribs 2-7, and an aorta touching the column.
        Default: ``"real"`` in 60 % of phantoms when the shapes file is present.
    streaks_hu : float, optional
        Amplitude (HU) of low-dose streak artefacts (thin dark and bright lines through the
        shoulders and along the table in axial slices); 0: none. Default: 0 (50 %) or 20..80.
    """

    first_level: Optional[Union[int, str]] = None
    last_level: Optional[Union[int, str]] = None
    extra_vertebra: Optional[str] = None
    spacing_mm: Tuple[float, float, float] = (2.0, 2.0, 2.0)
    direction: Optional[Sequence[float]] = None
    size_scale: Optional[float] = None
    cervical_lordosis_deg: Optional[float] = None
    thoracic_kyphosis_deg: Optional[float] = None
    lumbar_lordosis_deg: Optional[float] = None
    scoliosis_deg: Optional[float] = None
    osteoporosis: Optional[float] = None
    fracture_level: Optional[Union[int, str]] = None
    fracture_severity: Optional[float] = None
    screws: Optional[Union[bool, Sequence[Union[int, str]]]] = None
    field_of_view: Optional[str] = None
    contrast: Optional[bool] = None
    noise_hu: Optional[float] = None
    blur_mm: Optional[float] = None
    anatomy: Optional[str] = None
    streaks_hu: Optional[float] = None


ANATOMY_STYLES = ("geometric", "real")


@dataclass
class Phantom:
    """One synthetic CT and its labels.

    Attributes
    ----------
    ct : SimpleITK.Image
        int16 Hounsfield units on the requested grid.
    vertebra_labels : SimpleITK.Image
        uint8 VerSe ids (0 background), same grid as ``ct``.
    spine_mask : SimpleITK.Image
        uint8 0/1, vertebrae without the sacrum, same grid.
    levels : list of int
        VerSe ids drawn, cranio-caudal.
    params : dict
        Every randomised value (JSON-serialisable), enough to describe the phantom.
    tissue : SimpleITK.Image
        uint8 :data:`TISSUE_CODES`, same grid (for tests and debugging).
    """

    ct: Any
    vertebra_labels: Any
    spine_mask: Any
    levels: List[int]
    params: Dict[str, Any]
    tissue: Any = None


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
# Parameter drawing


def _level_id(value: Union[int, str]) -> int:
    if isinstance(value, str):
        return vertebra_by_name(value).value
    return vertebra_by_verse_id(int(value)).value


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _draw_params(rng: np.random.Generator, options: PhantomOptions) -> Dict[str, Any]:
    """Every random choice, drawn in a fixed order (so options never shift later draws)."""
    p: Dict[str, Any] = {}
    # Draw everything first; options override afterwards, keeping the stream aligned.
    draws = {
        "extra_roll": _u(rng, 0, 1),
        "n_levels": int(rng.integers(4, 13)),
        "start_roll": _u(rng, 0, 1),
        "size_scale": _u(rng, 0.85, 1.15),
        "cervical_lordosis_deg": _u(rng, 10, 35),
        "thoracic_kyphosis_deg": _u(rng, 15, 50),
        "lumbar_lordosis_deg": _u(rng, 20, 55),
        "scoliosis_deg": float(rng.choice([0.0, _u(rng, -25, 25)], p=[0.6, 0.4])),
        "scoliosis_start": _u(rng, 4, 18),
        "scoliosis_length": _u(rng, 5, 10),
        "sagittal_tilt_deg": float(rng.normal(0, 3)),
        "coronal_tilt_deg": float(rng.normal(0, 2)),
        "sacral_tilt_deg": _u(rng, 5, 20),
        "osteoporosis": float(rng.choice([0.0, _u(rng, 0, 1)], p=[0.7, 0.3])),
        "fracture_roll": _u(rng, 0, 1),
        "fracture_pick": _u(rng, 0, 1),
        "fracture_kind": str(rng.choice(["wedge", "crush", "biconcave"])),
        "fracture_severity": _u(rng, 0.2, 0.5),
        "screw_roll": _u(rng, 0, 1),
        "screw_count": int(rng.integers(2, 5)),
        "screw_pick": _u(rng, 0, 1),
        "field_of_view": str(rng.choice(list(FIELDS_OF_VIEW), p=[0.5, 0.25, 0.25])),
        "fov_half_width_mm": _u(rng, 30, 50),
        "spine_fov_half_width_mm": _u(rng, 75, 100),
        "margin_top_mm": _u(rng, 5, 30),
        "margin_bottom_mm": _u(rng, 5, 30),
        "contrast": bool(rng.random() < 0.4),
        "noise_hu": _u(rng, 10, 40),
        "blur_mm": _u(rng, 0.5, 1.5),
        "hu": {
            "lung": _u(rng, -880, -800), "fat": _u(rng, -120, -80), "muscle": _u(rng, 35, 60),
            "organ": _u(rng, 30, 45), "liver": _u(rng, 50, 65), "kidney": _u(rng, 30, 40),
            "kidney_contrast": _u(rng, 140, 200), "csf": _u(rng, 5, 20), "cord": _u(rng, 30, 40),
            "disc": _u(rng, 80, 120), "blood": _u(rng, 35, 50), "aorta_contrast": _u(rng, 250, 400),
            "heart_contrast": _u(rng, 150, 300), "cortical": _u(rng, 700, 1200),
            "trabecular": _u(rng, 150, 300), "thin_bone_core": _u(rng, 320, 450),
            "cartilage": _u(rng, 100, 150), "table": _u(rng, 200, 400), "table_foam": _u(rng, -900, -700),
            "metal": 3000.0,
        },
        "table_kind": str(rng.choice(["solid", "foam"])),
        "table_gap_mm": _u(rng, 0, 12),
        "table_thickness_mm": _u(rng, 8, 30),
        "fat_mm": _u(rng, 8, 25),
        "muscle_wall_mm": _u(rng, 8, 15),
        "torso_width_scale": _u(rng, 0.85, 1.2),
        "torso_depth_scale": _u(rng, 0.85, 1.2),
        "level_jitter": [float(x) for x in rng.normal(0, 1, size=(30,))],
        "bowel": [[_u(rng, -1, 1), _u(rng, -1, 1), _u(rng, 0, 1), _u(rng, 15, 35), int(rng.random() < 0.2)] for _ in range(12)],
        "bone_texture_hu": _u(rng, 15, 50),
    }
    o = options
    p.update(draws)
    for key in ("size_scale", "cervical_lordosis_deg", "thoracic_kyphosis_deg", "lumbar_lordosis_deg",
                "scoliosis_deg", "osteoporosis", "fracture_severity", "noise_hu", "blur_mm"):
        value = getattr(o, key)
        if value is not None:
            p[key] = float(value)
    if o.contrast is not None:
        p["contrast"] = bool(o.contrast)
    if o.field_of_view is not None:
        if o.field_of_view not in FIELDS_OF_VIEW:
            raise ValueError(f"field_of_view must be one of {FIELDS_OF_VIEW}, not {o.field_of_view!r}")
        p["field_of_view"] = o.field_of_view
    if not 0.0 <= p["osteoporosis"] <= 1.0:
        raise ValueError("osteoporosis must lie in 0..1")
    if not 0.3 <= p["size_scale"] <= 3.0:
        raise ValueError("size_scale must lie in 0.3..3")

    # The chain (with a variant vertebra) and the drawn run of levels.
    requested = [_level_id(x) for x in (o.first_level, o.last_level) if x is not None]
    extra = o.extra_vertebra
    if extra is None:
        extra = "T13" if p["extra_roll"] < 0.03 else ("L6" if p["extra_roll"] > 0.97 else "none")
        if T13_ID in requested:
            extra = "T13"
        elif L6_ID in requested:
            extra = "L6"
    extra = {"NONE": "none", "T13": "T13", "L6": "L6"}.get(str(extra).upper())
    if extra is None:
        raise ValueError("extra_vertebra must be 'none', 'T13' or 'L6'")
    chain = list(STANDARD_CHAIN)
    if extra == "T13":
        chain.insert(chain.index(19) + 1, T13_ID)
    elif extra == "L6":
        chain.insert(chain.index(24) + 1, L6_ID)
    for r in requested:
        if r not in chain:
            raise ValueError(f"level {r} is not in the chain (extra_vertebra={extra!r})")
    n = min(p["n_levels"], len(chain))
    if o.first_level is not None and o.last_level is not None:
        first, last = chain.index(_level_id(o.first_level)), chain.index(_level_id(o.last_level))
    elif o.first_level is not None:
        first = chain.index(_level_id(o.first_level))
        last = min(first + n - 1, len(chain) - 1)
    elif o.last_level is not None:
        last = chain.index(_level_id(o.last_level))
        first = max(last - n + 1, 0)
    else:
        first = int(p["start_roll"] * (len(chain) - n + 1))
        last = first + n - 1
    if last < first:
        raise ValueError("first_level must be cranial to (or equal to) last_level")
    p["extra_vertebra"] = extra
    p["chain"] = chain
    p["levels"] = chain[first:last + 1]

    # Fracture and screws among drawn levels.
    candidates = [v for v in p["levels"] if v not in (1, 2, SACRUM_ID)]
    fracture = None
    if o.fracture_level is not None:
        if o.fracture_level not in (0, "none", "None", False):
            fracture = _level_id(o.fracture_level)
    elif candidates and p["fracture_roll"] < 0.2:
        fracture = candidates[int(p["fracture_pick"] * len(candidates))]
    p["fracture_level"] = fracture
    thoracolumbar = [v for v in p["levels"] if 8 <= v <= 25 or v == T13_ID]
    screws: List[int] = []
    if o.screws is None:
        want = p["screw_roll"] < 0.15
    elif isinstance(o.screws, bool):
        want = o.screws
    else:
        want = False
        screws = [_level_id(x) for x in o.screws]
    if want:
        pool = thoracolumbar or [v for v in p["levels"] if v != SACRUM_ID] or p["levels"]
        count = min(p["screw_count"], len(pool))
        start = int(p["screw_pick"] * (len(pool) - count + 1))
        screws = pool[start:start + count]
    p["screws"] = screws
    return p


def _draw_anatomy(seed: int, options: PhantomOptions, p: Dict[str, Any]) -> None:
    """Draw the :attr:`PhantomOptions.anatomy` and streak choices into ``p``.

    They come from a stream of their own (``default_rng([seed, 1])``), so phantoms of the
    geometric style are the same as before these options existed.
    """
    from SpineContextSegLib.phantoms.bone_shapes import load_bone_shapes

    rng = np.random.default_rng([int(seed), 1])
    draws = {
        "anatomy_roll": _u(rng, 0, 1),
        "streak_roll": _u(rng, 0, 1),
        "streaks_hu": _u(rng, 20, 80),
        "streak_angles_deg": [float(x) for x in rng.uniform(0, 180, size=8)],
        "streak_offsets": [float(x) for x in rng.uniform(-1, 1, size=8)],
        "streak_signs": [float(x) for x in rng.choice([-1.0, 1.0], size=8)],
        "shape_jitter": [[float(x) for x in row] for row in rng.normal(0, 0.04, size=(30, 3))],
        "rib_head_rise": _u(rng, 0.3, 0.5),
        "scapula_scale": _u(rng, 0.9, 1.1),
        "scapula_spread": _u(rng, 0.5, 0.6),
        "aorta_gap_mm": _u(rng, 0.0, 2.0),
    }
    shapes = load_bone_shapes()
    anatomy = options.anatomy
    if anatomy is None:
        anatomy = "real" if shapes and draws["anatomy_roll"] < 0.6 else "geometric"
    if anatomy not in ANATOMY_STYLES:
        raise ValueError(f"anatomy must be one of {ANATOMY_STYLES}, not {anatomy!r}")
    if anatomy == "real" and not shapes:
        raise ValueError("anatomy='real' needs SpineContextSegLib/resources/anatomy/bone_shapes.npz: reinstall the package or run scripts/make_bone_shapes.py")
    p["anatomy"] = anatomy
    streaks = options.streaks_hu
    if streaks is None:
        streaks = draws["streaks_hu"] if draws["streak_roll"] < 0.5 else 0.0
    if not 0.0 <= float(streaks) <= 500.0:
        raise ValueError("streaks_hu must lie in 0..500")
    p["streaks_hu"] = float(streaks)
    for key in ("streak_angles_deg", "streak_offsets", "streak_signs", "shape_jitter", "rib_head_rise", "scapula_scale", "scapula_spread"):
        p[key] = draws[key]
    p["aorta_gap_mm"] = draws["aorta_gap_mm"] if anatomy == "real" else 3.0


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


# --------------------------------------------------------------------------------------
# The phantom


def _validate_grid(spacing, direction) -> Tuple[np.ndarray, np.ndarray]:
    spacing = np.asarray(spacing, dtype=float).reshape(-1)
    if spacing.size == 1:
        spacing = np.repeat(spacing, 3)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing < 0.5) or np.any(spacing > 5.0):
        raise SegmentationError("input_geometry", f"Phantom spacing must be 3 values of 0.5-5 mm, got {spacing.tolist()}.")
    if direction is None:
        matrix = np.eye(3)
    else:
        matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-4):
        raise SegmentationError("input_geometry", "Phantom direction must be an orthonormal 3x3 matrix.")
    return spacing, matrix


def _profile(levels: List[_Level], p: Dict[str, Any]):
    """Torso half-width, half-depth and back distance (mm) at each level's z, cranio-caudal."""
    s = p["size_scale"]
    z = np.array([lv.centre[2] for lv in levels])
    pos = np.array([lv.position for lv in levels])
    half_width = np.interp(pos, [0, 5.5, 7.5, 12, 18, 21, 24], [62, 62, 145, 160, 160, 160, 170]) * s * p["torso_width_scale"]
    half_depth = np.interp(pos, [0, 5.5, 7.5, 12, 18, 21, 24], [60, 60, 95, 110, 110, 110, 105]) * s * p["torso_depth_scale"]
    back = np.interp(pos, [0, 5.5, 7.5, 12, 18, 21, 24], [50, 50, 80, 85, 90, 92, 95]) * s
    return z, half_width, half_depth, back


def generate_phantom(seed: int, options: Optional[PhantomOptions] = None, **overrides: Any) -> Phantom:
    """Generate one synthetic spine CT with exact labels.

    Parameters
    ----------
    seed : int
        Seed of every random choice (``numpy.random.default_rng(seed)``).
    options : PhantomOptions, optional
        Fixed choices; fields left ``None`` are drawn from the seed.
    **overrides
        Fields of :class:`PhantomOptions` given as keywords (override ``options``).

    Returns
    -------
    Phantom
        ``ct`` int16 HU, ``vertebra_labels`` uint8 VerSe ids, ``spine_mask`` uint8, on a
        grid of the requested spacing (mm, index axes i, j, k) and direction that covers
        the field of view; ``levels`` cranio-caudal; ``params`` JSON-serialisable.

    Raises
    ------
    SegmentationError
        ``input_geometry`` for a spacing outside 0.5-5 mm or a non-orthonormal direction.
    ValueError
        For an unknown option or level.
    """
    import SimpleITK as sitk

    arrays = generate_phantom_arrays(seed, options, **overrides)

    def image(array):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing([float(x) for x in arrays.spacing_mm])
        img.SetOrigin([float(x) for x in arrays.origin_mm])
        img.SetDirection([float(x) for x in arrays.direction.reshape(-1)])
        return img

    return Phantom(ct=image(arrays.ct), vertebra_labels=image(arrays.vertebra_labels), spine_mask=image(arrays.spine_mask),
                   levels=list(arrays.levels), params=arrays.params, tissue=image(arrays.tissue))


@dataclass
class PhantomArrays:
    """:func:`generate_phantom_arrays`' result: the phantom as numpy arrays (k, j, i) and its grid."""

    ct: np.ndarray  # int16 HU
    vertebra_labels: np.ndarray  # uint8 VerSe ids
    spine_mask: np.ndarray  # uint8 0/1
    tissue: np.ndarray  # uint8 TISSUE_CODES
    spacing_mm: np.ndarray  # (3,) along i, j, k
    origin_mm: np.ndarray  # (3,) LPS of voxel (0, 0, 0)
    direction: np.ndarray  # (3, 3), column j = index axis j
    levels: List[int]
    params: Dict[str, Any]


def generate_phantom_arrays(seed: int, options: Optional[PhantomOptions] = None, **overrides: Any) -> PhantomArrays:
    """:func:`generate_phantom` without SimpleITK: the same phantom as numpy arrays and its grid.

    For machines that train without SimpleITK (a GPU image; ``scripts/device_train.sh``); with
    the default identity direction the arrays already lie on the canonical training grid.
    """
    from scipy import ndimage

    known = {f.name for f in dataclasses.fields(PhantomOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown phantom option(s) {unknown}; known: {sorted(known)}")
    options = dataclasses.replace(options or PhantomOptions(), **overrides)
    spacing, direction = _validate_grid(options.spacing_mm, options.direction)
    rng = np.random.default_rng(int(seed))
    p = _draw_params(rng, options)
    _draw_anatomy(seed, options, p)
    levels = _build_levels(p)
    by_id = {lv.verse_id: lv for lv in levels}
    drawn = [by_id[v] for v in p["levels"]]

    fov_lo, fov_hi, profile = _field_of_view(p, levels, drawn)
    p["fov_world_mm"] = [fov_lo.tolist(), fov_hi.tolist()]

    # The grid covering the field of view with the requested spacing and direction.
    matrix = direction * spacing[None, :]
    corner_index = _corners(fov_lo, fov_hi) @ np.linalg.inv(matrix).T
    start = np.floor(corner_index.min(axis=0) + 1e-6)
    size = np.ceil(corner_index.max(axis=0) - start - 1e-6).astype(int) + 1
    origin = matrix @ start
    grid = _Grid(origin, spacing, direction, tuple(int(x) for x in size))

    # Painting order: later structures overwrite earlier ones; vertebra labels never are.
    _paint_body(grid, levels, p, profile)
    _paint_spine_soft_tissue(grid, levels, drawn, p)
    _paint_muscles_and_vessels(grid, levels, [lv.chain_index for lv in drawn], p)
    _paint_ribs(grid, levels, p, profile)
    if p["anatomy"] == "real":
        _paint_scapulae(grid, levels, p, profile)
    _paint_pelvis(grid, by_id[SACRUM_ID], p)
    _paint_vertebrae(grid, levels, drawn, p, min_radius=0.87 * float(spacing.max()))
    _paint_screws(grid, by_id, p)

    # ---- bone texture (mottling, blurred with the image), blur, noise, output
    ct = grid.ct
    bone_voxels = np.isin(grid.tissue, [TISSUE_CODES[k] for k in ("vertebra", "sacrum", "rib", "sternum", "pelvis", "scapula")])
    ct[bone_voxels] += rng.standard_normal(int(bone_voxels.sum()), dtype=np.float32) * np.float32(p["bone_texture_hu"])
    if p["blur_mm"] > 0:
        sigma = [p["blur_mm"] / spacing[2], p["blur_mm"] / spacing[1], p["blur_mm"] / spacing[0]]
        ct = ndimage.gaussian_filter(ct, sigma=sigma, truncate=3.0)
    if p["streaks_hu"] > 0:
        _add_streaks(ct, grid, levels, p)
    if p["noise_hu"] > 0:
        ct += rng.standard_normal(ct.shape, dtype=np.float32) * np.float32(p["noise_hu"])
    ct = np.clip(np.rint(ct), -1024, 3071).astype(np.int16)
    labels = grid.labels
    present = set(int(x) for x in np.unique(labels)) - {0}
    p["levels_present"] = [v for v in p["levels"] if v in present]

    mask = spine_mask_from_vertebra_labels(labels).astype(np.uint8)
    p["seed"] = int(seed)
    p["spacing_mm"] = [float(x) for x in spacing]
    p["direction"] = [float(x) for x in direction.reshape(-1)]
    p["size"] = [int(x) for x in size]
    p["origin_mm"] = [float(x) for x in origin]
    return PhantomArrays(ct=ct, vertebra_labels=labels, spine_mask=mask, tissue=grid.tissue, spacing_mm=spacing, origin_mm=origin,
                         direction=direction, levels=list(p["levels"]), params=_jsonable(p))


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


def _field_of_view(p: Dict[str, Any], levels: List[_Level], drawn: List[_Level]):
    """World AABB (lo, hi in mm) of the field of view, and the torso :class:`_Profile`."""
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


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


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


def _level_z(levels: List[_Level], verse_id: int) -> float:
    for lv in levels:
        if lv.verse_id == verse_id:
            return float(lv.centre[2])
    # variants missing from the chain never asked for here
    return float(levels[-1].centre[2])


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
