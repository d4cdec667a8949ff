"""Do the mask and the vertebra names stay the same when the tiles move? Overlap 0.25 against 0.5.

For each CT, runs ``--task vertebrae`` twice (tile overlap 0.25 and 0.5; everything else the
model card's) and prints the Dice of the two spine masks and the mean Dice over the vertebra
names found by either run (a name that one run gives and the other does not scores 0), and the
three names whose voxels moved most.

Usage: python scripts/tile_stability.py [--model DIR] CT [CT ...]
       e.g. ../shared/data/real/*/ct.nii.gz runs/ctchest4/images/CTChest4.nii.gz
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OVERLAPS = (0.25, 0.5)


def main(argv=None) -> int:
    import SimpleITK as sitk

    from SpineContextSegLib.io.images import read_image
    from SpineContextSegLib.labels import vertebra_by_verse_id
    from SpineContextSegLib.evaluation.metrics import dice
    from SpineContextSegLib.inference.pipeline import SegmentOptions, load_model_and_engine, segment_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cts", nargs="+")
    parser.add_argument("--model", help="model folder (default: the bundled model)")
    args = parser.parse_args(argv)
    options = SegmentOptions(model_dir=args.model, task="vertebrae")
    bundle, engine = load_model_and_engine(options)
    print("| CT | mask Dice | mean name Dice | least steady names (Dice) | names at 0.25 | names at 0.5 |")
    print("|---|---:|---:|---|---|---|")
    for path in args.cts:
        image = read_image(path)
        labels = {}
        for overlap in OVERLAPS:
            result = segment_image(image, SegmentOptions(model_dir=args.model, task="vertebrae", overlap=overlap), bundle=bundle, engine=engine)
            labels[overlap] = sitk.GetArrayFromImage(result.mask)
        first, second = (labels[overlap] for overlap in OVERLAPS)
        names = sorted((set(np.unique(first)) | set(np.unique(second))) - {0})
        per_name = {int(value): dice(first == value, second == value) for value in names}
        name_dice = float(np.mean(list(per_name.values()))) if names else 1.0
        least = " ".join(f"{vertebra_by_verse_id(v).name} {d:.2f}" for v, d in sorted(per_name.items(), key=lambda item: item[1])[:3])

        def readable(array) -> str:
            present = [int(v) for v in np.unique(array) if v]
            return " ".join(vertebra_by_verse_id(v).name for v in present)

        case = os.path.basename(os.path.dirname(os.path.abspath(path))) if os.path.basename(path).startswith("ct.") else os.path.basename(path)
        print(f"| {case} | {dice(first > 0, second > 0):.3f} | {name_dice:.3f} | {least} | {readable(first)} | {readable(second)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
