"""Write slicerio's CTChest4 sample as a training case: ``OUT/images/CTChest4.nii.gz`` + ``OUT/labels/CTChest4.nii.gz``.

CTChest4 (shipped inside the PyPI package ``slicerio``: a real chest CT, 3 x 3 x 10 mm) is the
only real CT here whose labels cover the thoracic spine. Its "cervical/thoracic/lumbar
vertebral column" segments are crude tubes drawn on 10 mm slices; the binary label written
here keeps the bone of those tubes (CT >= 150 HU, marrow enclosed in each axial slice filled),
so soft tissue at the tubes' edges is not taught as spine. Discs averaged into 10 mm slices
cannot be removed: train on it only briefly, then sharpen on data with exact outlines (see the
README's Training section).

Usage: python scripts/prepare_ctchest4.py OUT_FOLDER      (needs: pip install slicerio)
"""
from __future__ import annotations

import os
import sys

import numpy as np

#: Segment names of the spine in CTChest4's Segmentation.seg.nrrd.
SPINE_SEGMENTS = ("cervical vertebral column", "thoracic vertebral column", "lumbar vertebral column")
#: Lowest CT value kept inside the tubes, HU.
BONE_HU = 150.0


def main(out_folder: str) -> int:
    import SimpleITK as sitk
    import slicerio
    from scipy import ndimage

    data = os.path.join(os.path.dirname(slicerio.__file__), "data")
    ct = sitk.ReadImage(os.path.join(data, "CTChest4.nrrd"))
    segmentation = slicerio.read_segmentation(os.path.join(data, "Segmentation.seg.nrrd"))
    values = [s["labelValue"] for s in segmentation["segments"] if s["name"] in SPINE_SEGMENTS]
    if len(values) != len(SPINE_SEGMENTS):
        print(f"error: CTChest4's segmentation lacks some of {SPINE_SEGMENTS}", file=sys.stderr)
        return 1
    tube = np.isin(np.transpose(segmentation["voxels"], (2, 1, 0)), values)  # (i, j, k) -> numpy (z, y, x)
    if tube.shape != sitk.GetArrayViewFromImage(ct).shape:
        print("error: CTChest4's segmentation and CT grids differ", file=sys.stderr)
        return 1
    bone = tube & (sitk.GetArrayViewFromImage(ct) >= BONE_HU)
    for z in range(bone.shape[0]):
        bone[z] = ndimage.binary_fill_holes(bone[z]) & tube[z]
    label = sitk.GetImageFromArray(bone.astype(np.uint8))
    label.CopyInformation(ct)
    for folder, image in (("images", ct), ("labels", label)):
        os.makedirs(os.path.join(out_folder, folder), exist_ok=True)
        sitk.WriteImage(image, os.path.join(out_folder, folder, "CTChest4.nii.gz"), True)
    print(f"wrote {out_folder}/images/CTChest4.nii.gz and labels/CTChest4.nii.gz ({bone.sum() * np.prod(ct.GetSpacing()) / 1000:.0f} ml of spine)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
