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

The checks themselves are in :mod:`SpineContextSegLib.io.validation`, DICOM series in
:mod:`SpineContextSegLib.io.dicom`; this module reads files, ties the steps together
(:func:`read_image`) and writes label maps (:func:`write_labelmap`).
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from typing import TYPE_CHECKING, List, Optional

import numpy as np

from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.io.dicom import read_dicom_series
from SpineContextSegLib.io.files import atomic_output, output_suffix
from SpineContextSegLib.io.validation import bytes_per_component, check_header, itk_warnings_off, undo_unsigned_offset, validate_ct

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

    from SpineContextSegLib.labels import LabelInfo
    from SpineContextSegLib.progress import ProgressReporter

READABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha")
#: A DICOM Segmentation object (needs a DICOM series input and highdicom): :mod:`.dicom_seg`.
DICOM_SEG_SUFFIX = ".dcm"

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
            image, modality = read_dicom_series(path, series_uid)
        else:
            image = _read_image_file(path, name)
    image = undo_unsigned_offset(image, name=name, modality=modality, reporter=reporter)
    validate_ct(image, name=name, reporter=reporter, modality=modality)
    return image


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
        bytes_per_component=bytes_per_component(reader.GetPixelID()),
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
