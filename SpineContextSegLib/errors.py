"""Errors a user can act on: one stable ``code``, one line of ``message``, one exit status.

Every failure that is the user's input, environment or model (not a bug in this
library) is raised as :class:`SegmentationError` with a code from :data:`ERROR_CODES`.
The CLI, the worker's JSON-line protocol and the Slicer module all show these
codes, so they never change meaning once released.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional


class ErrorKind(NamedTuple):
    exit_status: int
    summary: str  # what usually causes it
    remedy: str  # what the user should do


#: Exit statuses: 0 success, 1 internal bug, 2 command-line usage, then one per family.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 10
EXIT_OUTPUT = 11
EXIT_MODEL = 12
EXIT_ENVIRONMENT = 13
EXIT_NO_SPINE = 14
EXIT_OUT_OF_MEMORY = 15
EXIT_CANCELLED = 20
EXIT_TERMINATED = 21

ERROR_CODES: Dict[str, ErrorKind] = {
    # input
    "input_not_found": ErrorKind(EXIT_INPUT, "The input path does not exist.", "Check the path; quote paths that contain spaces."),
    "input_unreadable": ErrorKind(EXIT_INPUT, "The file is corrupt, truncated or not an image format we read.", "Re-export the CT as NIfTI (.nii.gz), NRRD, MHA or a DICOM series folder."),
    "input_format": ErrorKind(EXIT_INPUT, "The file extension is not an image format we read.", "Use .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or a DICOM folder."),
    "dicom_no_series": ErrorKind(EXIT_INPUT, "The folder holds no DICOM image series.", "Point to the folder that holds the CT's .dcm files."),
    "dicom_multiple_series": ErrorKind(EXIT_INPUT, "The folder holds more than one DICOM series.", "Pass --series UID (listed in the message) or move one series into its own folder."),
    "dicom_inconsistent": ErrorKind(EXIT_INPUT, "The DICOM slices are missing, duplicated or unevenly spaced.", "Re-export the complete series; check that no slice is missing."),
    "input_not_3d": ErrorKind(EXIT_INPUT, "The image is not a 3D volume (2D, a single slice, or 4D).", "Pass a 3D CT volume with at least 2 slices in every direction."),
    "input_not_scalar": ErrorKind(EXIT_INPUT, "The image has several components per voxel (RGB or vector).", "Pass a greyscale CT in Hounsfield units."),
    "input_empty": ErrorKind(EXIT_INPUT, "The image has no voxels, or every voxel has the same value.", "Check the export; the file holds no CT data."),
    "input_nonfinite": ErrorKind(EXIT_INPUT, "The image contains NaN or infinite values.", "Re-export the CT; the file is damaged."),
    "input_geometry": ErrorKind(EXIT_INPUT, "The image's spacing or direction is invalid (zero, negative or singular).", "Fix the header (spacing and direction cosines) and try again."),
    "input_too_large": ErrorKind(EXIT_INPUT, "The volume needs more memory than this machine has free.", "Crop the CT to the spine region, or run on a machine with more memory."),
    # output
    "output_dir_missing": ErrorKind(EXIT_OUTPUT, "The output folder does not exist.", "Create the folder or pass another output path."),
    "output_not_writable": ErrorKind(EXIT_OUTPUT, "The output location is read-only or not permitted.", "Choose a folder you can write to."),
    "output_is_input": ErrorKind(EXIT_OUTPUT, "The output path is the input file.", "Pass a different output path; the input is never overwritten."),
    "output_format": ErrorKind(EXIT_OUTPUT, "The output extension is not one we write.", "Use .nii.gz, .nii, .nrrd or .seg.nrrd (and .stl for meshes)."),
    "disk_full": ErrorKind(EXIT_OUTPUT, "The disk filled up while writing.", "Free disk space and run again; no partial file was kept."),
    # model
    "model_not_found": ErrorKind(EXIT_MODEL, "The model folder or file is missing.", "Pass --model DIR holding model.onnx and model.json."),
    "model_checksum": ErrorKind(EXIT_MODEL, "model.onnx does not match the sha256 in model.json.", "Re-copy the model; the file is corrupt or was replaced."),
    "model_metadata": ErrorKind(EXIT_MODEL, "model.json is missing, unreadable or lacks required fields.", "Re-export the model with `spinecontextseg export-onnx`."),
    "model_incompatible": ErrorKind(EXIT_MODEL, "The model's inputs or outputs are not what this version expects.", "Use a model exported by this version of SpineContextSeg."),
    # environment
    "engine_missing": ErrorKind(EXIT_ENVIRONMENT, "The inference engine's Python package is not installed.", "pip install onnxruntime (or choose another --engine)."),
    "cuda_unavailable": ErrorKind(EXIT_ENVIRONMENT, "A GPU was requested but no usable CUDA device was found.", "Use --device auto or cpu, or install onnxruntime-gpu and the NVIDIA driver."),
    "out_of_memory": ErrorKind(EXIT_OUT_OF_MEMORY, "The machine ran out of memory.", "Close other programs, lower --batch-size, or crop the CT."),
    # result
    "no_spine_found": ErrorKind(EXIT_NO_SPINE, "No spine was found in the field of view.", "Check that the CT covers the spine (not only head, legs or a phantom)."),
    # stops
    "cancelled": ErrorKind(EXIT_CANCELLED, "The run was cancelled (cancel file).", "Nothing to do; no partial output was kept."),
    "terminated": ErrorKind(EXIT_TERMINATED, "The run was stopped by a signal (SIGTERM/SIGINT).", "Nothing to do; no partial output was kept."),
    # bugs
    "internal": ErrorKind(EXIT_INTERNAL, "An unexpected internal error (a bug).", "Re-run with --debug and report the traceback."),
}


class SegmentationError(Exception):
    """A failure the user can act on.

    Parameters
    ----------
    code : str
        Key of :data:`ERROR_CODES`; stable across versions.
    message : str
        One line: what was wrong, and what to do.
    """

    def __init__(self, code: str, message: str, *, details: Optional[dict] = None):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}

    @property
    def exit_status(self) -> int:
        return ERROR_CODES[self.code].exit_status

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class Cancelled(SegmentationError):
    """Raised between tiles when the cancel file appears or a stop signal arrives."""

    def __init__(self, code: str = "cancelled", message: str = "Cancelled by the user."):
        super().__init__(code, message)
