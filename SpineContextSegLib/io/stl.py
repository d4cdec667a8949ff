"""STL files of triangulated surfaces in LPS mm, and a check that a surface is closed.

:func:`write_stl` writes binary STL whose 80-byte header names the space and unit,
for example ``SpineContextSeg SPACE=LPS UNITS=mm``; ``space="RAS"`` negates x and y,
as Slicer's exporter does with ``lps=False``. :func:`read_stl` reads binary or ASCII STL
back with duplicate vertices merged, so that :func:`is_watertight` can check the surface.
The surfaces themselves come from :mod:`SpineContextSegLib.io.meshing`.

VTK is imported inside the functions so that importing this module stays cheap.
"""
from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

import numpy as np

from SpineContextSegLib.io.files import atomic_output

if TYPE_CHECKING:  # pragma: no cover - typing only
    from vtkmodules.vtkCommonDataModel import vtkPolyData

#: Output coordinate systems for STL files.
STL_SPACES = ("LPS", "RAS")

_STL_RECORD = np.dtype([("normal", "<f4", (3,)), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])


# ---------------------------------------------------------------------------------------
# Surfaces as arrays
# ---------------------------------------------------------------------------------------


def polydata_from_arrays(points: np.ndarray, triangles: np.ndarray) -> "vtkPolyData":
    """vtkPolyData from (n, 3) points and (m, 3) triangle point ids; unused points are dropped."""
    from vtkmodules.util.numpy_support import numpy_to_vtk, numpy_to_vtkIdTypeArray
    from vtkmodules.vtkCommonCore import vtkPoints
    from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkPolyData

    used, compact_ids = np.unique(np.asarray(triangles).ravel(), return_inverse=True)
    triangles = compact_ids.reshape(-1, 3)
    vtk_points = vtkPoints()
    vtk_points.SetData(numpy_to_vtk(np.ascontiguousarray(points[used], dtype=np.float32), deep=True))
    cells = vtkCellArray()
    offsets = np.arange(0, triangles.size + 1, 3, dtype=np.int64)
    cells.SetData(numpy_to_vtkIdTypeArray(offsets, deep=True), numpy_to_vtkIdTypeArray(triangles.ravel().astype(np.int64), deep=True))
    polydata = vtkPolyData()
    polydata.SetPoints(vtk_points)
    polydata.SetPolys(cells)
    return polydata


def surface_triangles(polydata) -> np.ndarray:
    """(n, 3) point ids of the surface's triangles (polygons and strips are triangulated)."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    polys = polydata.GetPolys()
    if polydata.GetNumberOfPolys() == 0 and polydata.GetNumberOfStrips() == 0:
        return np.zeros((0, 3), dtype=np.int64)
    offsets = vtk_to_numpy(polys.GetOffsetsArray())
    if polydata.GetNumberOfStrips() == 0 and np.all(np.diff(offsets) == 3):
        return vtk_to_numpy(polys.GetConnectivityArray()).reshape(-1, 3).astype(np.int64)
    from vtkmodules.vtkFiltersCore import vtkTriangleFilter

    triangulate = vtkTriangleFilter()
    triangulate.SetInputData(polydata)
    triangulate.PassVertsOff()
    triangulate.PassLinesOff()
    triangulate.Update()
    return surface_triangles(triangulate.GetOutput())


def surface_points(polydata) -> np.ndarray:
    from vtkmodules.util.numpy_support import vtk_to_numpy

    if polydata.GetNumberOfPoints() == 0:
        return np.zeros((0, 3), dtype=np.float64)
    return vtk_to_numpy(polydata.GetPoints().GetData()).astype(np.float64)


def is_watertight(polydata: "vtkPolyData") -> bool:
    """True when the surface is closed: every edge is shared by exactly two triangles.

    Points are compared by id, so a surface read from STL must have its duplicate
    vertices merged first (:func:`read_stl` does). An empty surface is not watertight.
    """
    triangles = surface_triangles(polydata)
    if len(triangles) == 0:
        return False
    edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    edges.sort(axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return bool(np.all(counts == 2))

# ---------------------------------------------------------------------------------------
# STL files
# ---------------------------------------------------------------------------------------


def _stl_header(space: str) -> bytes:
    # Must not start with "solid", or readers take a binary file for ASCII.
    return f"SpineContextSeg SPACE={space} UNITS=mm".encode("ascii").ljust(80, b" ")


def write_stl(polydata: "vtkPolyData", path: str, *, space: str = "LPS", binary: bool = True) -> str:
    """Write a triangulated surface in LPS mm as an STL file, atomically.

    Parameters
    ----------
    polydata : vtkPolyData
        Surface in physical LPS millimetres (as from :func:`~SpineContextSegLib.io.meshing.labelmap_to_surface`).
        Non-triangle polygons and strips are triangulated; vertices and lines are dropped.
    path : str
        Target file, normally ``*.stl``.
    space : {"LPS", "RAS"}
        Coordinates in the file. ``"RAS"`` negates x and y (a rotation, so the
        triangle winding and outward normals are kept).
    binary : bool
        Binary STL (80-byte header ``SpineContextSeg SPACE=<space> UNITS=mm``, little
        endian float32) or ASCII STL (the same text after ``solid``).

    Returns
    -------
    str
        The absolute path written.
    """
    if space not in STL_SPACES:
        raise ValueError(f"space must be one of {STL_SPACES}, got {space!r}")
    triangles = surface_triangles(polydata)
    points = surface_points(polydata)
    if space == "RAS":
        points = points * np.array([-1.0, -1.0, 1.0])
    corners = points[triangles]  # (n, 3 vertices, 3 coordinates)
    facet_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    lengths = np.linalg.norm(facet_normals, axis=1, keepdims=True)
    facet_normals = np.divide(facet_normals, lengths, out=np.zeros_like(facet_normals), where=lengths > 0)

    path = os.path.abspath(path)
    with atomic_output(path) as temp_path:
        if binary:
            records = np.zeros(len(triangles), dtype=_STL_RECORD)
            records["normal"] = facet_normals
            records["vertices"] = corners
            with open(temp_path, "wb") as stream:
                stream.write(_stl_header(space))
                stream.write(struct.pack("<I", len(triangles)))
                stream.write(records.tobytes())
        else:
            with open(temp_path, "w", encoding="ascii", newline="\n") as stream:
                name = f"SpineContextSeg SPACE={space} UNITS=mm"
                stream.write(f"solid {name}\n")
                for normal, (a, b, c) in zip(facet_normals, corners):
                    stream.write(
                        f"facet normal {normal[0]:e} {normal[1]:e} {normal[2]:e}\n outer loop\n"
                        f"  vertex {a[0]:e} {a[1]:e} {a[2]:e}\n  vertex {b[0]:e} {b[1]:e} {b[2]:e}\n"
                        f"  vertex {c[0]:e} {c[1]:e} {c[2]:e}\n endloop\nendfacet\n"
                    )
                stream.write(f"endsolid {name}\n")
    return path


def read_stl_header(path: str) -> str:
    """The 80-byte header of a binary STL (or the first line of an ASCII one), stripped."""
    with open(path, "rb") as stream:
        head = stream.read(84)
    if _is_binary_stl(path, head):
        return head[:80].rstrip(b" \0").decode("ascii", errors="replace")
    return head.split(b"\n", 1)[0].strip().decode("ascii", errors="replace")


def _is_binary_stl(path: str, head: bytes) -> bool:
    if len(head) < 84:
        return False
    (count,) = struct.unpack("<I", head[80:84])
    return os.path.getsize(path) == 84 + count * _STL_RECORD.itemsize


def read_stl(path: str) -> "vtkPolyData":
    """Read a binary or ASCII STL into a vtkPolyData with duplicate vertices merged.

    Vertices with identical coordinates become one point, so :func:`is_watertight`
    can be applied to the result. Coordinates are returned as stored (the header says
    whether they are LPS or RAS).
    """
    with open(path, "rb") as stream:
        head = stream.read(84)
    if _is_binary_stl(path, head):
        records = np.fromfile(path, dtype=_STL_RECORD, offset=84)
        corners = records["vertices"].reshape(-1, 3)
    else:
        with open(path, "r", encoding="ascii", errors="replace") as stream:
            numbers = [line.split()[1:4] for line in stream if line.lstrip().startswith("vertex")]
        corners = np.asarray(numbers, dtype=np.float32).reshape(-1, 3)
    unique_points, point_ids = np.unique(corners, axis=0, return_inverse=True)
    return polydata_from_arrays(unique_points, point_ids.reshape(-1, 3))
