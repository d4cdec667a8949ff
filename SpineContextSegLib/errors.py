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
    "dicom_seg_source_invalid": ErrorKind(
        EXIT_INPUT,
        "The DICOM series lacks what a DICOM SEG must reference (SOP/study/series/frame-of-reference UIDs, slice position and orientation), or its files do not match the volume read.",
        "Re-export the series from the scanner or PACS, or write the mask as .nii.gz, .nrrd or .seg.nrrd.",
    ),
    "input_geometry": ErrorKind(EXIT_INPUT, "The image's spacing or direction is invalid (zero or not finite spacing; singular or sheared axes).", "Fix the header (spacing and direction cosines) and try again."),
    "input_too_large": ErrorKind(EXIT_INPUT, "The volume needs more memory than this machine has free.", "Crop the CT to the spine region, or run on a machine with more memory."),
    # output
    "output_dir_missing": ErrorKind(EXIT_OUTPUT, "The output folder does not exist.", "Create the folder or pass another output path."),
    "output_not_writable": ErrorKind(EXIT_OUTPUT, "The output location is read-only or not permitted.", "Choose a folder you can write to."),
    "output_is_input": ErrorKind(EXIT_OUTPUT, "The output path is the input file.", "Pass a different output path; the input is never overwritten."),
    "output_format": ErrorKind(
        EXIT_OUTPUT,
        "The output extension is not one we write.",
        "Use .nii.gz, .nii, .nrrd, .seg.nrrd or .dcm (DICOM SEG) for the mask, .stl for meshes, .png for --qc, .json for --roi and --centreline.",
    ),
    "dicom_seg_needs_dicom_input": ErrorKind(
        EXIT_OUTPUT,
        "A DICOM SEG (-o .dcm) was asked for, but the input is not a DICOM series: a DICOM SEG must reference the CT's DICOM files.",
        "Pass the folder of the CT's DICOM files as input, or write the mask as .nii.gz, .nrrd or .seg.nrrd.",
    ),
    "disk_full": ErrorKind(EXIT_OUTPUT, "The disk filled up while writing.", "Free disk space and run again; no partial file was kept."),
    # model
    "model_not_found": ErrorKind(EXIT_MODEL, "The model folder or file is missing.", "Pass --model DIR holding model.onnx and model.json."),
    "model_checksum": ErrorKind(EXIT_MODEL, "model.onnx does not match the sha256 in model.json.", "Re-copy the model; the file is corrupt or was replaced."),
    "model_metadata": ErrorKind(EXIT_MODEL, "model.json is missing, unreadable or lacks required fields.", "Re-export the model with `spinecontextseg export-onnx`."),
    "model_incompatible": ErrorKind(EXIT_MODEL, "The model's inputs or outputs are not what this version expects.", "Use a model exported by this version of SpineContextSeg."),
    "int8_model_missing": ErrorKind(
        EXIT_MODEL,
        "--precision int8 was asked for, but the model folder has no INT8 model (model_int8.onnx listed in model.json), or the engine cannot run it (torch).",
        "Create one with `spinecontextseg quantize MODEL_DIR -o DIR`, use --engine openvino or onnxruntime, or use --precision fp32/auto.",
    ),
    # environment
    "engine_missing": ErrorKind(EXIT_ENVIRONMENT, "The inference engine's Python package is not installed.", "pip install onnxruntime (or choose another --engine)."),
    "dicom_support_missing": ErrorKind(
        EXIT_ENVIRONMENT,
        "DICOM SEG output (-o .dcm) needs the optional package highdicom, which is not installed.",
        'pip install "spinecontextseg[dicom]" (or write the mask as .nii.gz, .nrrd or .seg.nrrd).',
    ),
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


#: Warnings (JSON ``{"type": "warning", "code": ...}``): the run goes on, but the user must know.
WARNING_CODES: Dict[str, ErrorKind] = {
    "input_not_ct": ErrorKind(EXIT_OK, "The intensities (or the DICOM modality) do not look like CT, e.g. an MR image.", "Use a CT in Hounsfield units; results on other images are not meaningful."),
    "input_unsigned_ct": ErrorKind(
        EXIT_OK,
        "Unsigned values (0..4095) without a rescale intercept: read as CT stored with an offset of 1024, so HU = value - 1024.",
        "Check the result; re-export the CT in Hounsfield units (DICOM RescaleIntercept applied) to silence it.",
    ),
    "model_untrained": ErrorKind(EXIT_OK, "The model has random weights (a test placeholder).", "Install or pass a trained model (--model DIR); the mask is not a spine."),
    "vertebra_names_uncertain": ErrorKind(
        EXIT_OK,
        "--task vertebrae: no anatomical anchor (sacrum, ribs, skull base) is in the field of view, so names come from vertebra size alone; "
        "or the last rib found has only a vertebra cut by the scan's bottom below it (T12's own rib may lie below the scan: the names may all be one level too far down); "
        "or another naming (often one level off, or a sixth lumbar vertebra) is nearly as likely as the one given.",
        "Check the names against the anatomy (count from C2 or from the first rib where in view); a field of view that includes the sacrum and the lowest ribs names them most reliably.",
    ),
    "vertebra_slices_too_thick": ErrorKind(
        EXIT_OK,
        "--task vertebrae on a CT with slices more than 3.5 mm apart along the spine (or resampled from such slices): discs are not resolved, vertebrae can merge and names shift.",
        "Use a reconstruction with thinner slices (<= 3 mm) for vertebra names; the whole-spine mask is still usable.",
    ),
    "gpu_out_of_memory": ErrorKind(EXIT_OK, "The GPU ran out of memory; the run went on, on the CPU (slower).", "Nothing; to stay on the GPU, close other GPU programs or lower --batch-size."),
}

#: Notes printed under the troubleshooting tables (docs/troubleshooting.md).
_TROUBLESHOOTING_NOTES = """\
### Notes

- **No traceback.** Every failure above is one line (`error [code]: message` on stderr, or one
  JSON `error` line with `--progress json` / the worker) and the exit status in the table. A
  Python traceback appears only with `--debug`; without it, exit status 1 (`internal`) is a bug.
- **Inputs are never modified** and **no partial output is left**: outputs are written to a
  temporary `.scs-tmp-*` file beside the target and renamed at the end. A run killed outright
  (SIGKILL, power loss) may leave such a temporary file; the next run writing into the same
  folder on the same machine removes it.
- **Memory** is checked from the file's header and the model's grid before any voxel is read
  or resampled (`input_too_large`), using MemAvailable + free swap and the cgroup limit.
- **Same input, same mask.** On the CPU, the same input, model, engine and `--threads` give a
  bit-identical mask on every run (ONNX Runtime, OpenVINO in fp32 and bf16, torch). Masks of
  different precisions differ slightly (Dice 0.996–0.999 between bf16 and fp32 masks on the
  benchmark's cases). A different thread count may change the last bits of the probabilities
  and so flip single voxels at the threshold;
  pass `--threads N` to compare runs across machines. On CUDA (onnxruntime-gpu, torch) results
  are not guaranteed bit-identical between runs (cuDNN chooses algorithms at run time).
- **Only the tiles the spine runs through.** The network starts with the tiles that cut the
  body's mid-sagittal plane (from the image's direction cosines) and follows the column it
  finds; with no spine there, it runs every tile. If a spine that is plainly in the image comes
  out missing or cut short (an image whose orientation header is wrong, so that left-right is
  not what the header says), compare with `--all-tiles`, which runs every tile of the body.
- **The outline follows the bone the CT shows.** After the network, voxels it is unsure of
  (probability 0.25-0.5) join where the CT is bone (>= 250 HU), then the cortex one CT voxel
  beyond (>= 400 HU); `info.uncertain_bone_ml` and `info.cortical_edge_ml` say how much. The
  outline is then about one voxel wider than the network's: closer to manual (VerSe) labels, a
  little wider than TotalSegmentator's, and wider than the phantom generator's labels (its blur
  reaches beyond them). To compare with a tool whose outline is tighter, or to see the network's
  own answer, pass `--no-cortical-edge` (the Slicer module always uses the default).
"""


README_BEGIN = "<!-- troubleshooting: generated by `python -m SpineContextSegLib.errors docs/troubleshooting.md` from SpineContextSegLib/errors.py -->"
README_END = "<!-- troubleshooting: end -->"


def troubleshooting_markdown() -> str:
    """The troubleshooting tables (docs/troubleshooting.md): every error code -> exit status, cause, what to do; then the warnings.

    ``python -m SpineContextSegLib.errors docs/troubleshooting.md`` rewrites that page between
    :data:`README_BEGIN` and :data:`README_END`; edit this file, not the page.
    """

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "Exit statuses: 0 success, 1 internal error (a bug), 2 bad command line, 10 input, 11 output,",
        "12 model, 13 environment (engine/GPU), 14 no spine found, 15 out of memory, 20 cancelled,",
        "21 terminated. Codes never change meaning between versions.",
        "",
        "### Errors",
        "",
        "| Code | Exit status | Cause | What to do |",
        "|---|---|---|---|",
    ]
    for code, kind in ERROR_CODES.items():
        lines.append(f"| `{code}` | {kind.exit_status} | {cell(kind.summary)} | {cell(kind.remedy)} |")
    lines += ["", "### Warnings (the run continues)", "", "| Code | Cause | What to do |", "|---|---|---|"]
    for code, kind in WARNING_CODES.items():
        lines.append(f"| `{code}` | {cell(kind.summary)} | {cell(kind.remedy)} |")
    return "\n".join(lines) + "\n\n" + _TROUBLESHOOTING_NOTES


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


class UsageError(Exception):
    """A command line the tool cannot run (a malformed option value): argparse's exit status 2."""


def update_readme(path: str) -> None:
    """Replace the generated troubleshooting block of the Markdown file at ``path`` (docs/troubleshooting.md)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(head + README_BEGIN + "\n" + troubleshooting_markdown() + README_END + tail)


if __name__ == "__main__":  # pragma: no cover
    import sys

    if len(sys.argv) > 1:
        update_readme(sys.argv[1])
    else:
        print(troubleshooting_markdown(), end="")
