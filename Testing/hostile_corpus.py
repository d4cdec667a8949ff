"""A corpus of bad and odd inputs, generated on the fly, each with its expected outcome.

:func:`build_corpus` writes every case's files under a folder (tiny volumes, no big files
are ever committed) and returns :class:`Case` objects: the worker arguments, the expected
outcome (an error ``code`` from :data:`SpineContextSegLib.errors.ERROR_CODES`, or ``None``
for a correct result) and what must not change. :func:`run_cases` runs them through the
worker (``python -m SpineContextSegLib.worker``), most of them grouped in one subprocess
that calls the worker's ``main`` once per case with its own stdout/stderr files (captured at
the file-descriptor level, so C++ output is caught too), its own ``TMPDIR`` and a hard time
limit; cases that are about the process itself (a blocked import, a file-size limit, a
gigantic header, the locale) get a process of their own. :func:`evaluate` checks the
invariants every case must keep:

* the outcome is the expected one: the error's code, exit status and one-line message, or
  exit 0 with a mask on exactly the input's grid;
* no Python traceback reaches the user, and stdout holds only JSON protocol lines;
* the input's bytes are unchanged and no file appeared next to it;
* no output, partial output (``.scs-tmp-*``) or temporary file is left after a failure;
* no child process is left, and the run ends within its time limit.

Run as a script (``python hostile_corpus.py run SPEC.json RESULTS.json``) it is the
grouped runner itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRACEBACK_MARK = "Traceback (most recent call last)"
#: Seconds any single case may take before it counts as hung.
CASE_TIMEOUT_S = 90
#: Python code that makes ``import onnxruntime`` fail the way it does when the package is absent.
BLOCK_ONNXRUNTIME = "import sys; sys.modules['onnxruntime'] = None"
BLOCK_OPENVINO = "import sys; sys.modules['openvino'] = None"
#: Files other libraries keep in TMPDIR under a fixed name (one per TMPDIR, rewritten, never accumulating):
#: ``import onnxruntime`` writes its telemetry session id to ``$TMPDIR/.ses``.
THIRD_PARTY_TEMP_FILES = frozenset({".ses"})


@dataclasses.dataclass
class Case:
    """One hostile input and what must come of it.

    ``argv`` are the worker's arguments (``segment --progress json`` is implied; with
    ``human=True`` the ``spinecontextseg segment`` command line with the default progress).
    ``expect_code`` is an error code, or ``None`` for a correct result written to ``output``
    on the grid of ``reference`` (an image file, or a DICOM folder).
    """

    name: str
    description: str
    argv: List[str]
    expect_code: Optional[str]
    inputs: List[str]
    watch_dirs: List[str]
    output: Optional[str] = None
    reference: Optional[str] = None
    expect_warnings: Tuple[str, ...] = ()
    forbid_warnings: Tuple[str, ...] = ()
    human: bool = False
    own_process: bool = False
    prelude: str = ""
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    file_size_limit: Optional[int] = None


@dataclasses.dataclass
class Outcome:
    exit_status: Optional[int]
    stdout: str
    stderr: str
    elapsed_s: float
    escaped: bool = False  # an exception escaped main (the user would see a traceback)
    timed_out: bool = False
    children: List[int] = dataclasses.field(default_factory=list)
    temp_leftovers: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Verdict:
    kind: str  # "error" (the expected clear error), "result" (a correct result), or "wrong"
    code: Optional[str]
    traceback: bool
    input_modified: bool
    leftovers: List[str]
    problems: List[str]


# ----------------------------------------------------------------------------- generators
def ct_image(size=(40, 36, 30), spacing=(2.0, 2.0, 2.5), direction=None, origin=(0.0, 0.0, 0.0), seed=0):
    """A small synthetic CT in HU (int16): air, a soft-tissue body and a bone cylinder (see conftest)."""
    from conftest import make_ct_image

    return make_ct_image(size=size, spacing=spacing, direction=direction, origin=origin, seed=seed)


def _image_like(array: np.ndarray, reference) -> "object":
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def write_dicom_series(
    folder: str,
    slice_positions_mm: Sequence[Tuple[float, float, float]],
    *,
    series_uid: str = "1.2.826.0.1.3680043.2.1125.7.1",
    modality: str = "CT",
    size: Tuple[int, int] = (24, 20),
    pixel_spacing: Tuple[float, float] = (2.0, 2.0),
    first_instance: int = 1,
) -> List[str]:
    """Write one CT-like DICOM slice per position (ImagePositionPatient, x y z mm) with axial orientation.

    Tags written: 0008|0060 Modality, 0020|000d StudyInstanceUID, 0020|000e SeriesInstanceUID,
    0020|0032 ImagePositionPatient, 0020|0037 ImageOrientationPatient, 0020|0013 InstanceNumber,
    0008|0018 SOPInstanceUID, 0028|1052/1053 rescale intercept/slope (0/1: values are HU).
    """
    import SimpleITK as sitk

    os.makedirs(folder, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    nx, ny = size
    paths = []
    for offset, (x, y, z) in enumerate(slice_positions_mm):
        number = first_instance + offset
        hu = np.full((1, ny, nx), -1000, np.int16)
        hu[0, ny // 5 : ny - ny // 5, nx // 6 : nx - nx // 6] = 40  # soft tissue
        hu[0, ny // 2 - 2 : ny // 2 + 2, nx // 2 - 2 : nx // 2 + 2] = 700  # bone
        image = sitk.GetImageFromArray(hu)
        image.SetSpacing((pixel_spacing[0], pixel_spacing[1], 1.0))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{number}",
            "0008|0060": modality,
            "0010|0010": "Hostile^Corpus",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.7",
            "0020|000e": series_uid,
            "0020|0013": str(number),
            "0020|0032": f"{x:g}\\{y:g}\\{z:g}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        path = os.path.join(folder, f"IM{number:04d}.dcm")
        writer.SetFileName(path)
        writer.Execute(image)
        paths.append(path)
    return paths


def _axial(z_values: Sequence[float]) -> List[Tuple[float, float, float]]:
    return [(-24.0, -20.0, float(z)) for z in z_values]


def _write_mha_header(path: str, dim_size: str, element_type: str = "MET_SHORT", extra: str = "", payload: bytes = b"") -> None:
    header = (
        f"ObjectType = Image\nNDims = 3\nDimSize = {dim_size}\nElementType = {element_type}\n"
        f"BinaryDataByteOrderMSB = False\n{extra}ElementDataFile = LOCAL\n"
    )
    with open(path, "wb") as handle:
        handle.write(header.encode("ascii") + payload)


def _rotation(axis: Sequence[float], degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    angle = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _two_channel_onnx(path: str) -> None:
    """An ONNX graph with a 2-channel input (N, 2, D, H, W) -> (N, 1, D, H, W): wrong for a CT model."""
    import onnx
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 2, "depth", "height", "width"])
    probability = helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1, "depth", "height", "width"])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=1), helper.make_node("Sigmoid", ["mean"], ["probability"])],
        "two_channels", [image], [probability], initializer=[axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, path)


def _model_variant(source: str, target: str, *, onnx_bytes: Optional[bytes] = None, card_edit=None, card_text: Optional[str] = None,
                   keep_card: bool = True, update_checksum: bool = True) -> str:
    """Copy a model folder and damage it: new model.onnx bytes, an edited or replaced model.json."""
    from SpineContextSegLib.inference.model_files import sha256_of_file

    os.makedirs(target, exist_ok=True)
    shutil.copy(os.path.join(source, "model.onnx"), os.path.join(target, "model.onnx"))
    if onnx_bytes is not None:
        with open(os.path.join(target, "model.onnx"), "wb") as handle:
            handle.write(onnx_bytes)
    if not keep_card:
        return target
    with open(os.path.join(source, "model.json"), encoding="utf-8") as handle:
        card = json.load(handle)
    if update_checksum:
        card["onnx_sha256"] = sha256_of_file(os.path.join(target, "model.onnx"))
    if card_edit is not None:
        card_edit(card)
    with open(os.path.join(target, "model.json"), "w", encoding="utf-8") as handle:
        handle.write(card_text if card_text is not None else json.dumps(card, indent=2))
    return target


def build_corpus(root: str, model_dir: str, no_spine_model_dir: str) -> List[Case]:
    """Write every hostile input under ``root`` and return the cases (at least 30 kinds).

    ``model_dir``: a valid model whose output is ~1 everywhere (the tests' tiny model);
    ``no_spine_model_dir``: a valid model whose output is ~0 everywhere (it finds no spine).
    """
    import SimpleITK as sitk

    cases: List[Case] = []

    def folder(*parts: str) -> str:
        path = os.path.join(root, *parts)
        os.makedirs(path, exist_ok=True)
        return path

    def add(name: str, description: str, input_path: Optional[str], expect_code: Optional[str], *, output_name: str = "mask.nii.gz",
            extra: Sequence[str] = (), model: Optional[str] = None, output: Optional[str] = None, reference: Optional[str] = None,
            inputs: Optional[List[str]] = None, **fields) -> Case:
        out_dir = folder(name, "out")
        output = output or os.path.join(out_dir, output_name)
        argv = ([input_path] if input_path is not None else []) + ["-o", output, "--model", model or model_dir, *extra]
        in_dir = os.path.join(root, name, "in")
        watch = [out_dir] + ([in_dir] if os.path.isdir(in_dir) else [])
        case = Case(
            name=name, description=description, argv=argv, expect_code=expect_code,
            inputs=inputs if inputs is not None else ([input_path] if input_path and os.path.exists(input_path) else []),
            watch_dirs=watch, output=output if expect_code is None else None,
            reference=(reference or input_path) if expect_code is None else None, **fields,
        )
        cases.append(case)
        return case

    def write(name: str, file_name: str, image, **kwargs) -> str:
        path = os.path.join(folder(name, "in"), file_name)
        sitk.WriteImage(image, path, **kwargs)
        return path

    def write_bytes(name: str, file_name: str, data: bytes) -> str:
        path = os.path.join(folder(name, "in"), file_name)
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    ct = ct_image()
    hu = sitk.GetArrayFromImage(ct)

    # --- paths and folders
    add("missing_file", "the input path does not exist", os.path.join(root, "missing_file", "no-such-ct.nii.gz"), "input_not_found")
    add("empty_folder", "a folder with nothing in it", folder("empty_folder", "in"), "dicom_no_series")
    junk = folder("folder_without_dicom", "in")
    write_bytes("folder_without_dicom", "notes.txt", b"not a CT\n")
    write_bytes("folder_without_dicom", "broken.dcm", os.urandom(700))
    add("folder_without_dicom", "a folder of non-image files (text, a .dcm that is not DICOM)", junk, "dicom_no_series")

    # --- DICOM series
    good = folder("dicom_good", "in")
    write_dicom_series(good, _axial([2.5 * i for i in range(12)]))
    add("dicom_good", "a clean 12-slice axial CT series", good, None, output_name="mask.nrrd")
    missing = folder("dicom_missing_slice", "in")
    write_dicom_series(missing, _axial([2.5 * i for i in range(12) if i != 6]))
    add("dicom_missing_slice", "a series with one slice missing in the middle", missing, "dicom_inconsistent")
    duplicated = folder("dicom_duplicated_slice", "in")
    write_dicom_series(duplicated, _axial([2.5 * i for i in range(12)] + [2.5 * 4]))
    add("dicom_duplicated_slice", "a series with one slice position twice (different instance numbers)", duplicated, "dicom_inconsistent")
    uneven = folder("dicom_uneven_spacing", "in")
    write_dicom_series(uneven, _axial([0, 2, 4, 6, 8, 11, 14, 17, 20, 22, 24]))
    add("dicom_uneven_spacing", "slice steps of 2 mm and 3 mm mixed", uneven, "dicom_inconsistent")
    mixed = folder("dicom_mixed_series", "in")
    write_dicom_series(mixed, _axial([2.5 * i for i in range(8)]), series_uid="1.2.826.0.1.3680043.2.1125.7.21")
    write_dicom_series(mixed, _axial([2.5 * i for i in range(8)]), series_uid="1.2.826.0.1.3680043.2.1125.7.22", first_instance=101)
    add("dicom_mixed_series", "two series in one folder", mixed, "dicom_multiple_series")
    chosen = folder("dicom_mixed_series_chosen", "in")
    write_dicom_series(chosen, _axial([2.5 * i for i in range(8)]), series_uid="1.2.826.0.1.3680043.2.1125.7.31")
    write_dicom_series(chosen, _axial([3.0 * i for i in range(9)]), series_uid="1.2.826.0.1.3680043.2.1125.7.32", first_instance=101)
    reference = folder("dicom_mixed_series_chosen", "reference")
    write_dicom_series(reference, _axial([3.0 * i for i in range(9)]), series_uid="1.2.826.0.1.3680043.2.1125.7.32", first_instance=101)
    add("dicom_mixed_series_chosen", "two series in one folder, one chosen with --series", chosen, None, output_name="mask.nrrd",
        extra=["--series", "1.2.826.0.1.3680043.2.1125.7.32"], reference=reference)
    single = folder("dicom_single_slice", "in")
    write_dicom_series(single, _axial([0.0]))
    add("dicom_single_slice", "a DICOM 'series' of one slice", single, "input_not_3d")
    one_file = folder("dicom_one_file_of_a_series", "in")
    write_dicom_series(one_file, _axial([2.5 * i for i in range(4)]))
    add("dicom_one_file_of_a_series", "one .dcm file of a series instead of its folder", os.path.join(one_file, "IM0002.dcm"), "input_not_3d",
        inputs=[one_file])
    tilt = folder("dicom_gantry_tilt", "in")
    write_dicom_series(tilt, [(-24.0, -20.0 + 0.44 * i, 2.5 * i) for i in range(12)])  # 10 degrees of gantry tilt
    add("dicom_gantry_tilt", "slices shifted in-plane from slice to slice (gantry tilt)", tilt, "input_geometry")
    mr = folder("dicom_modality_mr", "in")
    write_dicom_series(mr, _axial([2.5 * i for i in range(12)]), modality="MR")
    add("dicom_modality_mr", "a series whose modality tag says MR", mr, None, output_name="mask.nrrd", expect_warnings=("input_not_ct",))

    # --- damaged files
    for suffix, name in ((".nii.gz", "truncated_nii_gz"), (".nii", "truncated_nii"), (".nrrd", "truncated_nrrd"), (".mha", "truncated_mha")):
        path = write(name, "ct" + suffix, ct)
        with open(path, "rb") as handle:
            data = handle.read()
        with open(path, "wb") as handle:
            handle.write(data[: len(data) * 2 // 3])
        add(name, f"a {suffix} cut at two thirds (an interrupted copy)", path, "input_unreadable")
    add("garbage_nii_gz", "random bytes named .nii.gz", write_bytes("garbage_nii_gz", "ct.nii.gz", os.urandom(4000)), "input_unreadable")
    add("zero_byte_file", "an empty (0-byte) .nii.gz", write_bytes("zero_byte_file", "ct.nii.gz", b""), "input_unreadable")
    add("unknown_extension", "a .docx file", write_bytes("unknown_extension", "report.docx", os.urandom(2000)), "input_format")
    nrrd_bytes_path = write("misnamed_nrrd", "ct.nrrd", ct)
    os.replace(nrrd_bytes_path, nrrd_bytes_path[: -len(".nrrd")] + ".nii.gz")
    add("misnamed_nrrd", "an NRRD file named .nii.gz", nrrd_bytes_path[: -len(".nrrd")] + ".nii.gz", "input_format")

    # --- wrong shape or kind
    add("image_2d", "a 2D image", write("image_2d", "slice.nii.gz", sitk.GetImageFromArray(hu[15])), "input_not_3d")
    add("single_slice_volume", "a 3D volume one slice thick", write("single_slice_volume", "ct.nii.gz", sitk.GetImageFromArray(hu[15:16])), "input_not_3d")
    add("volume_4d", "a 4D NIfTI (three volumes)", write("volume_4d", "ct4d.nii.gz", sitk.JoinSeries([ct, ct, ct])), "input_not_3d")
    rgb = sitk.GetImageFromArray(np.stack([hu.clip(0, 255).astype(np.uint8)] * 3, axis=-1), isVector=True)
    add("rgb_volume", "an RGB (3-component) volume", write("rgb_volume", "ct_rgb.nrrd", rgb), "input_not_scalar")
    zero_size = os.path.join(folder("zero_size_volume", "in"), "empty.mha")
    _write_mha_header(zero_size, "0 36 30", extra="ElementSpacing = 2 2 2.5\n")
    add("zero_size_volume", "a header with a size of 0 voxels", zero_size, "input_empty")
    constant = np.full_like(hu, -1000)
    add("constant_volume", "every voxel -1000 HU", write("constant_volume", "ct.nii.gz", _image_like(constant, ct)), "input_empty")
    with_nan = hu.astype(np.float32)
    with_nan[10, 10, 10:14] = np.nan
    add("nan_voxels", "four NaN voxels in a float CT", write("nan_voxels", "ct.nrrd", _image_like(with_nan, ct)), "input_nonfinite")
    with_inf = hu.astype(np.float32)
    with_inf[5, 5, 5] = np.inf
    add("inf_voxels", "an infinite voxel in a float CT", write("inf_voxels", "ct.mha", _image_like(with_inf, ct)), "input_nonfinite")

    # --- intensities
    unsigned = _image_like(np.clip(hu.astype(np.int32) + 1024, 0, 4095).astype(np.uint16), ct)
    add("uint16_without_rescale", "uint16 CT stored as HU + 1024 with no rescale intercept (0..4095)",
        write("uint16_without_rescale", "ct.nrrd", unsigned), None, expect_warnings=("input_unsigned_ct",), forbid_warnings=("input_not_ct",))
    rng = np.random.default_rng(3)
    mr_like = np.where(hu > -500, 350.0, 0.0) + np.where(hu > 300, 500.0, 0.0) + rng.normal(0, 15, hu.shape)
    add("mr_like_intensities", "MR-like values 0..900 (not Hounsfield units)",
        write("mr_like_intensities", "t1.nii.gz", _image_like(np.clip(mr_like, 0, None).astype(np.float32), ct)), None,
        expect_warnings=("input_not_ct",))

    # --- geometry
    add("smaller_than_a_patch", "12 x 10 x 8 voxels: smaller than one network tile",
        write("smaller_than_a_patch", "ct.nii.gz", ct_image(size=(12, 10, 8), spacing=(3.0, 3.0, 4.0))), None)
    add("extreme_anisotropy", "0.5 x 0.5 x 10 mm voxels",
        write("extreme_anisotropy", "ct.nrrd", ct_image(size=(64, 64, 6), spacing=(0.5, 0.5, 10.0))), None, output_name="mask.nrrd")
    oblique = tuple(_rotation((1, 2, 3), 30).ravel())
    add("oblique_direction", "direction cosines rotated 30 degrees about an oblique axis",
        write("oblique_direction", "ct.nrrd", ct_image(direction=oblique, origin=(10.0, -5.0, 40.0))), None, output_name="mask.nrrd")
    left_handed = tuple((_rotation((0, 0, 1), 20) @ np.diag([1.0, 1.0, -1.0])).ravel())
    add("left_handed_direction", "a left-handed (determinant -1) direction matrix",
        write("left_handed_direction", "ct.nrrd", ct_image(direction=left_handed)), None, output_name="mask.nrrd")
    add("flipped_axes", "x and y flipped (RAS-stored) in NIfTI",
        write("flipped_axes", "ct.nii.gz", ct_image(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1), origin=(40.0, 36.0, 0.0))), None)
    zero_spacing = os.path.join(folder("zero_spacing", "in"), "ct.mha")
    _write_mha_header(zero_spacing, "8 7 6", extra="ElementSpacing = 1 0 1\n", payload=np.zeros(336, np.int16).tobytes())
    add("zero_spacing", "a header with a voxel spacing of 0 mm", zero_spacing, "input_geometry")
    sheared = os.path.join(folder("sheared_axes", "in"), "ct.mha")
    _write_mha_header(sheared, "8 7 6", extra="ElementSpacing = 1 1 1\nTransformMatrix = 1 0 0 0.5 1 0 0 0 1\n",
                      payload=np.random.default_rng(1).integers(-1000, 1000, 336).astype(np.int16).tobytes())
    add("sheared_axes", "non-orthogonal direction cosines", sheared, "input_geometry")

    # --- memory: headers that claim gigantic volumes over a few bytes of data
    huge_mha = os.path.join(folder("huge_header_mha", "in"), "ct.mha")
    _write_mha_header(huge_mha, "100000 100000 100000", extra="ElementSpacing = 0.1 0.1 0.1\n", payload=b"\0" * 4096)
    add("huge_header_mha", "an .mha header claiming 10^15 voxels over 4 kB of data", huge_mha, "input_too_large", own_process=True)
    huge_dir = folder("huge_header_nhdr", "in")
    with open(os.path.join(huge_dir, "ct.raw"), "wb") as handle:
        handle.write(b"\0" * 4096)
    with open(os.path.join(huge_dir, "ct.nhdr"), "w", encoding="ascii") as handle:
        handle.write("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 60000 60000 20000\n"
                     "space directions: (0.5,0,0) (0,0.5,0) (0,0,0.5)\nendian: little\nencoding: raw\ndata file: ct.raw\n")
    add("huge_header_nhdr", "a detached .nhdr claiming 7 x 10^13 voxels over a 4 kB .raw", os.path.join(huge_dir, "ct.nhdr"), "input_too_large",
        own_process=True, inputs=[huge_dir])

    # --- outputs
    source = write("output_folder_missing", "ct.nii.gz", ct)
    add("output_folder_missing", "the output folder does not exist", source, "output_dir_missing",
        output=os.path.join(root, "output_folder_missing", "out", "not", "there", "mask.nii.gz"))
    source = write("output_under_a_file", "ct.nii.gz", ct)
    blocker = os.path.join(folder("output_under_a_file", "out"), "report.txt")
    with open(blocker, "w", encoding="ascii") as handle:
        handle.write("a file, not a folder\n")
    add("output_under_a_file", "the output 'folder' is a regular file", source, "output_dir_missing",
        output=os.path.join(blocker, "mask.nii.gz"), inputs=[source, blocker])
    if os.path.isdir("/proc"):  # Linux
        source = write("output_read_only_location", "ct.nii.gz", ct)
        add("output_read_only_location", "output into /proc (refuses new files even for root)", source, "output_not_writable",
            output="/proc/scs-hostile-corpus-mask.nii.gz")
    source = write("output_is_input", "ct.nii.gz", ct)
    add("output_is_input", "-o names the input file itself", source, "output_is_input", output=source)
    source = write("output_wrong_format", "ct.nii.gz", ct)
    add("output_wrong_format", "-o mask.png", source, "output_format", output_name="mask.png")
    for suffix, name in ((".nii.gz", "file_size_limit_nii_gz"), (".nrrd", "file_size_limit_nrrd")) if os.name == "posix" else ():
        source = write(name, "ct.nii.gz", ct)
        add(name, f"the disk 'fills' while writing {suffix} (RLIMIT_FSIZE of 64 bytes)", source, "disk_full",
            output_name="mask" + suffix, own_process=True, file_size_limit=64)
    unicode_in = folder("non_ascii_paths", "in", "Patient Müller – 北京 scan")
    unicode_out = folder("non_ascii_paths", "out", "Ergebnis Maske é")
    source = os.path.join(unicode_in, "CT Thorax 1.nii.gz")
    sitk.WriteImage(ct, source)
    add("non_ascii_paths", "input and output paths with spaces, umlauts and CJK characters", source, None,
        output=os.path.join(unicode_out, "Wirbelsäule 脊柱.nii.gz"), own_process=True, inputs=[os.path.join(root, "non_ascii_paths", "in")])
    cases[-1].watch_dirs = [unicode_out, unicode_in]
    add("non_ascii_missing_c_locale", "a missing non-ASCII path, human-readable error, LANG=C",
        os.path.join(unicode_in, "fehlt – 缺失.nii.gz"), "input_not_found", human=True, own_process=True,
        env={"LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": ""}, inputs=[])
    cases[-1].watch_dirs.append(unicode_in)

    # --- models and engines
    source = write("model_checksum_mismatch", "ct.nii.gz", ct)
    with open(os.path.join(model_dir, "model.onnx"), "rb") as handle:
        onnx_bytes = bytearray(handle.read())
    onnx_bytes[len(onnx_bytes) // 2] ^= 0xFF
    damaged = _model_variant(model_dir, os.path.join(root, "model_checksum_mismatch", "model"), onnx_bytes=bytes(onnx_bytes), update_checksum=False)
    add("model_checksum_mismatch", "one flipped byte in model.onnx", source, "model_checksum", model=damaged)
    source = write("model_card_missing", "ct.nii.gz", ct)
    add("model_card_missing", "model.onnx without model.json", source, "model_metadata",
        model=_model_variant(model_dir, os.path.join(root, "model_card_missing", "model"), keep_card=False))
    source = write("model_card_incomplete", "ct.nii.gz", ct)
    add("model_card_incomplete", "model.json without spacing_mm and patch_size", source, "model_metadata",
        model=_model_variant(model_dir, os.path.join(root, "model_card_incomplete", "model"), card_edit=lambda card: [card.pop("spacing_mm"), card.pop("patch_size")]))
    source = write("model_card_not_json", "ct.nii.gz", ct)
    add("model_card_not_json", "model.json cut in the middle (invalid JSON)", source, "model_metadata",
        model=_model_variant(model_dir, os.path.join(root, "model_card_not_json", "model"), card_text='{"name": "tiny", "task": '))
    source = write("model_two_input_channels", "ct.nii.gz", ct)
    two_channels = os.path.join(folder("model_two_input_channels", "model_source"), "model.onnx")
    _two_channel_onnx(two_channels)
    with open(two_channels, "rb") as handle:
        add("model_two_input_channels", "an ONNX graph taking 2 input channels (checksum matches)", source, "model_incompatible",
            model=_model_variant(model_dir, os.path.join(root, "model_two_input_channels", "model"), onnx_bytes=handle.read()))
    source = write("model_onnx_garbage", "ct.nii.gz", ct)
    add("model_onnx_garbage", "model.onnx is random bytes (checksum matches), OpenVINO engine", source, "model_incompatible",
        model=_model_variant(model_dir, os.path.join(root, "model_onnx_garbage", "model"), onnx_bytes=os.urandom(3000)), extra=["--engine", "openvino"])
    source = write("onnxruntime_missing", "ct.nii.gz", ct)
    add("onnxruntime_missing", "--engine onnxruntime without the onnxruntime package", source, "engine_missing",
        extra=["--engine", "onnxruntime"], own_process=True, prelude=BLOCK_ONNXRUNTIME)
    source = write("onnxruntime_missing_auto", "ct.nii.gz", ct)
    add("onnxruntime_missing_auto", "default engine without onnxruntime: falls back to OpenVINO", source, None,
        own_process=True, prelude=BLOCK_ONNXRUNTIME)
    source = write("no_engine_installed", "ct.nii.gz", ct)
    add("no_engine_installed", "neither onnxruntime nor OpenVINO installed", source, "engine_missing",
        own_process=True, prelude=BLOCK_ONNXRUNTIME + "; " + BLOCK_OPENVINO)
    source = write("cuda_requested_absent", "ct.nii.gz", ct)
    add("cuda_requested_absent", "--device cuda on a machine without a usable CUDA provider", source, "cuda_unavailable",
        extra=["--device", "cuda", "--engine", "onnxruntime"])
    source = write("cuda_auto_falls_back", "ct.nii.gz", ct)
    add("cuda_auto_falls_back", "--device auto without CUDA runs on the CPU", source, None, extra=["--device", "auto", "--engine", "onnxruntime"])

    # --- no spine (a model that sees none: "no spine found", never a random blob)
    water = np.full_like(hu, -1000)
    water[5:25, 6:30, 6:34] = 0
    add("no_spine_found", "a water phantom, with a model that finds no spine", write("no_spine_found", "water.nii.gz", _image_like(water, ct)),
        "no_spine_found", model=no_spine_model_dir)
    return cases


# ----------------------------------------------------------------------------- running
def snapshot(paths: Sequence[str]) -> Dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders), keyed by path."""
    digests: Dict[str, str] = {}
    for path in paths:
        files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
        for name in sorted(files):
            with open(name, "rb") as handle:
                digests[name] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def listing(folders: Sequence[str]) -> Dict[str, List[str]]:
    return {folder: sorted(os.listdir(folder)) if os.path.isdir(folder) else [] for folder in folders}


def _environment(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    for key, value in (extra or {}).items():
        if value == "":
            env.pop(key, None)
        else:
            env[key] = value
    return env


def processes_in_group(group: int, settle_s: float = 3.0) -> List[int]:
    """PIDs (Linux /proc) whose process group is ``group``: what a finished run left running.

    Polls for up to ``settle_s`` seconds: a process the kernel is still tearing down right
    after its parent was reaped is not a leftover; one still there after that is.
    """
    deadline = time.monotonic() + settle_s
    found = _group_members(group)
    while found and time.monotonic() < deadline:
        time.sleep(0.05)
        found = _group_members(group)
    return found


def _group_members(group: int) -> List[int]:
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(entry))
    return found


def children_of(pid: int) -> List[int]:
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def run_own_process(case: Case, scratch: str, timeout_s: float = CASE_TIMEOUT_S) -> Outcome:
    """Run one case as its own worker (or CLI) process in a new session, with its own TMPDIR."""
    tmpdir = os.path.join(scratch, case.name + ".tmp")
    os.makedirs(tmpdir, exist_ok=True)
    if case.human:
        arguments = ["segment", *case.argv]
        entry = "from SpineContextSegLib.cli import main"
    else:
        arguments = list(case.argv)
        entry = "from SpineContextSegLib.worker import main"
    if case.prelude:
        command = [sys.executable, "-c", f"{case.prelude}; {entry}; import sys; sys.exit(main(sys.argv[1:]))", *arguments]
    else:
        command = [sys.executable, "-m", "SpineContextSegLib.cli" if case.human else "SpineContextSegLib.worker", *arguments]
    limit = case.file_size_limit

    def limit_file_size() -> None:  # in the child, before exec: pipes are not files, so stdout is unaffected
        if limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    start = time.monotonic()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_environment(dict(case.env, TMPDIR=tmpdir)), cwd=ROOT,
        start_new_session=True, preexec_fn=limit_file_size if limit is not None else None,
    )
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    elapsed = time.monotonic() - start
    left = processes_in_group(process.pid)
    for pid in left:  # never leave them running, but report them
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return Outcome(
        exit_status=None if timed_out else process.returncode, stdout=stdout.decode("utf-8", "replace"), stderr=stderr.decode("utf-8", "replace"),
        elapsed_s=elapsed, timed_out=timed_out, children=left, temp_leftovers=sorted(os.listdir(tmpdir)),
    )


def run_grouped(cases: Sequence[Case], scratch: str, timeout_s: float = CASE_TIMEOUT_S) -> Dict[str, Outcome]:
    """Run cases in one worker subprocess (``python hostile_corpus.py run``), one ``main`` call each."""
    spec = []
    for case in cases:
        tmpdir = os.path.join(scratch, case.name + ".tmp")
        os.makedirs(tmpdir, exist_ok=True)
        spec.append({
            "name": case.name, "argv": list(case.argv), "human": case.human, "tmpdir": tmpdir, "timeout_s": timeout_s,
            "stdout": os.path.join(scratch, case.name + ".stdout"), "stderr": os.path.join(scratch, case.name + ".stderr"),
        })
    spec_path, results_path = os.path.join(scratch, "spec.json"), os.path.join(scratch, "results.json")
    with open(spec_path, "w", encoding="utf-8") as handle:
        json.dump(spec, handle)
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "run", spec_path, results_path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_environment(), cwd=ROOT, start_new_session=True,
    )
    try:
        runner_out, runner_err = process.communicate(timeout=timeout_s * 2 + 5 * len(spec))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        runner_out, runner_err = process.communicate()
    left = processes_in_group(process.pid)
    results = {}
    if os.path.exists(results_path):
        with open(results_path, encoding="utf-8") as handle:
            results = json.load(handle)
    outcomes = {}
    for item in spec:
        result = results.get(item["name"])
        read = lambda path: open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else ""  # noqa: E731
        if result is None:  # the runner died or hung in this case or before it
            outcomes[item["name"]] = Outcome(
                exit_status=None, stdout=read(item["stdout"]), stderr=read(item["stderr"]) + runner_err.decode("utf-8", "replace"),
                elapsed_s=0.0, timed_out=True, children=left,
            )
            continue
        outcomes[item["name"]] = Outcome(
            exit_status=result["exit_status"], stdout=read(item["stdout"]), stderr=read(item["stderr"]), elapsed_s=result["elapsed_s"],
            escaped=result["escaped"], children=result["children"] + left, temp_leftovers=sorted(os.listdir(item["tmpdir"])),
        )
    return outcomes


def _runner_main(spec_path: str, results_path: str) -> int:
    """The grouped runner: ``main(argv)`` per case, stdout/stderr redirected at the fd level."""
    import faulthandler
    import tempfile
    import traceback

    from SpineContextSegLib.cli import main as cli_main
    from SpineContextSegLib.worker import main as worker_main

    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    results: Dict[str, dict] = {}
    saved_out, saved_err = os.dup(1), os.dup(2)
    for item in spec:
        os.environ["TMPDIR"] = item["tmpdir"]
        tempfile.tempdir = None  # recomputed from TMPDIR
        escaped = False
        with open(item["stdout"], "wb") as out, open(item["stderr"], "wb") as err:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            faulthandler.dump_traceback_later(item["timeout_s"], exit=True, file=err)
            start = time.monotonic()
            try:
                status = cli_main(["segment", *item["argv"]]) if item["human"] else worker_main(item["argv"])
            except SystemExit as stop:
                status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except BaseException:  # what the interpreter would print: a traceback reaching the user
                traceback.print_exc()
                status, escaped = 1, True
            elapsed = time.monotonic() - start
            faulthandler.cancel_dump_traceback_later()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
        results[item["name"]] = {"exit_status": status, "elapsed_s": elapsed, "escaped": escaped, "children": children_of(os.getpid())}
        with open(results_path, "w", encoding="utf-8") as handle:  # after every case: a crash keeps the earlier results
            json.dump(results, handle)
    return 0


# ----------------------------------------------------------------------------- checking
def evaluate(case: Case, outcome: Outcome, before_inputs: Dict[str, str], before_listing: Dict[str, List[str]]) -> Verdict:
    """Check one case's outcome against its expectation and the corpus invariants."""
    from SpineContextSegLib.errors import ERROR_CODES
    from SpineContextSegLib.io.files import TEMP_PREFIX
    from SpineContextSegLib.progress import decode_message

    problems: List[str] = []
    text = outcome.stdout + outcome.stderr
    traceback_seen = outcome.escaped or TRACEBACK_MARK in text
    if traceback_seen:
        problems.append("a Python traceback reached the user")
    if outcome.timed_out:
        problems.append(f"did not finish within {CASE_TIMEOUT_S} s")
    if outcome.children:
        problems.append(f"left child processes {outcome.children}")
    temp_leftovers = [name for name in outcome.temp_leftovers if name not in THIRD_PARTY_TEMP_FILES]
    if temp_leftovers:
        problems.append(f"left temporary files {temp_leftovers}")
    after_inputs = snapshot([p for p in case.inputs if os.path.exists(p)])
    input_modified = after_inputs != before_inputs
    if input_modified:
        problems.append("an input file changed")

    leftovers: List[str] = []
    expected_new = {os.path.basename(case.output)} if case.expect_code is None and case.output else set()
    for folder, names in listing(case.watch_dirs).items():
        new = sorted(set(names) - set(before_listing.get(folder, [])) - (expected_new if case.output and os.path.dirname(case.output) == folder else set()))
        leftovers += [os.path.join(folder, name) for name in new]
        leftovers += [os.path.join(folder, name) for name in names if name.startswith(TEMP_PREFIX) and os.path.join(folder, name) not in leftovers]
    if leftovers:
        problems.append(f"left files {leftovers}")

    code: Optional[str] = None
    messages = []
    if case.human:
        lines = [line for line in outcome.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        if last.startswith("error ["):
            code = last[len("error ["):].split("]", 1)[0]
            message = last.split("]: ", 1)[-1]
            if not message.strip():
                problems.append("empty error message")
    else:
        for line in outcome.stdout.splitlines():
            if not line.strip():
                continue
            message = decode_message(line)
            if message is None:
                problems.append(f"stdout line is not a protocol message: {line[:120]!r}")
            else:
                messages.append(message)
        last_message = messages[-1] if messages else {}
        if last_message.get("type") == "error":
            code = last_message.get("code")
            text_message = str(last_message.get("message", ""))
            if "\n" in text_message or not text_message.strip() or len(text_message) > 400:
                problems.append(f"error message is not one short line: {text_message!r}")
            if last_message.get("exit_status") != outcome.exit_status:
                problems.append("the error line's exit_status differs from the process's")
    warnings = {m.get("code") for m in messages if m.get("type") == "warning"}

    if case.expect_code is not None:
        expected_status = ERROR_CODES[case.expect_code].exit_status
        if code != case.expect_code or outcome.exit_status != expected_status:
            problems.append(f"expected [{case.expect_code}] exit {expected_status}, got [{code}] exit {outcome.exit_status}")
        kind = "error" if not problems else "wrong"
    else:
        if outcome.exit_status != 0:
            problems.append(f"expected a result, got [{code}] exit {outcome.exit_status}: {outcome.stderr[-300:]}")
        else:
            problems += _check_result(case, messages)
        missing = set(case.expect_warnings) - warnings
        if not case.human and missing:
            problems.append(f"missing warnings {sorted(missing)}")
        unwanted = set(case.forbid_warnings) & warnings
        if unwanted:
            problems.append(f"unwanted warnings {sorted(unwanted)}")
        kind = "result" if not problems else "wrong"
    return Verdict(kind=kind, code=code, traceback=traceback_seen, input_modified=input_modified, leftovers=leftovers, problems=problems)


def _check_result(case: Case, messages: List[dict]) -> List[str]:
    """The mask exists, is uint8 in {0, 1}, and lies on exactly the reference's grid."""
    import SimpleITK as sitk

    from SpineContextSegLib.io.images import read_image

    problems = []
    if not case.human:
        result = messages[-1] if messages else {}
        if result.get("type") != "result" or os.path.abspath(str(result.get("outputs", {}).get("mask"))) != os.path.abspath(case.output or ""):
            problems.append("the last protocol line is not a result naming the mask")
    if not case.output or not os.path.isfile(case.output):
        return problems + ["no mask was written"]
    mask = sitk.ReadImage(case.output)
    reference = read_image(case.reference) if case.reference else None
    if reference is not None:
        if mask.GetSize() != reference.GetSize():
            problems.append(f"mask size {mask.GetSize()} != input size {reference.GetSize()}")
        for what, a, b in (("spacing", mask.GetSpacing(), reference.GetSpacing()), ("origin", mask.GetOrigin(), reference.GetOrigin()),
                           ("direction", mask.GetDirection(), reference.GetDirection())):
            if not np.allclose(a, b, atol=1e-4):
                problems.append(f"mask {what} {a} != input {what} {b}")
    values = set(np.unique(sitk.GetArrayViewFromImage(mask)).tolist())
    if not values <= {0, 1} or 1 not in values:
        problems.append(f"mask values {sorted(values)} (expected 0/1 with some 1s)")
    return problems


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "run":
        sys.exit(_runner_main(sys.argv[2], sys.argv[3]))
    print("usage: python hostile_corpus.py run SPEC.json RESULTS.json", file=sys.stderr)
    sys.exit(2)
