"""Quality-control picture: sagittal and coronal CT views with the mask outline.

One PNG a clinician can glance at to see whether the segmentation sits on the spine:

* left panel: **sagittal** plane through the mask's centroid, patient's anterior on the
  left, superior up;
* right panel: **coronal** plane through the mask's centroid, patient's right on the
  left (radiological convention), superior up;
* CT in a bone/soft-tissue window (level 400 HU, width 1800 HU), square pixels in mm
  whatever the voxel spacing, and the mask's outline in colour (one colour per label,
  so neighbouring vertebrae are told apart).

Both planes are resampled straight from the volumes onto axis-aligned LPS grids, so
oblique, flipped or PIR-ordered inputs give the same picture, and only the pixels of
the two planes are interpolated (a 512x512x400 CT takes well under a second).

An **empty mask** is not an error here: the views then pass through the CT's centre,
with no outline, and the PNG's ``Description`` text says so. The PNG is written with
numpy, zlib and struct only (no matplotlib, no Pillow), atomically.
"""
from __future__ import annotations

import os
import struct
import zlib
from typing import TYPE_CHECKING, Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.io.files import atomic_output
from SpineContextSegLib.io.meshing import foreground_bounding_box

if TYPE_CHECKING:  # pragma: no cover - typing only
    import SimpleITK as sitk

#: Default CT window (HU): shows bone and soft tissue together.
WINDOW_LEVEL_HU = 400.0
WINDOW_WIDTH_HU = 1800.0

#: Longest side of one view, in pixels: the pixel size is the CT's finest spacing, made
#: finer for small crops (so they are not stamp-sized) and coarser for huge volumes.
MIN_VIEW_PIXELS = 512
MAX_VIEW_PIXELS = 1024

#: Outline colours, label ``v`` gets ``OUTLINE_COLOURS[(v - 1) % len]``; all saturated, none grey.
OUTLINE_COLOURS = np.array(
    [
        (255, 215, 0),  # gold
        (0, 200, 255),  # sky blue
        (255, 60, 60),  # red
        (60, 230, 60),  # green
        (255, 0, 255),  # magenta
        (255, 140, 0),  # orange
        (140, 120, 255),  # violet
        (0, 255, 190),  # aquamarine
    ],
    dtype=np.uint8,
)

_AIR_HU = -1024.0
_GAP_PIXELS = 6
_GAP_GREY = 48


class QCView(NamedTuple):
    """One rendered plane and where its pixels are, in physical LPS mm.

    Column ``c`` is at LPS coordinate ``first_column_mm + c * pixel_mm`` along axis
    ``column_axis`` (0 = L for the coronal view, 1 = P for the sagittal view), so the
    coordinate grows to the right. Row ``r`` is at S = ``top_row_mm - r * pixel_mm``
    (superior up). The plane lies at ``plane_mm`` along the remaining axis.
    """

    name: str  # "sagittal" or "coronal"
    rgb: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) int64, the mask resampled onto the same pixels (0 = background)
    column_axis: int
    first_column_mm: float
    top_row_mm: float
    pixel_mm: float
    plane_mm: float
    centred_on_mask: bool  # False when the mask is empty and the plane passes through the CT's centre


def _check_volume(image: "sitk.Image", what: str) -> None:
    if image.GetDimension() != 3:
        raise SegmentationError("input_not_3d", f"The {what} is {image.GetDimension()}D; the QC picture needs a 3D volume.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SegmentationError("input_not_scalar", f"The {what} has several components per voxel; the QC picture needs a scalar volume.")


def physical_bounds_mm(image: "sitk.Image") -> Tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS box around the whole volume (outer voxel faces): (min xyz, max xyz) in mm."""
    size = np.asarray(image.GetSize(), dtype=np.float64)
    corners_index = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64) * size - 0.5
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    step = direction * np.asarray(image.GetSpacing(), dtype=np.float64)[np.newaxis, :]
    corners = corners_index @ step.T + np.asarray(image.GetOrigin(), dtype=np.float64)
    return corners.min(axis=0), corners.max(axis=0)


def mask_centroid_mm(mask_image: "sitk.Image") -> Optional[np.ndarray]:
    """Physical LPS centroid (mm) of the mask's non-zero voxels; ``None`` when there are none."""
    import SimpleITK as sitk

    mask = sitk.GetArrayViewFromImage(mask_image)  # (z, y, x)
    box = foreground_bounding_box(mask)
    if box is None:
        return None
    indices_zyx = np.nonzero(mask[box])
    centroid_zyx = [float(np.mean(ix)) + s.start for ix, s in zip(indices_zyx, box)]
    return np.asarray(mask_image.TransformContinuousIndexToPhysicalPoint(centroid_zyx[::-1]))


def _resample_plane(image, size_xyz, origin_xyz, pixel_mm, interpolator, default_value, pixel_type) -> np.ndarray:
    import SimpleITK as sitk

    plane = sitk.Resample(
        image,
        [int(n) for n in size_xyz],
        sitk.Transform(),
        interpolator,
        [float(v) for v in origin_xyz],
        [float(pixel_mm)] * 3,
        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],  # axis-aligned LPS
        float(default_value),
        pixel_type,
    )
    return sitk.GetArrayFromImage(plane)  # (z, y, x), one of y or x has length 1


def window_to_grey(hu: np.ndarray, level: float = WINDOW_LEVEL_HU, width: float = WINDOW_WIDTH_HU) -> np.ndarray:
    """Map HU to 0..255 (uint8) with a linear window ``[level - width/2, level + width/2]``."""
    low = level - width / 2.0
    return np.clip((hu - low) * (255.0 / width), 0, 255).round().astype(np.uint8)


def outline(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: labelled pixels with a 4-neighbour of another value (or the image edge)."""
    padded = np.pad(labels, 1, mode="constant", constant_values=0)
    centre = padded[1:-1, 1:-1]
    differs = (
        (padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre) | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre)
    )
    return (centre != 0) & differs


def render_qc_views(
    ct_image: "sitk.Image",
    mask_image: "sitk.Image",
    *,
    window_level: float = WINDOW_LEVEL_HU,
    window_width: float = WINDOW_WIDTH_HU,
    min_view_pixels: int = MIN_VIEW_PIXELS,
    max_view_pixels: int = MAX_VIEW_PIXELS,
) -> Tuple[QCView, QCView]:
    """Sagittal and coronal views of the CT through the mask's centroid, outlined.

    Parameters
    ----------
    ct_image : SimpleITK.Image
        3D CT in HU, any spacing, origin and direction.
    mask_image : SimpleITK.Image
        3D label map (0 = background), any geometry overlapping the CT (usually the CT's).
    window_level, window_width : float
        CT display window in HU.
    min_view_pixels, max_view_pixels : int
        Bounds on the longest side of the views. The pixel size is the CT's finest
        spacing, made finer or coarser to keep the longest side within these bounds.

    Returns
    -------
    (QCView, QCView)
        Sagittal (anterior left) and coronal (patient's right left) views, both superior
        up, same height and pixel size. Through the CT's centre when the mask is empty.
    """
    import SimpleITK as sitk

    _check_volume(ct_image, "CT")
    _check_volume(mask_image, "mask")
    low, high = physical_bounds_mm(ct_image)
    extent = high - low
    pixel_mm = min(min(ct_image.GetSpacing()), float(extent.max()) / min_view_pixels)
    pixel_mm = max(pixel_mm, float(extent.max()) / max_view_pixels)
    counts = np.maximum(1, np.ceil(extent / pixel_mm - 1e-6)).astype(int)  # pixels along L, P, S
    first = low + pixel_mm / 2.0  # centre of the first pixel along each axis
    centre = mask_centroid_mm(mask_image)
    centred_on_mask = centre is not None
    if centre is None:
        centre = (low + high) / 2.0
    mask_pixel_type = mask_image.GetPixelID()

    views = []
    for name, normal_axis, column_axis in (("sagittal", 0, 1), ("coronal", 1, 0)):
        size = counts.copy()
        size[normal_axis] = 1
        origin = first.copy()
        origin[normal_axis] = centre[normal_axis]
        hu = _resample_plane(ct_image, size, origin, pixel_mm, sitk.sitkLinear, _AIR_HU, sitk.sitkFloat32)
        labels = _resample_plane(mask_image, size, origin, pixel_mm, sitk.sitkNearestNeighbor, 0, mask_pixel_type)
        # (S, P, 1) or (S, 1, L) -> (rows, columns), then flip rows so superior is up.
        hu = hu[:, :, 0] if normal_axis == 0 else hu[:, 0, :]
        labels = labels[:, :, 0] if normal_axis == 0 else labels[:, 0, :]
        hu, labels = hu[::-1], labels[::-1]
        if not np.issubdtype(labels.dtype, np.integer):
            labels = np.rint(labels)
        labels = labels.astype(np.int64)

        grey = window_to_grey(hu, window_level, window_width)
        rgb = np.repeat(grey[:, :, np.newaxis], 3, axis=2)
        edge = outline(labels)
        rgb[edge] = OUTLINE_COLOURS[(labels[edge] - 1) % len(OUTLINE_COLOURS)]
        views.append(
            QCView(
                name=name,
                rgb=rgb,
                labels=labels,
                column_axis=column_axis,
                first_column_mm=float(first[column_axis]),
                top_row_mm=float(first[2] + (counts[2] - 1) * pixel_mm),
                pixel_mm=float(pixel_mm),
                plane_mm=float(centre[normal_axis]),
                centred_on_mask=centred_on_mask,
            )
        )
    return views[0], views[1]


def compose_views(views: Sequence[QCView], gap_pixels: int = _GAP_PIXELS) -> np.ndarray:
    """Views side by side, left to right, separated by a dark-grey gap: (H, W, 3) uint8."""
    height = max(view.rgb.shape[0] for view in views)
    parts = []
    for index, view in enumerate(views):
        if index:
            parts.append(np.full((height, gap_pixels, 3), _GAP_GREY, dtype=np.uint8))
        panel = np.zeros((height, view.rgb.shape[1], 3), dtype=np.uint8)
        panel[: view.rgb.shape[0]] = view.rgb
        parts.append(panel)
    return np.concatenate(parts, axis=1)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(rgb: np.ndarray, path: str, *, text: Optional[Dict[str, str]] = None) -> str:
    """Write an 8-bit RGB PNG with numpy, zlib and struct only, atomically.

    Parameters
    ----------
    rgb : np.ndarray, shape (H, W, 3), uint8
        Row 0 is the top of the picture.
    path : str
        Target file, normally ``*.png``.
    text : dict of str to str, optional
        ``tEXt`` chunks (keyword -> value, e.g. ``"Title"``), Latin-1; characters
        outside Latin-1 become ``?``.

    Returns
    -------
    str
        The absolute path written.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"expected a non-empty (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    # Every scanline starts with filter type 0 (none); zlib does the compressing.
    scanlines = np.empty((height, 1 + 3 * width), dtype=np.uint8)
    scanlines[:, 0] = 0
    scanlines[:, 1:] = rgb.reshape(height, 3 * width)
    chunks = [_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    for keyword, value in (text or {}).items():
        keyword_bytes = keyword.encode("latin-1", errors="replace")[:79]
        chunks.append(_png_chunk(b"tEXt", keyword_bytes + b"\0" + value.encode("latin-1", errors="replace")))
    chunks.append(_png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)))
    chunks.append(_png_chunk(b"IEND", b""))

    path = os.path.abspath(path)
    with atomic_output(path) as temp_path:
        with open(temp_path, "wb") as stream:
            stream.write(b"\x89PNG\r\n\x1a\n")
            for chunk in chunks:
                stream.write(chunk)
    return path


def write_qc_png(ct_image: "sitk.Image", mask_image: "sitk.Image", path: str, *, title: str = "") -> str:
    """Write the QC picture: sagittal (left) and coronal (right) CT views with the mask outline.

    Parameters
    ----------
    ct_image : SimpleITK.Image
        3D CT in HU, any orientation.
    mask_image : SimpleITK.Image
        3D label map (0 = background); may be empty.
    path : str
        Target ``.png`` file; written atomically.
    title : str
        Stored in the PNG's ``Title`` text chunk (no text is drawn into the pixels, so
        no font or plotting library is needed).

    Returns
    -------
    str
        The absolute path written.

    Notes
    -----
    Layout: ``[sagittal | 6-pixel grey gap | coronal]``, both views of the same height
    and pixel size (see :func:`render_qc_views`); the PNG's ``Description`` text states
    the planes, the conventions, the window and the pixel size.
    """
    sagittal, coronal = render_qc_views(ct_image, mask_image)
    description = (
        f"Left: sagittal plane at x={sagittal.plane_mm:.1f} mm LPS, patient anterior on the left. "
        f"Right: coronal plane at y={coronal.plane_mm:.1f} mm LPS, patient right on the left. "
        f"Superior up. CT window level {WINDOW_LEVEL_HU:g} HU, width {WINDOW_WIDTH_HU:g} HU. "
        f"Pixel {sagittal.pixel_mm:.2f} mm. "
        + ("Mask outline in colour, one colour per label." if sagittal.centred_on_mask else "The mask is empty: planes through the CT centre, no outline.")
    )
    from SpineContextSegLib import __version__

    text = {"Software": f"SpineContextSeg {__version__}", "Description": description}
    if title:
        text["Title"] = title
    return write_png(compose_views([sagittal, coronal]), path, text=text)
