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

Usage: python scripts/chest_cta_levels.py [CASE_DIR] [--model DIR]
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


def main(argv=None) -> int:
    import SimpleITK as sitk

    from SpineContextSegLib.io.images import read_image
    from SpineContextSegLib.labels import vertebra_by_verse_id
    from SpineContextSegLib.inference.pipeline import SegmentOptions, load_model_and_engine, segment_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", nargs="?", default=os.path.join("..", "shared", "data", "real", "ts_aorta_crop_T12"))
    parser.add_argument("--model", help="model folder (default: the bundled model)")
    args = parser.parse_args(argv)
    image = read_image(os.path.join(args.case, "ct.nii.gz"))
    bundle, engine = load_model_and_engine(SegmentOptions(model_dir=args.model, task="vertebrae"))
    print("| overlap | names right (T2-L1) | vertebrae named right (of 12) | names (the level each sits on) |")
    print("|---:|---:|---:|---|")
    for overlap in OVERLAPS:
        result = segment_image(image, SegmentOptions(model_dir=args.model, task="vertebrae", overlap=overlap), bundle=bundle, engine=engine)
        labels = sitk.GetArrayFromImage(result.mask)  # z, y, x on the CT's own grid (axial, y anterior -> posterior)
        right, named, shown = 0, 0, []
        for value in (int(v) for v in np.unique(labels) if v):
            z, y, _ = np.nonzero(labels == value)
            front = y < np.median(y)
            sits_on = level_of(float(np.median(z[front] if front.any() else z)))
            name = vertebra_by_verse_id(value).name
            if name in BODY_SLICES:
                named += 1
                right += sits_on == name
            shown.append(name if sits_on == name else f"{name} (on {sits_on})")
        print(f"| {overlap} | {right}/{named} | {right}/{len(BODY_SLICES)} | {' '.join(shown)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
