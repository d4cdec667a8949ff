"""Are the thoracic names right on the chest CTA? Scored against a reading of its bodies, T2-L1.

``ts_aorta_crop_T12`` (1.5 mm, 120x126x164) has a label for T12 only, so ``evaluate`` can check
one of the ten or eleven names a run gives. :data:`BODY_SLICES` is our reading of the CT: the axial
slices (z index of its ``ct.nii.gz``) that each vertebral body spans on the mid-sagittal plane,
counted from the labelled T12 upward disc by disc (the reading's T12, slices 12-26, lies inside
the label's body, 9-28). It is a reading by eye, not a label: a name counts as right when the
median slice of the front half of its voxels (the body) lies in that name's range, +-1 slice.

For each tile overlap (0.25 = the default, 0.5: the names should not move with the tiles) it runs
``--task vertebrae`` and prints the names right among those it gives in T2-L1, each name with
the level it sits on, and the vertebrae of the reading that carry their own name (of 12): a
segment that holds two vertebrae names one of them right and leaves the other without a name,
which only the second count shows. The mean body Dice (:func:`body_dice`) scores the labels'
borders: where each body begins and ends, not only where its name sits.

``--slice-mm 2.5 3`` also scores the CT reformatted to thicker slices (``--pixel-mm`` in plane,
default 0.75), as chest CTs are often reconstructed (0.7 x 0.7 x 2.5 mm): each slice the
average of the slab it covers (a Gaussian along z with FWHM = the slice thickness), sampled
with a B-spline. The reading is mapped through physical space, so it scores every grid.

``--sagittal-slabs`` scores thoraco-lumbar sagittal slabs cut from it, as VerSe stores many
spine CTs: :data:`SAGITTAL_SLABS` (a left-right width centred on the column, a stretch of axial
slices that cuts the top vertebra, and the thickness of the sagittal slices, in plane 0.75 mm),
at the default overlap; it prints each slab's names and whether the run called them anchored.

Usage: python scripts/chest_cta_levels.py [CASE_DIR] [--model DIR] [--slice-mm MM ...] [--pixel-mm MM] [--sagittal-slabs | --slabs-only]
       (default CASE_DIR: ../shared/data/real/ts_aorta_crop_T12)
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Slices (z index, inferior -> superior) each vertebral body spans in the chest CTA, read by eye.
BODY_SLICES = {
    "L1": (0, 8), "T12": (12, 26), "T11": (29, 42), "T10": (44, 59), "T9": (61, 74), "T8": (76, 88), "T7": (90, 101),
    "T6": (103, 115), "T5": (117, 126), "T4": (129, 138), "T3": (142, 152), "T2": (154, 163),
}  # fmt: skip
OVERLAPS = (0.25, 0.5)
LABEL_FILE = "seg_vertebrae_T12.nii.gz"
#: Sagittal slabs: (left-right width mm, first and last axial slice of the CT, sagittal slice
#: thickness mm). The top slice cuts a vertebra, as the top of a VerSe slab does: slices 0-68
#: end in T9's body (T9-L1 in view), 0-95 and 5-82 in T7's and T8's, 20-110 also cut T12 below.
SAGITTAL_SLABS = ((80, 0, 68, 3.0), (80, 0, 68, 2.0), (80, 0, 68, 4.0), (100, 0, 68, 3.0), (120, 0, 68, 3.0), (60, 0, 68, 3.0), (80, 0, 95, 3.0), (80, 5, 82, 3.0), (80, 20, 110, 3.0))


def level_of(body_slice: float) -> str:
    """The level whose read body range holds ``body_slice`` (+-1 slice), or ``"disc"``."""
    for name, (low, high) in BODY_SLICES.items():
        if low - 1 <= body_slice <= high + 1:
            return name
    return "disc"


def _reformatted(image, spacing_mm, slab_mm):
    """``image`` resampled (B-spline) to ``spacing_mm`` (x, y, z), each voxel the average of the slab
    it covers: a Gaussian of FWHM ``slab_mm`` (x, y, z; 0 for none) before sampling (int16 HU)."""
    import SimpleITK as sitk

    averaged = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), [max(mm / 2.355, 0.01) for mm in slab_mm])
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing_mm)]
    return sitk.Resample(averaged, size, sitk.Transform(), sitk.sitkBSpline, image.GetOrigin(), tuple(spacing_mm), image.GetDirection(), -1000.0, sitk.sitkInt16)


def thick_slices(image, slice_mm: float, pixel_mm: float):
    """``image`` reformatted to ``pixel_mm`` x ``pixel_mm`` x ``slice_mm`` slices, each the average of its slab (int16 HU)."""
    return _reformatted(image, (pixel_mm, pixel_mm, slice_mm), (0.0, 0.0, slice_mm))


def sagittal_slab(image, centre_column: int, width_mm: float, first_slice: int, last_slice: int, slice_mm: float, pixel_mm: float = 0.75):
    """A sagittal slab of ``image``: ``width_mm`` left-right around column ``centre_column`` (x index),
    axial slices ``first_slice``-``last_slice``, reformatted to ``slice_mm`` x ``pixel_mm`` x
    ``pixel_mm`` (x, y, z), each sagittal slice the average of the slab it covers (int16 HU)."""
    half = int(round(0.5 * width_mm / image.GetSpacing()[0]))
    crop = image[max(centre_column - half, 0) : centre_column + half + 1, :, first_slice : last_slice + 1]
    return _reformatted(crop, (slice_mm, pixel_mm, pixel_mm), (slice_mm, 0.0, 0.0))


def names_on_levels(labels, image, original):
    """``[(name, level it sits on)]`` for each vertebra label of ``labels`` ((z, y, x) array on
    ``image``'s grid; y anterior -> posterior): the level of :data:`BODY_SLICES` holding the
    median slice of its front half (its body), mapped to ``original``'s slices."""
    from SpineContextSegLib.labels import vertebra_by_verse_id

    found = []
    for value in (int(v) for v in np.unique(labels) if v):
        z, y, x = np.nonzero(labels == value)
        front = y < np.median(y)
        body_z = float(np.median(z[front] if front.any() else z))
        point = image.TransformContinuousIndexToPhysicalPoint((float(np.median(x)), float(np.median(y)), body_z))
        found.append((vertebra_by_verse_id(value).name, level_of(original.TransformPhysicalPointToContinuousIndex(point)[2])))
    return found


def _right_and_shown(found):
    """How many of ``found`` (:func:`names_on_levels`) sit on their own level, and the names as printed ("T4 (on T5)" where not)."""
    right = sum(name == sits_on for name, sits_on in found)
    return right, " ".join(name if sits_on == name else f"{name} (on {sits_on})" for name, sits_on in found)


def body_dice(labels, image, original) -> dict:
    """Dice per level of :data:`BODY_SLICES` between the bodies the labels give and the read ones.

    ``labels``: (z, y, x) array on ``image``'s grid, axial slices (y anterior -> posterior). The
    body is the front 40 % of the spine mask in each slice (between its most anterior and its
    most posterior voxel); the read body of a level is that front part in the slices of its
    range (mapped to ``original``'s slices through physical space), the labelled one the front
    part that carries the level's name, in the slices of any read body (discs left out).
    """
    from SpineContextSegLib.labels import vertebra_by_name

    depth = labels.shape[0]
    original_slice = np.array([original.TransformPhysicalPointToContinuousIndex(image.TransformIndexToPhysicalPoint((0, 0, k)))[2] for k in range(depth)])
    mask = labels > 0
    rows = np.arange(labels.shape[1])[None, :, None]
    any_row = mask.any(axis=2)  # (z, y)
    first = np.where(any_row.any(axis=1), np.argmax(any_row, axis=1), 0)
    last = np.where(any_row.any(axis=1), labels.shape[1] - 1 - np.argmax(any_row[:, ::-1], axis=1), 0)
    front = mask & (rows <= (first + 0.4 * (last - first))[:, None, None])
    in_body = np.zeros(depth, dtype=bool)
    for low, high in BODY_SLICES.values():
        in_body |= (original_slice >= low) & (original_slice <= high)
    scores = {}
    for name, (low, high) in BODY_SLICES.items():
        read = front & ((original_slice >= low) & (original_slice <= high))[:, None, None]
        given = front & (labels == vertebra_by_name(name).value) & in_body[:, None, None]
        total = int(read.sum()) + int(given.sum())
        scores[name] = 2.0 * int((read & given).sum()) / total if total else float("nan")
    return scores


def main(argv=None) -> int:
    from SpineContextSegLib.inference.pipeline import SegmentOptions, load_model_and_engine
    from SpineContextSegLib.io.images import read_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", nargs="?", default=os.path.join("..", "shared", "data", "real", "ts_aorta_crop_T12"))
    parser.add_argument("--model", help="model folder (default: the bundled model)")
    parser.add_argument("--slice-mm", type=float, nargs="*", default=[], help="also score the CT reformatted to these slice thicknesses (mm)")
    parser.add_argument("--pixel-mm", type=float, default=0.75, help="in-plane pixel of the reformatted CTs (mm; default 0.75)")
    parser.add_argument("--sagittal-slabs", action="store_true", help="also score the sagittal slabs of SAGITTAL_SLABS")
    parser.add_argument("--slabs-only", action="store_true", help="score the sagittal slabs only")
    args = parser.parse_args(argv)
    original = read_image(os.path.join(args.case, "ct.nii.gz"))
    bundle, engine = load_model_and_engine(SegmentOptions(model_dir=args.model, task="vertebrae"))
    if not args.slabs_only:
        _score_axial(args, original, bundle, engine)
    if args.sagittal_slabs or args.slabs_only:
        _score_sagittal_slabs(args, original, bundle, engine)
    return 0


def _score_axial(args, original, bundle, engine) -> None:
    import SimpleITK as sitk

    from SpineContextSegLib.inference.pipeline import SegmentOptions, segment_image

    print("| slices | overlap | names right (T2-L1) | vertebrae named right (of 12) | mean body Dice (12) | names (the level each sits on) |")
    print("|---|---:|---:|---:|---:|---|")
    for slice_mm in [None] + list(args.slice_mm):
        image = original if slice_mm is None else thick_slices(original, slice_mm, args.pixel_mm)
        grid = "x".join(f"{s:g}" for s in image.GetSpacing())
        for overlap in OVERLAPS:
            result = segment_image(image, SegmentOptions(model_dir=args.model, task="vertebrae", overlap=overlap), bundle=bundle, engine=engine)
            labels = sitk.GetArrayFromImage(result.mask)
            found = names_on_levels(labels, image, original)
            right, shown = _right_and_shown(found)
            named = sum(name in BODY_SLICES for name, _ in found)
            bodies = np.nan_to_num(list(body_dice(labels, image, original).values()))
            print(f"| {grid} mm | {overlap} | {right}/{named} | {right}/{len(BODY_SLICES)} | {bodies.mean():.3f} | {shown} |", flush=True)


def _score_sagittal_slabs(args, original, bundle, engine) -> None:
    import SimpleITK as sitk

    from SpineContextSegLib.inference.pipeline import SegmentOptions, segment_image
    from SpineContextSegLib.io.images import read_image

    print("\n| sagittal slab: width, slices, thickness | names right | anchored | names (the level each sits on) |")
    print("|---|---:|---|---|")
    label = sitk.GetArrayFromImage(read_image(os.path.join(args.case, LABEL_FILE)))  # on the CT's grid
    column = int(np.median(np.nonzero(label)[2]))  # x index of the column's middle (the labelled T12)
    total_right = total = 0
    for width_mm, first, last, slice_mm in SAGITTAL_SLABS:
        image = sagittal_slab(original, column, width_mm, first, last, slice_mm, args.pixel_mm)
        result = segment_image(image, SegmentOptions(model_dir=args.model, task="vertebrae"), bundle=bundle, engine=engine)
        found = names_on_levels(sitk.GetArrayFromImage(result.mask), image, original)
        right, shown = _right_and_shown(found)
        total_right, total = total_right + right, total + len(found)
        anchored = result.info.get("vertebrae", {}).get("anchored")
        print(f"| {width_mm:g} mm, {first}-{last}, {slice_mm:g} mm | {right}/{len(found)} | {anchored} | {shown} |", flush=True)
    print(f"| **all slabs** | **{total_right}/{total}** | | |")


if __name__ == "__main__":
    sys.exit(main())
