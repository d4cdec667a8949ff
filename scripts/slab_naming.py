"""Are the vertebra names right on shorter slabs of a labelled scan? Crops one case every way.

A sagittal slab that shows a few vertebrae, none of the anchors at its ends (sacrum, skull base,
first rib), is where names slip by a level. This cuts a labelled CT along its cranio-caudal
index axis into slabs that drop 0..N labelled vertebrae from the bottom and from the top (the cut
goes through the middle of a vertebra, as a real field of view does), runs ``--task vertebrae``
on each and prints, per slab, the VerSe identification rate, the names given and whether the run
called them anchored. A confident wrong name (anchored, rate < 1) is the failure to fix.
``--width-mm`` first narrows the scan left-right to that width around the labelled column, as
a sagittal slab is (ribs and transverse processes cut by its sides). Labels in VerSe ids or
TotalSegmentator's (``--label-format totalsegmentator``).

Usage: python scripts/slab_naming.py CT LABELS [--drop 2] [--width-mm MM] [--label-format F] [--model DIR]
       e.g. ../shared/data/real/verse_sub-verse014/ct.nii.gz ../shared/data/real/verse_sub-verse014/seg_vert.nii.gz
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _narrowed(image, labels, width_mm: float):
    """``image`` and ``labels`` cut left-right to ``width_mm`` around the middle of the labelled vertebrae."""
    import SimpleITK as sitk

    direction = np.abs(np.asarray(image.GetDirection()).reshape(3, 3))
    axis = int(np.argmax(direction[0]))  # the index axis that runs left-right (physical x)
    numpy_axis = 2 - axis
    where = np.nonzero(np.any(sitk.GetArrayViewFromImage(labels) > 0, axis=tuple(a for a in range(3) if a != numpy_axis)))[0]
    middle = int(round(0.5 * (where.min() + where.max())))
    half = int(round(0.5 * width_mm / image.GetSpacing()[axis]))
    index = [slice(None)] * 3
    index[axis] = slice(max(middle - half, 0), middle + half + 1)
    return image[tuple(index)], labels[tuple(index)]


def main(argv=None) -> int:
    import SimpleITK as sitk

    from SpineContextSegLib.evaluation.metrics import identification_rate
    from SpineContextSegLib.io.images import read_image
    from SpineContextSegLib.io.validation import cranio_caudal_axis
    from SpineContextSegLib.labels import totalsegmentator_to_verse, vertebra_by_verse_id
    from SpineContextSegLib.inference.pipeline import SegmentOptions, load_model_and_engine, segment_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ct")
    parser.add_argument("labels")
    parser.add_argument("--drop", type=int, default=2, help="most labelled vertebrae to drop at each end (default 2)")
    parser.add_argument("--label-format", choices=("verse", "totalsegmentator"), default="verse", help="ids of LABELS (default: VerSe)")
    parser.add_argument("--width-mm", type=float, help="narrow the scan left-right to this width around the labelled column (mm)")
    parser.add_argument("--model", help="model folder (default: the bundled model)")
    args = parser.parse_args(argv)
    image = read_image(args.ct)
    labels = sitk.ReadImage(args.labels)
    if args.label_format == "totalsegmentator":
        verse = sitk.GetImageFromArray(totalsegmentator_to_verse(sitk.GetArrayFromImage(labels)).astype(np.uint8))
        verse.CopyInformation(labels)
        labels = verse
    if args.width_mm:
        image, labels = _narrowed(image, labels, args.width_mm)
    axis = cranio_caudal_axis(image)
    numpy_axis = 2 - axis
    label_array = sitk.GetArrayViewFromImage(labels)
    present = [int(v) for v in np.unique(label_array) if 0 < v < 26]
    # the index where each vertebra's middle lies along the axis
    middle = {}
    for value in present:
        where = np.nonzero(np.any(label_array == value, axis=tuple(a for a in range(3) if a != numpy_axis)))[0]
        middle[value] = int(round(0.5 * (where.min() + where.max())))
    superior_is_high = np.asarray(image.GetDirection()).reshape(3, 3)[2, axis] > 0
    ordered = sorted(present)  # cranial first
    options = SegmentOptions(model_dir=args.model, task="vertebrae")
    bundle, engine = load_model_and_engine(options)
    print("| slab | vertebrae labelled | identified | names given | anchored (method) |")
    print("|---|---|---:|---|---|")
    size = image.GetSize()[axis]
    for top in range(0, args.drop + 1):
        for bottom in range(0, args.drop + 1):
            if top + bottom > len(ordered) - 2:
                continue
            cut_top = middle[ordered[top - 1]] if top else None
            cut_bottom = middle[ordered[len(ordered) - bottom]] if bottom else None
            # index range [lo, hi) kept along the axis
            cranial_end = cut_top if cut_top is not None else (size if superior_is_high else 0)
            caudal_end = cut_bottom if cut_bottom is not None else (0 if superior_is_high else size)
            lo, hi = sorted((cranial_end, caudal_end))
            index = [slice(None)] * 3
            index[axis] = slice(lo, hi)
            crop, crop_labels = image[tuple(index)], labels[tuple(index)]
            result = segment_image(crop, options, bundle=bundle, engine=engine)
            truth = sitk.GetArrayFromImage(crop_labels).astype(np.int32)
            truth[truth >= 26] = 0
            kept = [v for v in ordered[top: len(ordered) - bottom]]
            truth[~np.isin(truth, kept)] = 0  # vertebrae the cut halves are not scored
            predicted = sitk.GetArrayFromImage(result.mask).astype(np.int32)
            rate, _ = identification_rate(predicted, truth, crop.GetSpacing()[::-1])
            info = result.info.get("vertebrae", {})
            names = ",".join(info.get("names", []))
            print(f"| drop {top} top, {bottom} bottom | {vertebra_by_verse_id(kept[0]).name}-{vertebra_by_verse_id(kept[-1]).name} "
                  f"| {rate:.2f} | {names} | {info.get('anchored')} ({info.get('method')}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
