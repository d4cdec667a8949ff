"""Seconds per stage of the vertebra labelling step (``label_vertebrae``), on chest-sized inputs.

Cases: a full-field chest phantom like a contrast chest CT (C7-L2, torso field of view,
0.7 x 0.7 x 2.5 mm, ~455 x 350 x 184 voxels; the phantom's own spine mask) and real CTs given as
case folders (``ct.nii.gz``), labelled from the bundled model's spine mask (computed once and
kept in ``--cache``). Each case is labelled twice in this process: the first run pays the
first-call costs that the pipeline pays too, the second shows the steady state. The modules
the pipeline has already loaded when it labels (SciPy's ndimage, SimpleITK) are imported first.

Usage: python scripts/labelling_speed.py [--real DIR ...] [--cache DIR] [--seed N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

STAGES = ("resample", "split", "evidence", "naming", "sacrum", "map_back")


def chest_phantom(seed: int):
    from SpineContextSegLib.phantoms.generator import generate_phantom

    phantom = generate_phantom(seed, spacing_mm=(0.7, 0.7, 2.5), first_level="C7", last_level="L2", field_of_view="torso")
    return f"chest phantom (seed {seed}, C7-L2)", phantom.ct, phantom.spine_mask


def model_mask(case_dir: str, cache: str):
    import SimpleITK as sitk

    ct = sitk.ReadImage(os.path.join(case_dir, "ct.nii.gz"))
    path = os.path.join(cache, os.path.basename(os.path.normpath(case_dir)) + "_mask.nii.gz")
    if not os.path.exists(path):
        from SpineContextSegLib.inference.pipeline import SegmentOptions, load_model_and_engine, segment_image

        options = SegmentOptions(task="spine")
        bundle, engine = load_model_and_engine(options)
        sitk.WriteImage(segment_image(ct, options, bundle=bundle, engine=engine).mask, path)
    return os.path.basename(os.path.normpath(case_dir)) + " (model mask)", ct, sitk.ReadImage(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", nargs="*", default=["/work/shared/data/real/ts_aorta_crop_T12"], help="case folders holding ct.nii.gz")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "scs-labelling-speed"), help="model masks are kept here")
    parser.add_argument("--seed", type=int, default=7, help="seed of the chest phantom")
    args = parser.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)

    import numpy as np
    import scipy.ndimage  # noqa: F401  (loaded by the pipeline before it labels)
    import SimpleITK as sitk

    from SpineContextSegLib.inference.vertebra_labelling import label_vertebrae

    cases = [chest_phantom(args.seed)] + [model_mask(folder, args.cache) for folder in args.real if os.path.isdir(folder)]
    print("| case | CT voxels | mask voxels | working grid (mm) | run | " + " | ".join(STAGES) + " | total (s) | names |")
    print("|---|---:|---:|---:|---|" + "---:|" * len(STAGES) + "---:|---|")
    for name, ct, mask in cases:
        size = ct.GetSize()
        mask_voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
        for run in ("first", "repeat"):
            start = time.perf_counter()
            _, info = label_vertebrae(mask, ct, include_sacrum=True)
            total = time.perf_counter() - start
            stages = info.get("timings_s", {})  # (absent before the stages were timed)
            names = f"{info['names'][0]}-{info['names'][-1]}" if info["names"] else "-"
            print(
                f"| {name} | {size[0]}x{size[1]}x{size[2]} | {mask_voxels} | {info['working_spacing_mm']:.2f} | {run} | "
                + " | ".join(f"{stages[stage]:.2f}" if stage in stages else "-" for stage in STAGES)
                + f" | **{total:.2f}** | {names} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
