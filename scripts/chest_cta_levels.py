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
which only the second count shows.

``--slice-mm 2.5 3`` also scores the CT reformatted to thicker slices (``--pixel-mm`` in plane,
default 0.75), as chest CTs are often reconstructed (0.7 x 0.7 x 2.5 mm): each slice the
average of the slab it covers (a Gaussian along z with FWHM = the slice thickness), sampled
with a B-spline. The reading is mapped through physical space, so it scores every grid.

Usage: python scripts/chest_cta_levels.py [CASE_DIR] [--model DIR] [--slice-mm MM ...] [--pixel-mm MM]
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


def level_of(body_slice: float) -> str:
    """The level whose read body range holds ``body_slice`` (+-1 slice), or ``"disc"``."""
    for name, (low, high) in BODY_SLICES.items():
        if low - 1 <= body_slice <= high + 1:
            return name
    return "disc"


def thick_slices(image, slice_mm: float, pixel_mm: float):
    """``image`` reformatted to ``pixel_mm`` x ``pixel_mm`` x ``slice_mm`` slices, each the average of its slab (int16 HU)."""
    import SimpleITK as sitk

    averaged = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), [0.01, 0.01, slice_mm / 2.355])
    spacing = (pixel_mm, pixel_mm, slice_mm)
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    return sitk.Resample(averaged, size, sitk.Transform(), sitk.sitkBSpline, image.GetOrigin(), spacing, image.GetDirection(), -1000.0, sitk.sitkInt16)


def main(argv=None) -> int:
    import SimpleITK as sitk

    from SpineContextSegLib.io.images import read_image
    from SpineContextSegLib.labels import vertebra_by_verse_id
    from SpineContextSegLib.inference.pipeline import SegmentOptions, load_model_and_engine, segment_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", nargs="?", default=os.path.join("..", "shared", "data", "real", "ts_aorta_crop_T12"))
    parser.add_argument("--model", help="model folder (default: the bundled model)")
    parser.add_argument("--slice-mm", type=float, nargs="*", default=[], help="also score the CT reformatted to these slice thicknesses (mm)")
    parser.add_argument("--pixel-mm", type=float, default=0.75, help="in-plane pixel of the reformatted CTs (mm; default 0.75)")
    args = parser.parse_args(argv)
    original = read_image(os.path.join(args.case, "ct.nii.gz"))
    bundle, engine = load_model_and_engine(SegmentOptions(model_dir=args.model, task="vertebrae"))
    print("| slices | overlap | names right (T2-L1) | vertebrae named right (of 12) | names (the level each sits on) |")
    print("|---|---:|---:|---:|---|")
    for slice_mm in [None] + list(args.slice_mm):
        image = original if slice_mm is None else thick_slices(original, slice_mm, args.pixel_mm)
        grid = "x".join(f"{s:g}" for s in image.GetSpacing())
        for overlap in OVERLAPS:
            result = segment_image(image, SegmentOptions(model_dir=args.model, task="vertebrae", overlap=overlap), bundle=bundle, engine=engine)
            labels = sitk.GetArrayFromImage(result.mask)  # z, y, x on the CT's own grid (axial, y anterior -> posterior)
            right, named, shown = 0, 0, []
            for value in (int(v) for v in np.unique(labels) if v):
                z, y, x = np.nonzero(labels == value)
                front = y < np.median(y)
                body_z = float(np.median(z[front] if front.any() else z))
                point = image.TransformContinuousIndexToPhysicalPoint((float(np.median(x)), float(np.median(y)), body_z))
                sits_on = level_of(original.TransformPhysicalPointToContinuousIndex(point)[2])
                name = vertebra_by_verse_id(value).name
                if name in BODY_SLICES:
                    named += 1
                    right += sits_on == name
                shown.append(name if sits_on == name else f"{name} (on {sits_on})")
            print(f"| {grid} mm | {overlap} | {right}/{named} | {right}/{len(BODY_SLICES)} | {' '.join(shown)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
