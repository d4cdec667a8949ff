"""How bright is the CT just inside and just outside the spine labels? Median HU per voxel layer.

For each case, the median HU of the voxel layers 1, 2, 3 voxels inside the binary spine label
(successive 6-connected erosions) and 1, 2, 3 voxels outside it (dilations). Around real labels
the first layer outside is soft tissue; around the phantom generator's labels it is still bone
(its blur reaches beyond them): what the outline steps of ``segment`` and the phantoms' outline
convention are judged on (docs/benchmark.md, docs/training.md).

Usage: python scripts/label_rim_profile.py [CASES ...] [--pair CT LABEL ...]
       e.g. ../shared/data/real --pair runs/bench7/work/full_size_phantom.nii.gz runs/bench7/work/full_size_phantom_label.nii.gz
(CASES: dataset roots or case folders, as ``spinecontextseg evaluate`` takes them)
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYERS = 3


def layer_medians_hu(label: np.ndarray, ct_hu: np.ndarray, layers: int = LAYERS):
    """Median HU of the ``layers`` voxel layers inside ``label`` (outermost first) and outside it (nearest first)."""
    from scipy import ndimage

    inside, grown = label.copy(), label.copy()
    within, beyond = [], []
    for _ in range(layers):
        eroded = ndimage.binary_erosion(inside)
        within.append(float(np.median(ct_hu[inside & ~eroded])) if (inside & ~eroded).any() else float("nan"))
        inside = eroded
        dilated = ndimage.binary_dilation(grown)
        beyond.append(float(np.median(ct_hu[dilated & ~grown])))
        grown = dilated
    return within, beyond


def main(argv=None) -> int:
    import SimpleITK as sitk

    from SpineContextSegLib.io.datasets import find_cases
    from SpineContextSegLib.io.images import read_image
    from SpineContextSegLib.labels import spine_mask_from_vertebra_labels

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("CT", "LABEL"), help="a CT and its label map (non-zero: spine)")
    args = parser.parse_args(argv)
    rows = []
    for root in args.cases:
        for case in find_cases(root):
            ct, _ = case.load()
            rows.append((case.case_id, ct, sitk.GetArrayFromImage(case.load_spine_mask()) > 0))
    for ct_path, label_path in args.pair:
        ct = read_image(ct_path)
        label = sitk.GetArrayFromImage(sitk.ReadImage(label_path))
        rows.append((os.path.basename(ct_path), ct, spine_mask_from_vertebra_labels(label).astype(bool) if label.max() > 1 else label > 0))
    print(f"| case | voxel mm | HU inside (1, 2, {LAYERS} voxels in) | HU outside (1, 2, {LAYERS} voxels out) |")
    print("|---|---|---|---|")
    for name, ct, label in rows:
        within, beyond = layer_medians_hu(label, sitk.GetArrayFromImage(ct))
        spacing = " × ".join(f"{s:g}" for s in ct.GetSpacing())
        print(f"| {name} | {spacing} | {' / '.join(f'{v:.0f}' for v in within)} | {' / '.join(f'{v:.0f}' for v in beyond)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
