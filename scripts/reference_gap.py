"""Where the default mask departs from the paper's pipeline: one speed lever at a time.

For each case, the reference at the model's tile (``bench``'s ``reference-model-tile``: the
paper's tile rule, overlap 0.5, no crop, no post-processing, torch fp32) is compared (Dice)
with our pipeline in OpenVINO fp32, switching the levers on one by one:

  stitcher   our tile placement (no tile hangs past the volume), overlap 0.5, no crop, no post-processing
  +crop      ... cropped to the body
  +overlap   ... the model card's overlap
  +post      ... post-processing: islands, pieces off the column, holes (= the default in fp32)

A case whose folder holds ``label.nii.gz`` (e.g. bench's full-size phantom, copied there) is
also scored against it before and after post-processing.

Usage: python scripts/reference_gap.py CASE_FOLDER_OR_CT [...] [--work-dir DIR]
(a case folder holds ``ct.nii.gz``; the reference masks are cached in the work folder)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

NO_POSTPROCESSING = dict(min_island_ml=0.0, max_column_offset_mm=float("inf"), fill_holes=False)
STEPS = {
    "stitcher": dict(overlap=0.5, crop_to_body=False, **NO_POSTPROCESSING),
    "+crop": dict(overlap=0.5, **NO_POSTPROCESSING),
    "+overlap": dict(NO_POSTPROCESSING),
    "+post": {},
}


def main(argv=None) -> int:
    from SpineContextSegLib.evaluation.bench import dice_between, ground_truth_dice, reference_segment
    from SpineContextSegLib.inference.pipeline import SegmentOptions, segment_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "scs-reference-gap"))
    args = parser.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    print("| case | " + " | ".join(STEPS) + " | vs label: +overlap | vs label: +post |")
    print("|---|" + "---:|" * (len(STEPS) + 2))
    for case in args.cases:
        ct = os.path.join(case, "ct.nii.gz") if os.path.isdir(case) else case
        name = os.path.basename(case.rstrip("/")) if os.path.isdir(case) else os.path.basename(case).split(".")[0]
        reference = os.path.join(args.work_dir, f"{name}__reference-model-tile.nii.gz")
        if not os.path.exists(reference):
            reference_segment(ct, reference, os.path.join(args.work_dir, f"{name}__reference.stl"), None, None, model_tile=True)
        label = os.path.join(case, "label.nii.gz") if os.path.isdir(case) else ""
        cells, outputs = [], {}
        for step, overrides in STEPS.items():
            outputs[step] = os.path.join(args.work_dir, f"{name}__{step}.nii.gz")
            segment_file(ct, outputs[step], SegmentOptions(engine="openvino", precision="fp32", min_spine_ml=0.0, **overrides))
            cells.append(f"{dice_between(outputs[step], reference):.4f}")
        for step in ("+overlap", "+post"):
            cells.append(f"{ground_truth_dice(outputs[step], label):.3f}" if os.path.exists(label) else "-")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
