"""Voxel grids: whether two images share one, a grid read from a header alone, a label put onto a grid.

:func:`check_same_grid` raises :class:`GridMismatchError` unless two images have the same size,
spacing, origin and direction (within header round-off); :class:`Grid` holds an image's
geometry without its voxels; :func:`on_grid_of` puts a label map onto a reference grid (the
geometry copied when it differs by round-off only, else nearest-neighbour resampling).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from SpineContextSegLib.errors import SegmentationError

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk


class GridMismatchError(ValueError):
    """Two images that must share a voxel grid do not (raised by :func:`check_same_grid`)."""


def check_same_grid(image: "sitk.Image", reference: "sitk.Image", what: str = "prediction", reference_name: str = "ground truth") -> None:
    """Raise :class:`GridMismatchError` (a ValueError) unless ``image`` has the size, spacing, origin and direction of ``reference``.

    Tolerances absorb header round-off (NIfTI stores directions as quaternions):
    spacing 1e-4 relative, origin 1e-3 mm, direction cosines 1e-4.
    """
    problems = []
    if image.GetSize() != reference.GetSize():
        problems.append(f"size {image.GetSize()} vs {reference.GetSize()}")
    if not np.allclose(image.GetSpacing(), reference.GetSpacing(), rtol=1e-4, atol=0):
        problems.append(f"spacing {image.GetSpacing()} vs {reference.GetSpacing()}")
    if not np.allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-3):
        problems.append(f"origin {image.GetOrigin()} vs {reference.GetOrigin()}")
    if not np.allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-4):
        problems.append("direction cosines differ")
    if problems:
        raise GridMismatchError(f"{what} is not on the {reference_name}'s voxel grid: " + "; ".join(problems) + ". Resample it onto that grid first.")


class Grid:
    """Size, spacing, origin and direction of an image, read from the header only.

    Has the ``Get*`` methods that :func:`check_same_grid` reads,
    so it stands in for the CT without loading its voxels.
    """

    def __init__(self, size, spacing, origin, direction):
        self.size = tuple(int(s) for s in size)
        self.spacing = tuple(float(s) for s in spacing)
        self.origin = tuple(float(o) for o in origin)
        self.direction = tuple(float(d) for d in direction)

    @classmethod
    def of_image(cls, image: "sitk.Image") -> "Grid":
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    @classmethod
    def of_file(cls, path: str) -> "Grid":
        import SimpleITK as sitk

        if not os.path.exists(path):
            raise SegmentationError("input_not_found", f"Dataset file not found: {path}.")
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise SegmentationError("input_unreadable", f"Cannot read {path}: the file is corrupt or not an image.") from None
        if reader.GetDimension() != 3:
            raise SegmentationError("input_not_3d", f"{path} is {reader.GetDimension()}D; a 3D CT volume is needed.")
        return cls(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())

    def GetSize(self):  # noqa: N802 - SimpleITK's names
        return self.size

    def GetSpacing(self):  # noqa: N802
        return self.spacing

    def GetOrigin(self):  # noqa: N802
        return self.origin

    def GetDirection(self):  # noqa: N802
        return self.direction

    def image_of(self, array: np.ndarray) -> "sitk.Image":
        """uint8 image of ``array`` (numpy order (z, y, x) = ``size[::-1]``) on this grid."""
        import SimpleITK as sitk

        array = np.ascontiguousarray(array, dtype=np.uint8)
        if array.shape != self.size[::-1]:
            raise ValueError(f"array shape {array.shape} does not match grid size {self.size} (x, y, z)")
        image = sitk.GetImageFromArray(array)
        self.stamp(image)
        return image

    def stamp(self, image: "sitk.Image") -> None:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)


def on_grid_of(label: "sitk.Image", reference, *, what: str = "label") -> "sitk.Image":
    """``label`` on exactly ``reference``'s voxel grid, values unchanged.

    A header within :func:`check_same_grid`'s round-off tolerances
    of ``reference`` gets ``reference``'s geometry copied (no resampling); any other grid is
    resampled with nearest neighbour, 0 outside the label's extent.

    Parameters
    ----------
    label : SimpleITK.Image, 3D scalar
        Label map, any pixel type.
    reference : SimpleITK.Image or anything with ``GetSize/GetSpacing/GetOrigin/GetDirection``
        The CT (or its header).
    what : str
        Name used in messages.

    Returns
    -------
    SimpleITK.Image
        Pixel type of ``label``; size, spacing, origin and direction of ``reference``.
    """
    import SimpleITK as sitk

    grid = reference if isinstance(reference, Grid) else Grid.of_image(reference)
    try:
        check_same_grid(label, grid, what=what, reference_name="CT")
    except GridMismatchError:
        return sitk.Resample(
            label, grid.size, sitk.Transform(), sitk.sitkNearestNeighbor, grid.origin, grid.spacing, grid.direction, 0, label.GetPixelID()
        )
    if (label.GetSpacing(), label.GetOrigin(), label.GetDirection()) != (grid.spacing, grid.origin, grid.direction):
        label = sitk.Image(label)  # a copy: the caller's image keeps its header
        grid.stamp(label)
    return label
