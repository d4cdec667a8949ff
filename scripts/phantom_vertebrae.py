"""Vertebra naming on synthetic phantoms: identification and Dice per vertebra, from the model's
mask and from the phantom's own (true) spine mask.

Twenty phantoms with fixed seeds: twelve runs of 8-12 levels anywhere from C1 to the sacrum
(torso, spine-only and sagittal-slab fields of view in turn) and eight cervical runs from C1 to
T1-T5. Each is written as a case folder (``ct.nii.gz`` + ``seg_vert.nii.gz``, VerSe ids,
vertebrae only: the phantom's whole sacrum is left out, our sacrum segment is only its top), so
``spinecontextseg evaluate OUT --task vertebrae`` scores the same cases. The "true mask" columns
run the naming step alone on the phantom's spine mask: what the split and naming do when the
mask is right. Phantoms are training material of the bundled model: the "model" columns are no
estimate of accuracy on patients.

Usage: python scripts/phantom_vertebrae.py [--out DIR] [--model DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

#: (seed, first level, last level, field of view, spacing mm): the phantoms scored.
PHANTOMS = [(1000 + i, first, last, ("torso", "spine", "slab")[i % 3], 1.5) for i, (first, last) in enumerate(
    [(1, 9), (3, 14), (8, 19), (12, 22), (15, 26), (18, 26), (9, 20), (5, 16), (14, 24), (2, 12), (10, 21), (16, 26)]
)] + [(2000 + i, 1, last, ("torso", "spine")[i % 2], 1.0 if i % 2 else 1.5) for i, last in enumerate([8, 9, 10, 11, 12, 9, 10, 11])]  # fmt: skip


def write_phantoms(out: str) -> None:
    """Write every phantom of :data:`PHANTOMS` missing from ``out`` as ``<out>/phantom_<seed>/``."""
    import numpy as np
    import SimpleITK as sitk

    from SpineContextSegLib.io.files import atomic_output
    from SpineContextSegLib.io.images import write_labelmap
    from SpineContextSegLib.labels import SACRUM_ID
    from SpineContextSegLib.phantoms.generator import generate_phantom

    for seed, first, last, field_of_view, spacing in PHANTOMS:
        folder = os.path.join(out, f"phantom_{seed}")
        if os.path.exists(os.path.join(folder, "seg_vert.nii.gz")):
            continue
        os.makedirs(folder, exist_ok=True)
        phantom = generate_phantom(seed, spacing_mm=(spacing, spacing, 1.5), first_level=first, last_level=last, field_of_view=field_of_view)
        labels = sitk.GetArrayFromImage(phantom.vertebra_labels)
        vertebrae_only = sitk.GetImageFromArray(np.where(labels == SACRUM_ID, 0, labels).astype(np.uint8))
        vertebrae_only.CopyInformation(phantom.vertebra_labels)
        with atomic_output(os.path.join(folder, "ct.nii.gz")) as path:
            sitk.WriteImage(phantom.ct, path, useCompression=True)
        write_labelmap(vertebrae_only, os.path.join(folder, "seg_vert.nii.gz"))


def main(argv=None) -> int:
    from SpineContextSegLib.io.datasets import find_cases
    from SpineContextSegLib.evaluation.evaluate import evaluate_vertebra_cases
    from SpineContextSegLib.labels import CRANIO_CAUDAL_ORDER, vertebra_by_name
    from SpineContextSegLib.inference.pipeline import SegmentOptions, load_model_and_engine, segment_image
    from SpineContextSegLib.inference.vertebra_labelling import label_vertebrae

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "scs-phantom-vertebrae"), help="case folders are written (and reused) here")
    parser.add_argument("--model", help="model folder (default: the bundled model)")
    args = parser.parse_args(argv)
    write_phantoms(args.out)
    options = SegmentOptions(model_dir=args.model, task="vertebrae")
    bundle, engine = load_model_and_engine(options)

    def from_model(ct):
        return segment_image(ct, options, bundle=bundle, engine=engine).mask

    print("| phantom | levels | field of view | identified (model) | mean Dice (model) | identified (true mask) | mean Dice (true mask) |")
    print("|---|---|---|---:|---:|---:|---:|")
    totals = []
    field_of_view = {f"phantom_{seed}": fov for seed, _, _, fov, _ in PHANTOMS}
    for case in find_cases(args.out):
        truth_mask = case.load_spine_mask()

        def from_truth(ct, truth_mask=truth_mask):
            return label_vertebrae(truth_mask, ct)[0]

        model_row = evaluate_vertebra_cases([case], from_model)[0]
        truth_row = evaluate_vertebra_cases([case], from_truth)[0]
        cells = [model_row["identification_rate"], model_row["mean_vertebra_dice"], truth_row["identification_rate"], truth_row["mean_vertebra_dice"]]
        totals.append(cells)
        names = sorted((item.split()[0] for item in model_row["vertebrae"].split(", ")), key=lambda name: CRANIO_CAUDAL_ORDER.index(vertebra_by_name(name).value))
        print(f"| {case.case_id} | {names[0]}–{names[-1]} | {field_of_view.get(case.case_id, '?')} | " + " | ".join(f"{value:.2f}" for value in cells) + " |", flush=True)
    means = [sum(column) / len(column) for column in zip(*totals)]
    print(f"| **mean ({len(totals)})** | | | " + " | ".join(f"**{value:.2f}**" for value in means) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
