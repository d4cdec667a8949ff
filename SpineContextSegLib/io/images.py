"""Reading CT volumes (NIfTI, NRRD, MHA, DICOM series) with checks, and writing label maps.

Every problem with an input becomes a :class:`SegmentationError` with a specific code;
SimpleITK's own messages (long ITK exception dumps, C++ warnings) never reach the user.

Checks happen in the cheapest order: the header first (dimension, components, size,
spacing, direction and the memory the run will need: nothing is allocated for a file whose
header claims a gigantic volume), then completeness (ITK pads a truncated NIfTI with zeros
without complaint), then the voxels (NaN/Inf, constant, CT-like intensities).

CT stored as unsigned integers without a rescale intercept (values 0..4095, air near 24)
is recognised from its histogram and shifted to Hounsfield units (HU = value - 1024) with
the warning ``input_unsigned_ct``; images that do not look like CT (e.g. MR) are segmented
with the warning ``input_not_ct``, never silently.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import struct
import zlib
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.io.files import atomic_output, output_suffix

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

    from SpineContextSegLib.labels import LabelInfo
    from SpineContextSegLib.progress import ProgressReporter

READABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha")
#: A DICOM Segmentation object (needs a DICOM series input and highdicom): :mod:`.dicom_seg`.
DICOM_SEG_SUFFIX = ".dcm"

#: Relative tolerance on slice-to-slice distance in a DICOM series before we call it uneven.
DICOM_SPACING_TOLERANCE = 0.01
#: In-plane shift per mm of slice step above which a DICOM series is sheared (gantry tilt > ~0.6 degrees).
DICOM_SHEAR_TOLERANCE = 0.01
#: Largest deviation of the direction matrix from orthonormal that we accept (rounded DICOM cosines).
DIRECTION_ORTHONORMAL_TOLERANCE = 1e-3

#: Unsigned CT without RescaleIntercept: HU = stored value - 1024 (the intercept scanners almost always use).
UNSIGNED_CT_OFFSET = 1024

#: Peak bytes a run needs per voxel of the input grid, beyond the stored voxels: the linear
#: resampling of the probability back onto it (float32) and the uint8 mask (two copies).
INPUT_GRID_BYTES_PER_VOXEL = 6
#: Peak bytes per voxel of the canonical grid: float32 HU, network input, stitcher accumulator
#: and weights, probability, component labels (int32) and the cleaned probability.
CANONICAL_GRID_BYTES_PER_VOXEL = 32

# What each extension should hold, for messages about misnamed files.
_FORMAT_OF_SUFFIX = {".nii": "NIfTI", ".nii.gz": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage", ".dcm": "DICOM"}
_SUFFIX_OF_FORMAT = {"NIfTI": ".nii.gz", "NRRD": ".nrrd", "MetaImage": ".mha", "DICOM": ".dcm"}


# ----------------------------------------------------------------------------- reading
def read_image(path: str, *, series_uid: Optional[str] = None, reporter: Optional["ProgressReporter"] = None) -> "sitk.Image":
    """Read a 3D scalar CT from a file or a DICOM series folder and validate it.

    Returns the image in Hounsfield units with its pixel type as stored, except for unsigned
    CT without a rescale intercept, which is shifted by -1024 (see the module docstring).
    Raises :class:`SegmentationError` (``input_*``/``dicom_*`` codes) for anything we cannot use.
    """
    if not os.path.exists(path):
        raise SegmentationError("input_not_found", f"Input not found: {path}. Check the path.")
    name = os.path.basename(os.path.normpath(path))
    modality: Optional[str] = None
    with itk_warnings_off():
        if os.path.isdir(path):
            image, modality = _read_dicom_series(path, series_uid)
        else:
            image = _read_image_file(path, name)
    image = _undo_unsigned_offset(image, name=name, modality=modality, reporter=reporter)
    validate_ct(image, name=name, reporter=reporter, modality=modality)
    return image


@contextlib.contextmanager
def itk_warnings_off() -> Iterator[None]:
    """Silence ITK's C++ warnings (printed straight to stderr) for the duration; errors still raise."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


#: SOP classes that are not images but that GDCM lists as series: segmentations (a DICOM SEG
#: written beside the CT), registrations, RT structure sets, structured reports, presentation states.
NON_IMAGE_SOP_CLASS_PREFIXES = ("1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.")


def dicom_series_ids(folder: str) -> List[str]:
    """SeriesInstanceUIDs of the DICOM image series directly in ``folder`` (empty when none).

    Series of non-image objects (:data:`NON_IMAGE_SOP_CLASS_PREFIXES`, e.g. a DICOM SEG this
    tool wrote into the CT's folder) are left out, so they never make a folder "several series".
    """
    import SimpleITK as sitk

    with itk_warnings_off():
        series_ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ())
        return [uid for uid in series_ids if not _is_non_image_series(folder, uid)]


def _is_non_image_series(folder: str, series_uid: str) -> bool:
    """Whether the first file of a series has a non-image SOP class (unreadable headers: no, the reader decides)."""
    import SimpleITK as sitk

    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid)
    if not files:
        return False
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    sop_class = reader.GetMetaData("0008|0016").strip().rstrip("\x00") if reader.HasMetaDataKey("0008|0016") else ""
    return sop_class.startswith(NON_IMAGE_SOP_CLASS_PREFIXES)


def _read_image_file(path: str, name: str) -> "sitk.Image":
    import SimpleITK as sitk

    if os.path.getsize(path) == 0:
        raise SegmentationError("input_unreadable", f"{name} is an empty file (0 bytes). Re-export the CT.")
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise _unreadable_error(path, name, error) from None
    if reader.GetDimension() == 3 and reader.GetSize()[2] == 1 and (_format_of(path) == "DICOM" or sniff_format(path) == "DICOM"):
        raise SegmentationError("input_not_3d", f"{name} is one DICOM slice; pass the folder that holds the whole series.")
    check_header(
        name,
        dimension=reader.GetDimension(),
        size=reader.GetSize(),
        spacing=reader.GetSpacing(),
        direction=reader.GetDirection(),
        components=reader.GetNumberOfComponents(),
        bytes_per_component=_bytes_per_component(reader.GetPixelID()),
    )
    if _format_of(path) == "NIfTI" and not nifti_file_is_complete(path):
        raise SegmentationError("input_unreadable", f"{name} is truncated (the file ends before its last voxel). Re-export or re-copy the CT.")
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise _unreadable_error(path, name, error) from None


def _unreadable_error(path: str, name: str, error: Exception) -> SegmentationError:
    """The most specific error for a file ITK could not read: misnamed, bad geometry, or corrupt."""
    text = str(error).lower()
    expected = _FORMAT_OF_SUFFIX.get(output_suffix(path).lower())
    actual = sniff_format(path)
    if actual is not None and actual != expected:
        return SegmentationError(
            "input_format",
            f"{name} holds a {actual} image but is named '{output_suffix(path) or 'without extension'}': "
            f"rename it to end in {_SUFFIX_OF_FORMAT[actual]}{' (and pass its folder)' if actual == 'DICOM' else ''}.",
        )
    if expected is None:
        return SegmentationError(
            "input_format",
            f"Cannot read {name}: '{output_suffix(path) or 'no extension'}' is not an image format we read. "
            f"Use NIfTI (.nii.gz), NRRD, MHA or a DICOM folder.",
        )
    if "size is zero" in text:
        return SegmentationError("input_empty", f"{name} has no voxels (its header gives a size of zero).")
    if "spacing" in text or "direction" in text:
        return SegmentationError("input_geometry", f"{name} has an invalid voxel spacing or direction in its header; fix the header.")
    return SegmentationError("input_unreadable", f"Cannot read {name}: the file is corrupt or truncated. Re-export the CT.")


def sniff_format(path: str) -> Optional[str]:
    """``"NIfTI"``, ``"NRRD"``, ``"MetaImage"``, ``"DICOM"`` from a file's first bytes (gzip looked into), else ``None``."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return None
    if head[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 1024)
        except zlib.error:
            return None
    if head[:4] == b"NRRD":
        return "NRRD"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00":
        return "NIfTI"
    if head[128:132] == b"DICM":
        return "DICOM"
    if b"ObjectType" in head[:256] or b"NDims" in head[:256]:
        return "MetaImage"
    return None


def _format_of(path: str) -> Optional[str]:
    return _FORMAT_OF_SUFFIX.get(output_suffix(path).lower())


def nifti_file_is_complete(path: str) -> bool:
    """False when a NIfTI file (``.nii`` or ``.nii.gz``) ends before its last voxel or its gzip stream is cut.

    ITK reads such files without error and fills the missing voxels with zeros, so this is
    checked separately: from the header's ``vox_offset``, dimensions and ``bitpix``; for gzip
    first from the stream's trailer (ISIZE, cheap), and only if that disagrees by decompressing.
    """
    compressed = path.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
            header = handle.read(544)
    except (OSError, EOFError, zlib.error):
        return False
    expected = _nifti_expected_bytes(header)
    if expected is None:
        return True  # not a header we understand: ITK decides
    if not compressed:
        return os.path.getsize(path) >= expected
    return _gzip_stream_is_complete(path, 0, expected)


def _gzip_stream_is_complete(path: str, offset: int, expected_bytes: int) -> bool:
    """Whether the gzip data from byte ``offset`` to the end decompresses to at least ``expected_bytes``.

    The trailer's ISIZE (size mod 2**32) answers in the common case without decompressing;
    a mismatch (several gzip members, or a stream cut short) is settled by decompressing.
    """
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() - offset < 18:  # shorter than an empty gzip member
            return False
        handle.seek(-4, os.SEEK_END)
        if struct.unpack("<I", handle.read(4))[0] == expected_bytes % (1 << 32):
            return True
        handle.seek(offset)
        total = 0
        try:
            with gzip.GzipFile(fileobj=handle, mode="rb") as stream:
                for block in iter(lambda: stream.read(1 << 24), b""):
                    total += len(block)
        except (OSError, EOFError, zlib.error):
            return False
    return total >= expected_bytes


def written_file_is_complete(path: str, payload_bytes: int) -> bool:
    """Whether an image file just written holds all ``payload_bytes`` of voxel data.

    ITK's NIfTI and compressed-NRRD writers report a short write (disk full, file-size
    limit) only on stderr, and the file they leave reads back as garbage or zeros; this
    checks the header's data offset and the file's length (or the gzip stream) instead.
    Formats we do not write are accepted.
    """
    kind = _format_of(path) or sniff_format(path)
    if kind == "NIfTI":
        return nifti_file_is_complete(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
        size = os.path.getsize(path)
    except OSError:
        return False
    if kind == "NRRD":
        end = head.find(b"\n\n")
        if end < 0:
            return False
        fields = dict(line.split(":", 1) for line in head[:end].decode("latin-1").splitlines()[1:] if ":" in line and not line.startswith("#"))
        fields = {key.strip().lower(): value.strip().lower() for key, value in fields.items()}
        if "data file" in fields or "datafile" in fields:
            return True  # detached data: not what we write
        encoding = fields.get("encoding", "raw")
        if encoding == "raw":
            return size - (end + 2) >= payload_bytes
        if encoding in ("gzip", "gz"):
            return _gzip_stream_is_complete(path, end + 2, payload_bytes)
        return True
    if kind == "MetaImage":
        marker = head.find(b"ElementDataFile = LOCAL")
        if marker < 0:
            return False
        offset = head.find(b"\n", marker) + 1
        header = head[:marker].decode("latin-1")
        compressed_size = None
        for line in header.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "CompressedDataSize" and value.strip().isdigit():
                compressed_size = int(value.strip())
        return size - offset >= (compressed_size if compressed_size is not None else payload_bytes)
    return True


def _nifti_expected_bytes(header: bytes) -> Optional[int]:
    """``vox_offset + voxels * bitpix / 8`` from a NIfTI-1 or NIfTI-2 header, or None."""
    if len(header) < 348:
        return None
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if sizeof_hdr == 540 and len(header) >= 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(0, int(d)) for d in dims[1 : dims[0] + 1]], dtype=object))
    return max(vox_offset, 0) + voxels * bitpix // 8


def _bytes_per_component(pixel_id: int) -> int:
    import SimpleITK as sitk

    name = sitk.GetPixelIDValueAsString(pixel_id)  # e.g. "16-bit signed integer", "vector of 32-bit float"
    for bits in (8, 16, 32, 64):
        if f"{bits}-bit" in name:
            return bits // 8 * (2 if "complex" in name else 1)
    return 8


def check_header(
    name: str,
    *,
    dimension: int,
    size: Sequence[int],
    spacing: Sequence[float],
    direction: Sequence[float],
    components: int = 1,
    bytes_per_component: int = 2,
) -> None:
    """Everything that can be refused from a header alone, before a voxel is read.

    Parameters
    ----------
    size, spacing, direction
        As ITK reports them: (x, y, z) voxels, (x, y, z) mm, row-major direction cosines.
    components, bytes_per_component
        Per voxel, as stored; they size the memory the input itself takes.
    """
    if components != 1:
        raise SegmentationError("input_not_scalar", f"{name} has {components} components per voxel (RGB/vector). Pass a greyscale CT.")
    if dimension != 3:
        hint = " (a time series or several volumes in one file)" if dimension > 3 else ""
        raise SegmentationError("input_not_3d", f"{name} is {dimension}D{hint}; a 3D CT volume is needed.")
    size = tuple(int(s) for s in size)
    if min(size) <= 0:
        raise SegmentationError("input_empty", f"{name} has no voxels (size {size}).")
    if min(size) < 2:
        raise SegmentationError("input_not_3d", f"{name} is a single slice (size {size}); a 3D CT with several slices is needed.")
    check_geometry(name, np.abs(np.asarray(spacing, dtype=float)), direction)  # ITK folds a negative spacing into the direction
    needed = int(np.prod(size, dtype=np.float64) * (components * bytes_per_component + INPUT_GRID_BYTES_PER_VOXEL))
    check_memory(needed, f"{name} ({size[0]} x {size[1]} x {size[2]} voxels)")


def check_geometry(name: str, spacing: Sequence[float], direction: Sequence[float]) -> None:
    """Spacing must be finite and positive; direction cosines finite and orthonormal (rotation or reflection)."""
    spacing = np.asarray(spacing, dtype=float)
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise SegmentationError("input_geometry", f"{name} has invalid voxel spacing {tuple(spacing.tolist())} mm; fix the header.")
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-6:
        raise SegmentationError("input_geometry", f"{name} has a singular or invalid direction matrix; fix the header.")
    if np.max(np.abs(matrix.T @ matrix - np.eye(3))) > DIRECTION_ORTHONORMAL_TOLERANCE:
        raise SegmentationError(
            "input_geometry",
            f"{name} has sheared (non-orthogonal) axes, e.g. from a CT gantry tilt; resample it onto an orthogonal grid first.",
        )


# ----------------------------------------------------------------------------- memory
def available_memory_bytes() -> Optional[int]:
    """Memory this process can still use: MemAvailable + SwapFree, capped by a cgroup limit; None if unknown.

    Linux reads ``/proc/meminfo`` and the cgroup (v2 or v1) files; other systems use
    ``os.sysconf`` where it exists (free physical pages), else None (no check).
    """
    available: Optional[int] = None
    fields = {}
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:  # "MemAvailable:   22645592 kB"
                key, _, value = line.partition(":")
                fields[key] = int(value.split()[0]) * 1024
    if "MemAvailable" in fields:
        available = fields["MemAvailable"] + fields.get("SwapFree", 0)
    if available is None:
        try:
            available = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            return None
    cgroup_free = _cgroup_free_bytes()
    if cgroup_free is not None:
        available = min(available, cgroup_free)
    return available


def _cgroup_free_bytes() -> Optional[int]:
    """limit - (usage - inactive file cache) of this process's memory cgroup, or None without a limit."""
    for limit_file, usage_file, stat_file, cache_key in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes", "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
    ):
        try:
            with open(limit_file, encoding="ascii") as handle:
                limit_text = handle.read().strip()
            with open(usage_file, encoding="ascii") as handle:
                usage = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        if not limit_text.isdigit() or int(limit_text) >= 1 << 60:
            return None  # "max", or v1's "unlimited" sentinel
        reclaimable = 0
        with contextlib.suppress(OSError, ValueError):
            with open(stat_file, encoding="ascii") as handle:
                for line in handle:
                    key, _, value = line.partition(" ")
                    if key == cache_key:
                        reclaimable = int(value)
        return max(0, int(limit_text) - max(0, usage - reclaimable))
    return None


def check_memory(needed_bytes: int, what: str) -> None:
    """Raise ``input_too_large`` when ``needed_bytes`` exceeds :func:`available_memory_bytes` (never guess high)."""
    available = available_memory_bytes()
    if available is not None and needed_bytes > available:
        raise SegmentationError(
            "input_too_large",
            f"{what} needs about {_gigabytes(needed_bytes)} of memory but only {_gigabytes(available)} is free. "
            f"Crop the CT to the spine region, or use a machine with more memory.",
            details={"needed_bytes": int(needed_bytes), "available_bytes": int(available)},
        )


def estimate_segmentation_memory_bytes(image: "sitk.Image", canonical_spacing_mm: Sequence[float], output_channels: int = 1) -> int:
    """Peak bytes of one run on ``image``: the input grid plus the canonical grid at ``canonical_spacing_mm`` (x, y, z mm).

    The canonical grid's size follows :func:`~SpineContextSegLib.inference.preprocessing.canonical_reference`
    (it covers the input's physical extent), computed here without allocating it. A network with
    ``output_channels`` > 1 (vertebrae) adds one float32 stitching accumulator per extra channel.
    """
    from SpineContextSegLib.inference.preprocessing import physical_corners

    corners = physical_corners(image)
    extent = corners.max(axis=0) - corners.min(axis=0)
    canonical_voxels = float(np.prod(np.maximum(1, np.ceil(np.round(extent / np.asarray(canonical_spacing_mm, dtype=float), 6)))))
    input_voxels = float(np.prod(image.GetSize()))
    stored = image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    canonical_bytes = CANONICAL_GRID_BYTES_PER_VOXEL + 4 * (max(1, int(output_channels)) - 1)
    return int(input_voxels * (stored + INPUT_GRID_BYTES_PER_VOXEL) + canonical_voxels * canonical_bytes)


def check_segmentation_memory(image: "sitk.Image", canonical_spacing_mm: Sequence[float], *, name: str = "The CT", output_channels: int = 1) -> None:
    """Refuse (``input_too_large``) before resampling when a run on ``image`` would not fit in free memory."""
    needed = estimate_segmentation_memory_bytes(image, canonical_spacing_mm, output_channels)
    check_memory(needed, f"{name} at {tuple(float(s) for s in canonical_spacing_mm)} mm")


def _gigabytes(count: float) -> str:
    for unit, power in (("PB", 50), ("TB", 40)):
        if count >= 2 ** power:
            return f"{count / 2 ** power:.3g} {unit}"
    return f"{count / 2 ** 30:.1f} GB"


# ----------------------------------------------------------------------------- DICOM
def _read_dicom_series(folder: str, series_uid: Optional[str]) -> Tuple["sitk.Image", Optional[str]]:
    """The series' image and its modality (``0008|0060``, e.g. ``"CT"``; None when absent)."""
    import SimpleITK as sitk

    files = dicom_series_files(folder, series_uid)
    first, slice_step_mm = _check_dicom_slice_positions(files)
    check_header(
        f"The DICOM series in {os.path.basename(os.path.normpath(folder))}",
        dimension=3,
        size=(first.GetSize()[0], first.GetSize()[1], len(files)),
        spacing=(first.GetSpacing()[0], first.GetSpacing()[1], slice_step_mm),
        direction=first.GetDirection(),
        components=first.GetNumberOfComponents(),
        bytes_per_component=_bytes_per_component(first.GetPixelID()),
    )
    modality = first.GetMetaData("0008|0060").strip().upper() if first.HasMetaDataKey("0008|0060") else None
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute(), modality or None
    except RuntimeError:
        raise SegmentationError("input_unreadable", f"Cannot read the DICOM series in {folder}: a file is corrupt.") from None


def dicom_series_files(folder: str, series_uid: Optional[str] = None) -> List[str]:
    """The files of the one DICOM series in ``folder`` (or of ``series_uid``), in ITK's slice order.

    Raises ``dicom_no_series`` when the folder holds none, ``dicom_multiple_series`` when it
    holds several and ``series_uid`` does not choose one of them.
    """
    import SimpleITK as sitk

    series_ids = dicom_series_ids(folder)
    if not series_ids:
        raise SegmentationError("dicom_no_series", f"No DICOM image series in folder {folder}. Point to the folder holding the CT's .dcm files.")
    if series_uid is None:
        if len(series_ids) > 1:
            raise SegmentationError(
                "dicom_multiple_series",
                f"Folder {folder} holds {len(series_ids)} DICOM series ({', '.join(series_ids)}). Choose one with --series UID.",
                details={"series": series_ids},
            )
        series_uid = series_ids[0]
    elif series_uid not in series_ids:
        raise SegmentationError("dicom_multiple_series", f"Series {series_uid} is not in {folder}; found: {', '.join(series_ids)}.")
    with itk_warnings_off():
        return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid))


def _check_dicom_slice_positions(files: Sequence[str]) -> Tuple["sitk.ImageFileReader", float]:
    """Refuse duplicated, missing, unevenly spaced or sheared slices (ITK would silently stretch or skew the volume).

    Returns the reader of the first file (its header: size, direction, pixel type, tags)
    and the slice step in mm.
    """
    import SimpleITK as sitk

    if len(files) < 2:
        raise SegmentationError("input_not_3d", "The DICOM series has a single slice; a 3D CT needs many. Pass the folder of the whole series.")
    origins, normal, first = [], None, None
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise SegmentationError("input_unreadable", f"DICOM file {os.path.basename(name)} is corrupt or truncated.") from None
        if normal is None:
            first = reader
            normal = np.array(reader.GetDirection()).reshape(3, 3)[:, 2]
        origins.append(reader.GetOrigin())
    origins_mm = np.array(origins, dtype=float)
    positions = origins_mm @ normal
    order = np.argsort(positions)
    steps = np.diff(positions[order])
    if np.any(steps < 1e-3):
        raise SegmentationError("dicom_inconsistent", "The DICOM series has duplicated slices (two slices at the same position). Re-export the series.")
    median = float(np.median(steps))
    if np.any(np.abs(steps - median) > DICOM_SPACING_TOLERANCE * median + 1e-3):
        raise SegmentationError(
            "dicom_inconsistent",
            f"The DICOM slices are unevenly spaced (from {steps.min():.2f} to {steps.max():.2f} mm): slices are missing "
            f"or the series mixes acquisitions. Re-export the complete series.",
        )
    in_plane = origins_mm[order] - np.outer(positions[order], normal)
    shear = np.linalg.norm(np.diff(in_plane, axis=0), axis=1) / steps
    if np.max(shear) > DICOM_SHEAR_TOLERANCE:
        raise SegmentationError(
            "input_geometry",
            f"The DICOM slices are sheared (gantry tilt of about {np.degrees(np.arctan(np.max(shear))):.1f} degrees). "
            f"Re-export the series with tilt correction (scanner console or dcm2niix) first.",
        )
    assert first is not None
    return first, median


# ----------------------------------------------------------------------------- values
def _undo_unsigned_offset(
    image: "sitk.Image", *, name: str, modality: Optional[str] = None, reporter: Optional["ProgressReporter"] = None
) -> "sitk.Image":
    """Shift unsigned CT stored without a rescale intercept to HU (value - 1024), with a warning; else return ``image``.

    Recognised when the pixel type is uint16/uint32, the DICOM modality (if any) is CT, and the
    histogram has both air (stored 0..224, i.e. <= -800 HU) and soft tissue (stored 824..1324,
    -200..+300 HU), each in at least 2 % of the voxels. Unsigned images without that pattern
    are left alone (and get ``input_not_ct`` from :func:`validate_ct`).
    """
    import SimpleITK as sitk

    if image.GetPixelID() not in (sitk.sitkUInt16, sitk.sitkUInt32) or modality not in (None, "CT"):
        return image
    values = sitk.GetArrayViewFromImage(image)
    sample = values.reshape(-1)[:: max(1, values.size // 2_000_000)]
    air = np.count_nonzero(sample <= UNSIGNED_CT_OFFSET - 800)
    soft_tissue = np.count_nonzero((sample >= UNSIGNED_CT_OFFSET - 200) & (sample <= UNSIGNED_CT_OFFSET + 300))
    if air < 0.02 * sample.size or soft_tissue < 0.02 * sample.size:
        return image
    high = int(values.max())
    shifted = sitk.Cast(image, sitk.sitkInt16 if high - UNSIGNED_CT_OFFSET <= np.iinfo(np.int16).max else sitk.sitkInt32) - UNSIGNED_CT_OFFSET
    if reporter is not None:
        reporter.warning(
            "input_unsigned_ct",
            f"{name}: unsigned values {int(values.min())}..{high} with no rescale intercept look like CT stored with an offset of "
            f"{UNSIGNED_CT_OFFSET}; using HU = value - {UNSIGNED_CT_OFFSET}. If this is not a CT the result is meaningless; "
            f"re-export the CT in Hounsfield units to silence this warning.",
        )
    return shifted


def validate_ct(
    image: "sitk.Image", *, name: str = "input", reporter: Optional["ProgressReporter"] = None, modality: Optional[str] = None
) -> None:
    """Check dimension, components, geometry and values; warn when the image does not look like CT.

    ``modality`` is the DICOM modality tag when known; anything but ``"CT"`` gets the warning.
    """
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SegmentationError(
            "input_not_scalar", f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB/vector). Pass a greyscale CT."
        )
    if image.GetDimension() != 3:
        raise SegmentationError("input_not_3d", f"{name} is {image.GetDimension()}D; a 3D CT volume is needed.")
    size = image.GetSize()
    if min(size) == 0:
        raise SegmentationError("input_empty", f"{name} has no voxels (size {size}).")
    if min(size) < 2:
        raise SegmentationError("input_not_3d", f"{name} is a single slice (size {size}); a 3D CT with several slices is needed.")
    check_geometry(name, image.GetSpacing(), image.GetDirection())
    # numpy's min/max: 20x faster than StatisticsImageFilter on a full CT; a NaN anywhere makes both NaN
    values = sitk.GetArrayViewFromImage(image)
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise SegmentationError("input_nonfinite", f"{name} contains NaN or infinite values; the file is damaged. Re-export the CT.")
    if low == high:
        raise SegmentationError("input_empty", f"{name} is constant (every voxel is {low:g}); it holds no CT data.")
    if reporter is None:
        return
    if modality not in (None, "CT"):
        reporter.warning("input_not_ct", f"{name}: the DICOM modality is {modality}, not CT. Results on non-CT images are not meaningful.")
    elif low > -200 or high < 100:
        reporter.warning(
            "input_not_ct",
            f"{name}: intensities {low:g}..{high:g} do not look like CT Hounsfield units (air is about -1000). "
            f"Results on non-CT images are not meaningful.",
        )


# ----------------------------------------------------------------------------- writing
def check_labelmap_path(path: str, *, source: Optional[str] = None, series_uid: Optional[str] = None) -> None:
    """Raise now, before any computing, when ``path`` is not a label-map format we can write.

    ``.dcm`` (a DICOM Segmentation, :mod:`SpineContextSegLib.io.dicom_seg`) needs ``source``, the
    CT's DICOM series folder (``series_uid`` when it holds several), and highdicom: a
    non-DICOM source raises ``dicom_seg_needs_dicom_input``, a missing highdicom
    ``dicom_support_missing``. Anything else but :data:`LABELMAP_SUFFIXES` raises ``output_format``.
    """
    suffix = output_suffix(path).lower()
    if suffix == DICOM_SEG_SUFFIX:
        from SpineContextSegLib.io.dicom_seg import check_dicom_seg_output

        check_dicom_seg_output(path, source, series_uid)
        return
    if suffix not in LABELMAP_SUFFIXES:
        raise SegmentationError(
            "output_format",
            f"Cannot write '{suffix or path}': use one of {', '.join(LABELMAP_SUFFIXES)} (or {DICOM_SEG_SUFFIX}, a DICOM SEG, for a DICOM series input).",
        )


def write_labelmap(
    mask: "sitk.Image",
    path: str,
    labels: Optional[List["LabelInfo"]] = None,
    *,
    source: Optional[str] = None,
    series_uid: Optional[str] = None,
    model: Optional[str] = None,
) -> str:
    """Write a uint8 label map atomically as NIfTI, NRRD, MHA, Slicer ``.seg.nrrd`` or DICOM SEG (``.dcm``).

    ``.seg.nrrd`` carries segment names, colours and terminology (read by Slicer and ``slicerio``).
    ``.dcm`` writes a DICOM Segmentation that references the CT's DICOM series ``source``
    (the folder the mask was computed from; ``series_uid`` when it holds several; ``model``,
    the model's name and version, is recorded in it), see :func:`SpineContextSegLib.io.dicom_seg.write_dicom_seg`.
    A write that fails part-way (disk full, file-size limit) raises ``disk_full`` and leaves
    nothing behind; the file is checked after writing (:func:`written_file_is_complete`)
    because ITK's NIfTI and compressed-NRRD writers report a short write only on stderr.
    """
    import SimpleITK as sitk

    check_labelmap_path(path, source=source, series_uid=series_uid)
    if output_suffix(path).lower() == DICOM_SEG_SUFFIX:
        from SpineContextSegLib.io.dicom_seg import write_dicom_seg

        return write_dicom_seg(mask, path, labels or [], source, series_uid=series_uid, model=model)
    suffix = output_suffix(path).lower()
    image = sitk.Cast(mask, sitk.sitkUInt8)
    if suffix == ".seg.nrrd":
        image = _with_segmentation_metadata(image, labels or [])
    with atomic_output(path) as temp_path:
        try:
            sitk.WriteImage(image, temp_path, useCompression=True)
        except RuntimeError as error:
            raise _write_error(path, error) from None
        if not written_file_is_complete(temp_path, int(np.prod(image.GetSize()))):
            raise SegmentationError("disk_full", f"Writing {path} stopped part-way (disk full or a file-size limit). Free space and run again; no partial file was kept.")
    return os.path.abspath(path)


def _write_error(path: str, error: RuntimeError) -> SegmentationError:
    text = str(error).lower()
    if "no space" in text or "disk" in text or "too large" in text or "quota" in text:
        return SegmentationError("disk_full", f"Disk full (or a file-size limit) while writing {path}. Free space and run again; no partial file was kept.")
    return SegmentationError("output_not_writable", f"Could not write {path}. Check the folder is writable and has free space.")


def _with_segmentation_metadata(image: "sitk.Image", labels: List["LabelInfo"]) -> "sitk.Image":
    """Add the key/value fields of Slicer's .seg.nrrd format (one shared layer, one segment per label)."""
    import SimpleITK as sitk

    image = sitk.Image(image)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    size = image.GetSize()
    array = sitk.GetArrayViewFromImage(image)
    present = set(np.unique(array).tolist())
    for index, label in enumerate(info for info in labels if info.value in present):
        prefix = f"Segment{index}_"
        r, g, b = label.color_rgb
        image.SetMetaData(prefix + "ID", f"Segment_{label.value}")
        image.SetMetaData(prefix + "Name", label.name)
        image.SetMetaData(prefix + "NameAutoGenerated", "0")
        image.SetMetaData(prefix + "Color", f"{r:.6f} {g:.6f} {b:.6f}")
        image.SetMetaData(prefix + "ColorAutoGenerated", "0")
        image.SetMetaData(prefix + "LabelValue", str(label.value))
        image.SetMetaData(prefix + "Layer", "0")
        image.SetMetaData(prefix + "Extent", f"0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}")
        image.SetMetaData(prefix + "Tags", f"TerminologyEntry:{label.terminology_entry()}|")
    return image
