"""How many tiles does following the column run, and does it change the mask? Shipped vs the plain start.

For each CT and tile overlap, runs ``segment``'s spine mask twice in this process: as shipped
(the first round on the mid-sagittal tiles behind :data:`~SpineContextSegLib.inference.pipeline.SPINE_START_FROM_FRONT`
of the body's depth, a tile that the column enters only by its rim left to its neighbours:
:func:`~SpineContextSegLib.inference.stitcher.following_rim_voxels`) and with the plain start (the
whole mid-sagittal plane, every tile the column touches within one voxel). Prints the tiles run
(of the tiling), the network's seconds, the Dice of the shipped mask against the plain one and
the voxels that differ. ``--all-tiles`` (``segment``'s, and the benchmark's
``default-all-tiles``) is the check against every tile.

Usage: python scripts/following_tiles.py CT [CT ...] [--overlaps 0.25 0.5] [--model DIR]
       e.g. ../shared/data/real/*/ct.nii.gz runs/ctchest4/images/CTChest4.nii.gz (the CTs first:
       --overlaps takes every number after it)
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    import SimpleITK as sitk

    import SpineContextSegLib.inference.pipeline as pipeline
    import SpineContextSegLib.inference.stitcher as stitcher
    from SpineContextSegLib.evaluation.metrics import dice
    from SpineContextSegLib.io.images import read_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cts", nargs="+")
    parser.add_argument("--overlaps", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--model", help="model folder (default: the bundled model)")
    args = parser.parse_args(argv)
    shipped = {"start": pipeline.SPINE_START_FROM_FRONT, "rim": stitcher.following_rim_voxels}
    plain = {"start": 0.0, "rim": lambda patch_size, overlap: 0}
    bundle, engine = pipeline.load_model_and_engine(pipeline.SegmentOptions(model_dir=args.model))
    print("| CT | overlap | tiles run, plain start (of the tiling) | shipped | network s, plain | shipped | Dice shipped vs plain | voxels differing |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for path in args.cts:
        image = read_image(path)
        name = os.path.basename(os.path.dirname(path)) if os.path.basename(path) == "ct.nii.gz" else os.path.basename(path)
        for overlap in args.overlaps:
            runs = {}
            for variant, setting in (("plain", plain), ("shipped", shipped)):
                pipeline.SPINE_START_FROM_FRONT, stitcher.following_rim_voxels = setting["start"], setting["rim"]
                try:
                    result = pipeline.segment_image(image, pipeline.SegmentOptions(model_dir=args.model, overlap=overlap), bundle=bundle, engine=engine)
                finally:
                    pipeline.SPINE_START_FROM_FRONT, stitcher.following_rim_voxels = shipped["start"], shipped["rim"]
                runs[variant] = (sitk.GetArrayFromImage(result.mask) > 0, result.info["tiles_run"], result.timings_s["network"])
            (plain_mask, plain_tiles, plain_s), (mask, tiles, seconds) = runs["plain"], runs["shipped"]
            print(
                f"| {name} | {overlap} | {plain_tiles[0]} ({plain_tiles[1]}) | {tiles[0]} | {plain_s:.2f} | {seconds:.2f} | {dice(mask, plain_mask):.5f} | {int(np.count_nonzero(mask != plain_mask))} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
