"""Build ``SpineContextSegLib/resources/anatomy/bone_shapes.npz`` from the myo-sim bone meshes.

The phantom generator (:mod:`SpineContextSegLib.phantoms.generator`) draws thoracic and lumbar vertebrae
from real bone shapes when this file is present: the surface meshes of T1-T12, L1-L5 and the
scapula of MyoSuite's musculoskeletal model (PyPI ``myo-sim`` 0.2.4, Apache-2.0; see
``resources/anatomy/NOTICE.txt``). Each mesh is voxelised at 0.5 mm (VTK), turned into a signed
distance map (mm, negative inside; scipy's exact Euclidean distance transform), moved into the
phantom's vertebra frame and stored at :data:`GRID_MM` (vertebrae 1 mm, scapula 2 mm) as int8 in steps of :data:`STEP_MM`,
clipped to +-:data:`CLIP_MM` (the phantom needs the distance only near the surface: cortex,
trabecular core).

Frames. The meshes are in OpenSim's body frame (metres; x anterior, y superior, z right). The
phantom's vertebra frame (mm) is u = patient left = -z, v = posterior = -x, w = superior = y,
with its origin at the centre of the vertebral body; the body's width (u), depth (v) and
height (w) are stored per level so that the generator can scale each shape onto the level's
drawn body size.

Usage::

    pip download --no-deps myo-sim==0.2.4 -d wheels/
    python scripts/make_bone_shapes.py wheels/myo_sim-0.2.4-py3-none-any.whl

(writes into the package's resources; ``-o FILE`` writes elsewhere).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile

import numpy as np

#: Meshes (inside the wheel's ``myo_sim/models/meshes/``) and the VerSe id they stand for.
VERTEBRA_MESHES = {**{f"thoracic{k}_s.stl": 7 + k for k in range(1, 13)}, **{f"lumbar{k}.stl": 19 + k for k in range(1, 6)}}
OTHER_MESHES = {"scapula.stl": "scapula"}
#: Stored grid spacing (mm): vertebrae, and the large thin scapula.
GRID_MM = {"vertebra": 1.0, "scapula": 2.0}
#: Distance step and clip (mm).
STEP_MM = 0.25
CLIP_MM = 8.0
VOXELISE_MM = 0.5
OUT_DEFAULT = os.path.join(os.path.dirname(__file__), "..", "SpineContextSegLib", "resources", "anatomy", "bone_shapes.npz")

#: OpenSim (x anterior, y superior, z right) -> vertebra frame (u left, v posterior, w superior).
OPENSIM_TO_LOCAL = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def read_stl_from_wheel(wheel: str, name: str) -> np.ndarray:
    """Triangles (n, 3, 3) in mm, vertebra-frame axes, of one binary STL inside the wheel."""
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(f"myo_sim/models/meshes/{name}")
    count = int(np.frombuffer(data[80:84], dtype="<u4")[0])
    record = np.dtype([("normal", "<f4", 3), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])
    triangles = np.frombuffer(data[84:84 + 50 * count], dtype=record)["vertices"].astype(np.float64) * 1000.0
    return triangles @ OPENSIM_TO_LOCAL.T


def voxelise(triangles: np.ndarray, spacing_mm: float, pad_mm: float) -> tuple:
    """Inside mask (z, y, x) = (w, v, u) of a closed triangle mesh, and the grid's origin (u, v, w) mm."""
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

    points = vtk.vtkPoints()
    points.SetData(numpy_to_vtk(triangles.reshape(-1, 3).copy(), deep=True))
    cells = vtk.vtkCellArray()
    for k in range(len(triangles)):
        cells.InsertNextCell(3, (3 * k, 3 * k + 1, 3 * k + 2))
    mesh = vtk.vtkPolyData()
    mesh.SetPoints(points)
    mesh.SetPolys(cells)
    clean = vtk.vtkCleanPolyData()  # merge the STL's duplicated vertices: a closed surface
    clean.SetInputData(mesh)
    clean.Update()
    lo = triangles.reshape(-1, 3).min(axis=0) - pad_mm
    hi = triangles.reshape(-1, 3).max(axis=0) + pad_mm
    dims = np.ceil((hi - lo) / spacing_mm).astype(int) + 1
    image = vtk.vtkImageData()
    image.SetSpacing(spacing_mm, spacing_mm, spacing_mm)
    image.SetOrigin(*lo)
    image.SetDimensions(*dims)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.GetPointData().GetScalars().Fill(1)
    stencil = vtk.vtkPolyDataToImageStencil()
    stencil.SetInputConnection(clean.GetOutputPort())
    stencil.SetOutputOrigin(*lo)
    stencil.SetOutputSpacing(spacing_mm, spacing_mm, spacing_mm)
    stencil.SetOutputWholeExtent(image.GetExtent())
    cut = vtk.vtkImageStencil()
    cut.SetInputData(image)
    cut.SetStencilConnection(stencil.GetOutputPort())
    cut.SetBackgroundValue(0)
    cut.Update()
    inside = vtk_to_numpy(cut.GetOutput().GetPointData().GetScalars()).reshape(dims[::-1]) > 0
    return inside, lo


def signed_distance_mm(inside: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Euclidean signed distance (mm, negative inside) of a boolean mask."""
    from scipy import ndimage

    outside = ndimage.distance_transform_edt(~inside, sampling=spacing_mm)
    inner = ndimage.distance_transform_edt(inside, sampling=spacing_mm)
    return np.where(inside, -inner + 0.5 * spacing_mm, outside - 0.5 * spacing_mm)


def vertebral_body(inside: np.ndarray, origin_mm: np.ndarray, spacing_mm: float) -> tuple:
    """(centre (u, v, w) mm, width, depth, height mm) of the vertebral body of a voxelised vertebra.

    The body is the bone anterior to the spinal canal: along the mid-sagittal line through the
    bone's densest level, the first run of bone from the anterior end, up to the canal.
    """
    from scipy import ndimage

    w_count = inside.sum(axis=(1, 2))
    u_mid = int(round(np.average(np.arange(inside.shape[2]), weights=inside.sum(axis=(0, 1)))))
    sagittal = inside[:, :, max(u_mid - 2, 0):u_mid + 3].any(axis=2)  # (w, v)
    # the body: the anterior connected part of the mid-sagittal slice (the canal separates it)
    parts, n = ndimage.label(sagittal)
    anterior = [int(np.nonzero(parts == k)[1].min()) for k in range(1, n + 1)]
    body_2d = parts == 1 + int(np.argmin(anterior))
    v_lo, v_hi = np.nonzero(body_2d.any(axis=0))[0][[0, -1]]
    w_lo, w_hi = np.nonzero(body_2d.any(axis=1))[0][[0, -1]]
    body = inside.copy()
    body[:, : v_lo, :] = False
    body[:, v_hi + 1:, :] = False
    body[: w_lo, :, :] = False
    body[w_hi + 1:, :, :] = False
    u_any = np.nonzero(body[(w_lo + w_hi) // 2].any(axis=0))[0]
    # the pedicles leave the body behind its posterior third: measure width in its front 2/3
    front = body[:, v_lo: v_lo + max(2, int(0.66 * (v_hi - v_lo))), :].any(axis=(0, 1))
    u_front = np.nonzero(front)[0]
    centre_index = np.array([0.5 * (u_front[0] + u_front[-1]), 0.5 * (v_lo + v_hi), 0.5 * (w_lo + w_hi)])
    del w_count, u_any
    size = np.array([u_front[-1] - u_front[0] + 1, v_hi - v_lo + 1, w_hi - w_lo + 1], dtype=float) * spacing_mm
    return origin_mm + centre_index * spacing_mm, size


def build(wheel: str) -> dict:
    from scipy import ndimage

    arrays = {}
    for name, key in list(VERTEBRA_MESHES.items()) + list(OTHER_MESHES.items()):
        grid_mm = GRID_MM["vertebra" if isinstance(key, int) else key]
        ratio = int(round(grid_mm / VOXELISE_MM))
        triangles = read_stl_from_wheel(wheel, name)
        inside, origin = voxelise(triangles, VOXELISE_MM, pad_mm=CLIP_MM / 2)
        if isinstance(key, int):
            centre, size = vertebral_body(inside, origin, VOXELISE_MM)
        else:
            centre, size = origin + 0.5 * (np.array(inside.shape[::-1]) - 1) * VOXELISE_MM, np.ptp(triangles.reshape(-1, 3), axis=0)
        sdf = signed_distance_mm(inside, VOXELISE_MM)
        sdf = ndimage.uniform_filter(sdf, ratio)[::ratio, ::ratio, ::ratio] if ratio > 1 else sdf
        quantised = np.clip(np.rint(sdf / STEP_MM), -round(CLIP_MM / STEP_MM), round(CLIP_MM / STEP_MM)).astype(np.int8)
        prefix = f"v{key}" if isinstance(key, int) else str(key)
        arrays[f"{prefix}_sdf"] = quantised  # (w, v, u)
        arrays[f"{prefix}_origin_mm"] = (origin - centre).astype(np.float32)  # grid origin relative to the body centre
        arrays[f"{prefix}_body_mm"] = size.astype(np.float32)  # width, depth, height (scapula: extent)
        arrays[f"{prefix}_grid_mm"] = np.float32(grid_mm)
        print(f"{name:18s} -> {prefix:8s} grid {quantised.shape} body {np.round(size, 1)} volume {inside.sum() * VOXELISE_MM ** 3 / 1000:.1f} ml")
    arrays["step_mm"] = np.float32(STEP_MM)
    arrays["clip_mm"] = np.float32(CLIP_MM)
    return arrays


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", help="myo_sim-0.2.4-py3-none-any.whl (pip download --no-deps myo-sim==0.2.4)")
    parser.add_argument("-o", "--output", default=OUT_DEFAULT)
    args = parser.parse_args(argv)
    if not zipfile.is_zipfile(args.wheel):
        print(f"error: {args.wheel} is not a wheel (zip) file", file=sys.stderr)
        return 2
    arrays = build(args.wheel)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, args.output)
    print(f"wrote {args.output} ({len(buffer.getvalue()) / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
