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
of it (without the sacrum). ``tissue`` is a debugging/testing map of
:data:`~SpineContextSegLib.phantoms.canvas.TISSUE_CODES`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.labels import SACRUM_ID, spine_mask_from_vertebra_labels
from SpineContextSegLib.phantoms.body import _paint_body, _paint_muscles_and_vessels, _paint_pelvis
from SpineContextSegLib.phantoms.canvas import TISSUE_CODES, _corners, _Grid
from SpineContextSegLib.phantoms.options import PhantomOptions, _draw_anatomy, _draw_params
from SpineContextSegLib.phantoms.scanner import _add_streaks, _field_of_view
from SpineContextSegLib.phantoms.spine import _build_levels, _paint_screws, _paint_spine_soft_tissue, _paint_vertebrae
from SpineContextSegLib.phantoms.thorax import _paint_ribs, _paint_scapulae


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
        uint8 :data:`~SpineContextSegLib.phantoms.canvas.TISSUE_CODES`, same grid (for tests and debugging).
    """

    ct: Any
    vertebra_labels: Any
    spine_mask: Any
    levels: List[int]
    params: Dict[str, Any]
    tissue: Any = None


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


def generate_phantom(seed: int, options: Optional[PhantomOptions] = None, **overrides: Any) -> Phantom:
    """Generate one synthetic spine CT with exact labels.

    Parameters
    ----------
    seed : int
        Seed of every random choice (``numpy.random.default_rng(seed)``).
    options : PhantomOptions, optional
        Fixed choices; fields left ``None`` are drawn from the seed.
    **overrides
        Fields of :class:`~SpineContextSegLib.phantoms.options.PhantomOptions` given as keywords (override ``options``).

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
