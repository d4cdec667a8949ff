"""The phantom configuration: :class:`PhantomOptions` and the drawing of every random choice.

:func:`_draw_params` draws all parameters from the seed's stream in a fixed order (options
only override afterwards, so they never shift later draws); :func:`_draw_anatomy` draws the
anatomy style and streak choices from a stream of their own. The ranges are listed in
:mod:`SpineContextSegLib.phantoms.generator`'s docstring.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from SpineContextSegLib.labels import (
    L6_ID,
    SACRUM_ID,
    STANDARD_CHAIN,
    T13_ID,
    vertebra_by_name,
    vertebra_by_verse_id,
)

FIELDS_OF_VIEW = ("torso", "spine", "slab")


@dataclass
class PhantomOptions:
    """What :func:`~SpineContextSegLib.phantoms.generator.generate_phantom` may draw; ``None`` means "draw at random from the seed".

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
        Cobb angles of the curvature (defaults in :mod:`SpineContextSegLib.phantoms.generator`'s docstring).
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
    cortical_hu : float, optional
        HU of the vertebrae's cortical shell as drawn, before blur (the other bones': 0.9 times
        it). Default: 700..1200. A real vertebra's shell is thinner than a 1-2 mm voxel, so on
        such grids its rim looks dimmer than that (277-403 HU one voxel inside real labels on a
        2 mm grid: ``scripts/label_rim_profile.py``).
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
    cortical_hu: Optional[float] = None


ANATOMY_STYLES = ("geometric", "real")


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
    if o.cortical_hu is not None:
        p["hu"]["cortical"] = float(o.cortical_hu)
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
