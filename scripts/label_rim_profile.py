"""How bright is the CT just inside and just outside the spine labels? Median HU per voxel layer.

For each case, the median HU of the voxel layers 1, 2, 3 voxels inside the binary spine label
(successive 6-connected erosions) and 1, 2, 3 voxels outside it (dilations). Around real labels
the first layer outside is soft tissue; around the phantom generator's labels it is still bone
(its blur reaches beyond them): what the outline steps of ``segment`` and the phantoms' outline
convention are judged on (docs/benchmark.md, docs/training.md).

Usage: python scripts/label_rim_profile.py [CASES ...] [--pair CT LABEL ...] [--phantom-seeds N ...] [--grid-mm MM]
       e.g. ../shared/data/real --pair runs/bench7/work/full_size_phantom.nii.gz runs/bench7/work/full_size_phantom_label.nii.gz
       or   ../shared/data/real --phantom-seeds 3 11 29 --grid-mm 2   (as training sees them)
(CASES: dataset roots or case folders, as ``spinecontextseg evaluate`` takes them. ``--grid-mm``
resamples every CT linearly, and its label linearly then at 0.5, onto the isotropic canonical
grid, as training does; phantoms are drawn directly on it.)
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
    parser.add_argument("--phantom-seeds", nargs="+", type=int, default=[], help="also phantoms of these seeds (drawn on --grid-mm, default 2 mm)")
    parser.add_argument("--grid-mm", type=float, help="resample onto this isotropic grid first (training's: 2)")
    args = parser.parse_args(argv)

    def on_grid(ct: "sitk.Image", spine: "sitk.Image"):
        if not args.grid_mm:
            return ct, sitk.GetArrayFromImage(spine) > 0
        from SpineContextSegLib.inference.preprocessing import to_canonical

        grid = [args.grid_mm] * 3
        return to_canonical(ct, grid, method="linear"), sitk.GetArrayFromImage(to_canonical(sitk.Cast(spine, sitk.sitkFloat32), grid, method="linear", default_value=0.0)) >= 0.5

    rows = []
    for root in args.cases:
        for case in find_cases(root):
            ct, _ = case.load()
            rows.append((case.case_id, *on_grid(ct, case.load_spine_mask())))
    for ct_path, label_path in args.pair:
        label = sitk.ReadImage(label_path)
        values = sitk.GetArrayFromImage(label)
        spine = sitk.GetImageFromArray(spine_mask_from_vertebra_labels(values) if values.max() > 1 else (values > 0).astype(np.uint8))
        spine.CopyInformation(label)
        rows.append((os.path.basename(ct_path), *on_grid(read_image(ct_path), spine)))
    for seed in args.phantom_seeds:
        from SpineContextSegLib.phantoms.generator import generate_phantom_arrays

        phantom = generate_phantom_arrays(seed, spacing_mm=(args.grid_mm or 2.0,) * 3)
        ct = sitk.GetImageFromArray(phantom.ct.astype(np.float32))
        ct.SetSpacing((args.grid_mm or 2.0,) * 3)
        rows.append((f"phantom {seed}", ct, phantom.spine_mask > 0))
    print(f"| case | voxel mm | HU inside (1, 2, {LAYERS} voxels in) | HU outside (1, 2, {LAYERS} voxels out) |")
    print("|---|---|---|---|")
    for name, ct, label in rows:
        within, beyond = layer_medians_hu(label, sitk.GetArrayFromImage(ct))
        spacing = " × ".join(f"{s:.3g}" for s in ct.GetSpacing())
        print(f"| {name} | {spacing} | {' / '.join(f'{v:.0f}' for v in within)} | {' / '.join(f'{v:.0f}' for v in beyond)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
