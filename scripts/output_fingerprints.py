"""Fingerprints of everything ``spinecontextseg segment`` writes, to show a refactor changed nothing.

Runs the command-line tool (a separate process, so that it measures what a user runs) on each CT
for ``--task spine`` and ``--task vertebrae`` with ``--roi``, ``--centreline`` and ``--stl``, and
prints one line per output: the SHA-256 of the label map's voxels (plus its size, spacing, origin
and direction), of the JSON files (without timing fields) and the STL's point count. Compare the
output of two checkouts with ``diff``; identical lines mean bit-identical masks.

Usage: python scripts/output_fingerprints.py CT [CT ...] > before.txt
       e.g. ../shared/data/real/*/ct.nii.gz runs/ctchest4/images/CTChest4.nii.gz
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile

TASKS = ("spine", "vertebrae")


def _voxels_digest(path: str) -> str:
    import SimpleITK as sitk

    image = sitk.ReadImage(path)
    digest = hashlib.sha256(sitk.GetArrayViewFromImage(image).tobytes())
    geometry = (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    digest.update(repr(geometry).encode())
    return digest.hexdigest()[:16]


def _json_digest(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _stl_points(path: str) -> int:
    import vtk

    reader = vtk.vtkSTLReader()
    reader.SetFileName(path)
    reader.Update()
    return reader.GetOutput().GetNumberOfPoints()


def main(argv=None) -> int:
    cts = list(sys.argv[1:] if argv is None else argv)
    if not cts:
        print(__doc__, file=sys.stderr)
        return 2
    for ct in cts:
        name = os.path.basename(os.path.dirname(ct)) if os.path.basename(ct).startswith("ct.") else os.path.basename(ct)
        for task in TASKS:
            with tempfile.TemporaryDirectory() as folder:
                out = {key: os.path.join(folder, f"{key}.{ext}") for key, ext in
                       (("mask", "nii.gz"), ("roi", "json"), ("centreline", "json"), ("stl", "stl"))}
                command = [sys.executable, "-m", "SpineContextSegLib.cli", "segment", ct, "-o", out["mask"],
                           "--task", task, "--roi", out["roi"], "--centreline", out["centreline"], "--stl", out["stl"]]
                run = subprocess.run(command, capture_output=True, text=True)
                if run.returncode != 0:
                    print(f"{name} {task} FAILED rc={run.returncode}: {run.stderr.strip()[-300:]}")
                    continue
                print(f"{name} {task} mask {_voxels_digest(out['mask'])} roi {_json_digest(out['roi'])} "
                      f"centreline {_json_digest(out['centreline'])} stl_points {_stl_points(out['stl'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
