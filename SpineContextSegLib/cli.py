"""``spinecontextseg``: segment, mesh, export-onnx, quantize, info, train, evaluate, bench.

Exit statuses and error codes: :mod:`SpineContextSegLib.errors` (and the README).
No Python traceback reaches the user unless ``--debug`` is given.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from SpineContextSegLib import RESOURCES_DIR, __version__
from SpineContextSegLib.errors import EXIT_INTERNAL, EXIT_OK, Cancelled, SegmentationError, UsageError

SAMPLE_CT = os.path.join(RESOURCES_DIR, "sample", "ct.nii.gz")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


# ----------------------------------------------------------------------------- segment
def _add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", help="CT file (NIfTI/NRRD/MHA), DICOM folder, folder of CT files, or a .txt list of paths")
    parser.add_argument(
        "-o", "--output", required=True,
        help="mask file (.nii.gz, .nii, .nrrd, .seg.nrrd; .dcm: a DICOM SEG, for a DICOM series input), or a folder (batch, --sample)",
    )
    parser.add_argument("--sample", action="store_true", help="segment the bundled sample CT (abdomen/pelvis, 3 mm)")
    parser.add_argument("--stl", help="also write the surface as binary STL (LPS, mm); with a folder output: write <case>_spine.stl")
    parser.add_argument("--stl-per-label", action="store_true", help="one STL per label (<stem>_<name>.stl, e.g. spine_L4.stl)")
    parser.add_argument("--task", default="spine", choices=("spine", "vertebrae"), help="vertebrae: one label per vertebra (VerSe ids), named C1..L5, Sacrum")
    parser.add_argument("--qc", help="also write a QC picture (PNG, sagittal + coronal with the mask outline)")
    parser.add_argument("--roi", help="also write the spine's bounding box (JSON: LPS mm along the image axes, and voxel indices); with a folder output: <case>_roi.json")
    parser.add_argument("--roi-margin-mm", type=float, default=10.0, help="margin added on every side of the --roi box, mm (default 10)")
    parser.add_argument("--centreline", help="also write the vertebral bodies' centreline and sagittal/coronal curvature (JSON, LPS mm); with a folder output: <case>_centreline.json")
    parser.add_argument("--format", default=".nii.gz", choices=(".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".dcm"), help="mask format when -o is a folder (.dcm: DICOM SEG, DICOM cases only)")
    parser.add_argument("--model", help="model folder (model.onnx + model.json); default: the bundled model")
    parser.add_argument("--engine", default="auto", choices=("auto", "onnxruntime", "openvino", "torch"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16", "int8"),
        help="auto (default): with OpenVINO, bf16 on CPUs with AVX512-BF16/AMX, else int8 when the model folder has model_int8.onnx "
        "whose masks agree with fp32 (Dice >= 0.99 on every case in its card), else fp32; int8: always the INT8 model "
        "(OpenVINO or ONNX Runtime); fp16: torch on CUDA",
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores but one)")
    parser.add_argument("--overlap", type=float, help="tile overlap in [0, 1) (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=1, help="tiles per network call")
    parser.add_argument("--spacing-mm", type=float, help="isotropic grid the network runs on, mm (default: the model's; for comparisons)")
    parser.add_argument(
        "--fine-spacing-mm", type=float,
        help="grid of the second network pass over the column's box, mm (default: the model's, 1.4 for the bundled one; 0: one pass only, faster, "
        "loses upper thoracic bodies on chest CTs)",
    )
    parser.add_argument("--threshold", type=float, help="probability threshold (default: the model's)")
    parser.add_argument("--no-crop", action="store_true", help="run the network on the whole field of view, not only the body")
    parser.add_argument(
        "--all-tiles", action="store_true", help="run every tile of the body instead of only the tiles the spine runs through (the same mask, slower; for comparisons)"
    )
    parser.add_argument(
        "--no-cortical-edge", action="store_true", help="keep the network's outline: do not move it to the bone the CT shows (voxels the network is unsure of, p >= 0.25, that are >= 250 HU; then the cortex, >= 400 HU, one CT voxel beyond)"
    )
    parser.add_argument("--series", help="DICOM SeriesInstanceUID when a folder holds several series")
    parser.add_argument("--progress", default="bar", choices=("bar", "json", "none"))
    parser.add_argument("--cancel-file", help="stop between tiles when this file appears (exit 20, outputs removed)")
    parser.add_argument("--shard", help="batch only: process shard i of n (0 <= i < n), e.g. --shard $SLURM_ARRAY_TASK_ID/8")
    parser.add_argument("--overwrite", action="store_true", help="batch only: redo cases whose output exists")


def _options_from_args(args: argparse.Namespace):
    from SpineContextSegLib.inference.pipeline import SegmentOptions, grid_spacing_problem, tile_overlap_problem

    overlap_problem = tile_overlap_problem(args.overlap)
    if overlap_problem:
        _usage(f"--overlap: {overlap_problem}")
    spacing_problem = grid_spacing_problem(args.spacing_mm)
    if spacing_problem:
        _usage(f"--spacing-mm: {spacing_problem}")
    fine_spacing_problem = grid_spacing_problem(args.fine_spacing_mm or None)
    if fine_spacing_problem:
        _usage(f"--fine-spacing-mm: {fine_spacing_problem} (or 0 for one pass)")
    if not (math.isfinite(args.roi_margin_mm) and args.roi_margin_mm >= 0.0):
        _usage(f"--roi-margin-mm must be a number >= 0 (mm), got {args.roi_margin_mm}")
    return SegmentOptions(
        model_dir=args.model,
        engine=args.engine,
        device=args.device,
        threads=args.threads,
        precision=args.precision,
        overlap=args.overlap,
        spacing_mm=args.spacing_mm,
        fine_spacing_mm=args.fine_spacing_mm,
        batch_size=max(1, args.batch_size),
        threshold=args.threshold,
        crop_to_body=not args.no_crop,
        all_tiles=args.all_tiles,
        cortical_edge=not args.no_cortical_edge,
        task=args.task,
        cancel_file=args.cancel_file,
        series_uid=args.series,
    )


def _usage(message: str):
    raise UsageError(message)


def _case_stem(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_dicom_folder(path: str) -> bool:
    from SpineContextSegLib.io.dicom import dicom_series_ids

    return bool(dicom_series_ids(path))


def _batch_inputs(path: str) -> Optional[List[str]]:
    """The cases of a batch (folder of CT files/DICOM folders, or a .txt list); None for a single case."""
    if os.path.isfile(path) and path.lower().endswith(".txt"):
        base = os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
        return [line if os.path.isabs(line) else os.path.join(base, line) for line in lines]
    if os.path.isdir(path) and not _is_dicom_folder(path):
        entries = sorted(os.listdir(path))
        cases = [os.path.join(path, e) for e in entries if e.lower().endswith(IMAGE_SUFFIXES) and not e.startswith(".")]
        cases += [os.path.join(path, e) for e in entries if os.path.isdir(os.path.join(path, e)) and _is_dicom_folder(os.path.join(path, e))]
        return cases
    return None


def _parse_shard(spec: Optional[str]) -> Tuple[int, int]:
    if not spec:
        return 0, 1
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        _usage(f"--shard must look like i/n, got {spec!r}")
    if not 0 <= index < count:
        _usage(f"--shard i/n needs 0 <= i < n, got {spec!r}")
    return index, count


def _run_segment(args: argparse.Namespace, reporter, stop) -> int:
    from SpineContextSegLib.inference.pipeline import load_model_and_engine, segment_file

    if args.sample:
        if args.input:
            _usage("give either INPUT or --sample, not both")
        args.input = SAMPLE_CT
        if not os.path.splitext(args.output)[1]:  # a folder: write mask, STL and QC picture into it
            os.makedirs(args.output, exist_ok=True)
        if args.qc is None and os.path.isdir(args.output):
            args.qc = os.path.join(args.output, "sample_qc.png")
        if args.stl is None and os.path.isdir(args.output):
            args.stl = os.path.join(args.output, "sample_spine.stl")
    if not args.input:
        _usage("INPUT is required (or --sample)")
    options = _options_from_args(args)
    batch = _batch_inputs(args.input)
    if batch == [] and os.path.isdir(args.input):
        raise SegmentationError("dicom_no_series", f"No DICOM series and no CT files in folder {args.input}. Point to the CT file or the folder holding its .dcm files.")
    if batch is None:
        output, stl, qc = args.output, args.stl, args.qc
        if os.path.isdir(output):
            stem = "sample" if args.sample else _case_stem(args.input)
            output = os.path.join(output, f"{stem}_spine{args.format}")
        result = segment_file(
            args.input, output, options, stl_path=stl, stl_per_label=args.stl_per_label, qc_path=qc, reporter=reporter, stop=stop,
            roi_path=args.roi, roi_margin_mm=args.roi_margin_mm, centreline_path=args.centreline,
        )
        reporter.emit(result)
        if args.progress != "json":
            print(json.dumps(result["outputs"], indent=2))
        return EXIT_OK

    # batch: one model load, resumable, shardable
    if not os.path.isdir(args.output):
        _usage(f"batch input needs -o to be an existing folder, got {args.output}")
    index, count = _parse_shard(args.shard)
    cases = [case for i, case in enumerate(batch) if i % count == index]
    bundle, engine = load_model_and_engine(options)
    failures = 0
    for case in cases:
        stem = _case_stem(case)
        output = os.path.join(args.output, f"{stem}_spine{args.format}")
        if os.path.exists(output) and not args.overwrite:
            reporter.emit({"type": "skipped", "input": case, "output": output, "reason": "output exists"})
            continue
        stl = os.path.join(args.output, f"{stem}_spine.stl") if args.stl else None
        qc = os.path.join(args.output, f"{stem}_qc.png") if args.qc else None
        roi = os.path.join(args.output, f"{stem}_roi.json") if args.roi else None
        centreline = os.path.join(args.output, f"{stem}_centreline.json") if args.centreline else None
        try:
            result = segment_file(
                case, output, options, stl_path=stl, stl_per_label=args.stl_per_label, qc_path=qc, reporter=reporter, stop=stop, bundle=bundle, engine=engine,
                roi_path=roi, roi_margin_mm=args.roi_margin_mm, centreline_path=centreline,
            )
            reporter.emit(result)
        except Cancelled:
            raise
        except SegmentationError as error:
            failures += 1
            reporter.emit({"type": "case_error", "input": case, "code": error.code, "message": error.message})
            if args.progress != "json":
                print(f"{case}: error [{error.code}] {error.message}", file=sys.stderr)
    return EXIT_OK if failures == 0 else 10


# ----------------------------------------------------------------------------- other commands
def _run_mesh(args: argparse.Namespace, reporter, stop) -> int:
    import SimpleITK as sitk

    from SpineContextSegLib.io.images import read_image
    from SpineContextSegLib.io.meshing import mesh_labelmap_to_stl

    if not os.path.exists(args.labelmap):
        raise SegmentationError("input_not_found", f"Label map not found: {args.labelmap}.")
    try:
        labelmap = sitk.ReadImage(args.labelmap)
    except RuntimeError:
        labelmap = read_image(args.labelmap)  # raises the specific input error
    paths = mesh_labelmap_to_stl(labelmap, args.output, per_label=args.per_label, space=args.space, smoothing=args.smoothing, decimation=args.decimation)
    print("\n".join(paths))
    return EXIT_OK


def _run_export(args: argparse.Namespace, reporter, stop) -> int:
    from SpineContextSegLib.inference.model_files import export_checkpoint
    from SpineContextSegLib.inference.pipeline import grid_spacing_problem

    overrides = {}
    if args.patch:
        overrides["patch_size"] = list(args.patch)
    if args.overlap is not None:
        overrides["overlap"] = args.overlap
    if args.threshold is not None:
        overrides["threshold"] = args.threshold
    if args.spacing is not None:
        if args.spacing <= 0:
            raise UsageError(f"--spacing must be a positive number of mm, not {args.spacing}")
        overrides["spacing_mm"] = [float(args.spacing)] * 3
    if args.fine_spacing_mm:
        problem = grid_spacing_problem(args.fine_spacing_mm)
        if problem:
            raise UsageError(f"--fine-spacing-mm: {problem}")
        overrides["fine_spacing_mm"] = float(args.fine_spacing_mm)
    if args.version:
        overrides["version"] = args.version
    bundle = export_checkpoint(args.checkpoint, args.output, **overrides)
    print(f"wrote {bundle.onnx_path} (sha256 {bundle.card.onnx_sha256[:16]}…) and model.json, model.pt")
    return EXIT_OK


def _run_quantize(args: argparse.Namespace, reporter, stop) -> int:
    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError as error:
        raise SegmentationError("engine_missing", f"`quantize` needs onnx and onnxruntime ({error}): pip install onnx onnxruntime.") from None
    from SpineContextSegLib.training.quantize import run

    return run(args)


def _run_info(args: argparse.Namespace, reporter, stop) -> int:
    from SpineContextSegLib.inference.engine import create_engine
    from SpineContextSegLib.inference.model_files import load_model

    bundle = load_model(args.model)
    card = bundle.card
    lines = [
        f"SpineContextSeg {__version__}",
        f"model:       {card.name} {card.version} ({bundle.directory})",
        f"weights:     {'trained' if card.trained else 'RANDOM (untrained placeholder)'}",
        f"task:        {card.task}; labels: {', '.join(l['name'] for l in card.labels)}",
        f"network:     {card.architecture} {card.architecture_kwargs or ''}",
        f"grid:        spacing {card.spacing_mm} mm (x,y,z), patch {card.patch_size} (z,y,x), overlap {card.overlap}",
        f"HU window:   {card.hu_window}",
        f"trained on:  {card.training_data or '-'}",
        f"scores:      {json.dumps(card.scores) if card.scores else '-'}",
    ]
    if card.int8.get("agreement"):
        from SpineContextSegLib.inference.model_files import INT8_MIN_AGREEMENT_DICE, int8_agreement_holds

        lowest = min(float(value) for value in card.int8["agreement"].values())
        verdict = "--precision auto may use it" if int8_agreement_holds(card) else f"below {INT8_MIN_AGREEMENT_DICE}: only with --precision int8"
        lines.append(f"int8:        {card.int8.get('file')}, mask agreement with fp32 >= {lowest:.4f} on {len(card.int8['agreement'])} cases ({verdict})")
    try:
        # what `segment` would run with the same options (precision auto: bf16, int8 or fp32)
        engine = create_engine(bundle, engine=args.engine, device=args.device, precision=args.precision)
        lines.append(f"engine:      {engine.describe()}")
    except SegmentationError as error:
        lines.append(f"engine:      unavailable [{error.code}] {error.message}")
    lines.append(f"cpu cores:   {os.cpu_count()}")
    print("\n".join(lines))
    return EXIT_OK


def _lazy(module: str, function: str) -> Callable:
    def run(args, reporter, stop):
        import importlib

        return importlib.import_module(f"{__package__}.{module}").__dict__[function](args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinecontextseg", description="Fast spine segmentation in CT (SpineContextResUNet).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser("segment", help="segment the spine in a CT (or a batch)")
    _add_segment_arguments(segment)
    segment.set_defaults(run=_run_segment)

    mesh = commands.add_parser("mesh", help="label map -> STL surface")
    mesh.add_argument("labelmap")
    mesh.add_argument("-o", "--output", required=True, help="STL path")
    mesh.add_argument("--per-label", action="store_true")
    mesh.add_argument("--space", default="LPS", choices=("LPS", "RAS"))
    mesh.add_argument("--smoothing", type=float, default=0.5)
    mesh.add_argument("--decimation", type=float, default=0.0)
    mesh.set_defaults(run=_run_mesh)

    export = commands.add_parser("export-onnx", help="training checkpoint -> model folder (model.onnx, model.json, model.pt)")
    export.add_argument("checkpoint")
    export.add_argument("-o", "--output", required=True, help="model folder to write")
    export.add_argument("--patch", type=int, nargs=3, metavar=("D", "H", "W"), help="inference tile recorded in the card (default: the training patch)")
    export.add_argument("--overlap", type=float, help="default tile overlap recorded in the card")
    export.add_argument("--threshold", type=float, help="probability threshold recorded in the card")
    export.add_argument(
        "--spacing", type=float, metavar="MM",
        help="isotropic grid (mm) the model runs on, recorded in the card (default: the training spacing); "
        "a finer grid shows the network larger-looking vertebrae (see docs/model-card.md)",
    )
    export.add_argument(
        "--fine-spacing-mm", type=float, metavar="MM",
        help="grid of the second pass along the column's bodies, recorded in the card (default: none; the bundled model: 1.4, with --spacing 1.8)",
    )
    export.add_argument("--version", help="model version recorded in the card (default: the checkpoint's)")
    export.set_defaults(run=_run_export)

    quantize = commands.add_parser("quantize", help="model folder -> + model_int8.onnx (INT8 for CPUs without bf16), with its mask agreement in model.json")
    from SpineContextSegLib.training.quantize import add_arguments as add_quantize_arguments

    add_quantize_arguments(quantize)
    quantize.set_defaults(run=_run_quantize)

    info = commands.add_parser("info", help="model card, engine and device")
    info.add_argument("--model")
    info.add_argument("--engine", default="auto", choices=("auto", "onnxruntime", "openvino", "torch"))
    info.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    info.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16", "int8"))
    info.set_defaults(run=_run_info)

    for name, module, help_text in (
        ("train", "training.command", "train a model (phantoms, VerSe, CTSpine1K, images/labels folders)"),
        ("evaluate", "evaluation.evaluate", "score a model or predictions against labels (slab Dice, HD95, ...)"),
        ("bench", "evaluation.bench", "time the pipeline against the paper's reference pipeline"),
    ):
        sub = commands.add_parser(name, help=help_text)
        try:
            import importlib

            importlib.import_module(f"{__package__}.{module}").add_arguments(sub)
        except ImportError as error:
            sub.set_defaults(unavailable=str(error))
        sub.set_defaults(run=_lazy(module, "run"))
    return parser


# ----------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None, *, process_exit: bool = False) -> int:
    """Run one command; return its exit status.

    ``process_exit=True`` (the console script and ``python -m`` entry points): the process ends
    right after, so once the outcome is reported a stop signal is ignored. Otherwise the caller's
    signal handlers are restored.
    """
    from SpineContextSegLib.progress import make_reporter
    from SpineContextSegLib.inference.pipeline import StopCheck

    parser = build_parser()
    args = parser.parse_args(argv)
    progress = getattr(args, "progress", "bar")
    reporter = make_reporter(progress)
    stop = StopCheck(getattr(args, "cancel_file", None))

    def on_signal(signum, frame):  # stop cleanly between tiles
        stop.signal_received = True

    if args.command != "segment":  # other commands keep the default: SIGTERM ends them at once
        return _run_command(parser, args, reporter, progress, stop)
    previous_sigterm, previous_sigint = signal.signal(signal.SIGTERM, on_signal), signal.getsignal(signal.SIGINT)
    try:
        return _run_command(parser, args, reporter, progress, stop)
    finally:
        if process_exit:
            # The outcome (result or error line) is reported and the outputs are final: a signal
            # arriving while the interpreter shuts down (Python then restores the default
            # handlers) must not turn a finished run into a death by SIGTERM.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGTERM, previous_sigterm)
            signal.signal(signal.SIGINT, previous_sigint)


def console_main() -> int:
    """The ``spinecontextseg`` console script."""
    return main(process_exit=True)


def _run_command(parser, args, reporter, progress: str, stop) -> int:
    if hasattr(reporter, "started"):
        reporter.started(command=args.command)
    try:
        if getattr(args, "unavailable", None):
            raise SegmentationError("engine_missing", f"`{args.command}` needs optional packages: {args.unavailable}. pip install torch==2.13.0 onnx matplotlib.")
        status = args.run(args, reporter, stop)
    except UsageError as error:
        reporter.close()
        parser.error(str(error))  # exits 2
    except SegmentationError as error:
        reporter.close()
        _report_error(reporter, progress, error.code, error.message, error.exit_status)
        if args.debug:
            raise
        return error.exit_status
    except KeyboardInterrupt:
        reporter.close()
        error = Cancelled("terminated", "Interrupted; no partial output was kept.")
        _report_error(reporter, progress, error.code, error.message, error.exit_status)
        return error.exit_status
    except MemoryError:
        reporter.close()
        error = SegmentationError("out_of_memory", "Out of memory. Close other programs, crop the CT, or use a machine with more memory.")
        _report_error(reporter, progress, error.code, error.message, error.exit_status)
        return error.exit_status
    except Exception as error:  # a bug: say so plainly, traceback only with --debug
        reporter.close()
        if args.debug:
            raise
        message = f"Unexpected internal error ({type(error).__name__}: {str(error)[:300]}). Re-run with --debug and report it."
        _report_error(reporter, progress, "internal", message, EXIT_INTERNAL)
        return EXIT_INTERNAL
    reporter.close()
    return status


def _report_error(reporter, progress: str, code: str, message: str, exit_status: int) -> None:
    if progress == "json":
        reporter.emit({"type": "error", "code": code, "message": message, "exit_status": exit_status})
    else:
        print(f"error [{code}]: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console_main())
