"""``spinecontextseg bench``: the default pipeline against the paper's, stage by stage, in one run.

Variants (each run in its own child process so its peak RSS is its own):

``reference``  the paper's inference rebuilt: the authors' tile rule (``range(0, n-p+stride, stride)
               + [n-p]``, overhanging tiles zero-padded), 64x128x128 tiles, overlap 0.5, Gaussian
               weighting, PyTorch eager fp32, no body crop, threshold 0.5 - with the same weights
               on the same canonical grid as ours (the model's spacing, 2 mm for the shipped model).
``reference-1mm``  the same at the paper's 1 mm grid: the paper's cost. The shipped weights were
               trained at 2 mm, so its mask is not meaningful (its Dice columns are not reported);
               it is timed for the speed-up the issue asks about.
``reference-model-tile``  the paper's pipeline with the model card's tile instead of 64x128x128:
               the mask our speed levers (overlap, tile placement, crop, engine) should reproduce
               when the model was trained on another patch than the paper's.
``default``    exactly what ``spinecontextseg segment`` does.
``default-2mm``  model 1.1.0's default: the same weights on a 2 mm grid, one pass, the network's
               outline kept (1.1.1 runs them at 1.8 mm, and segment now moves the outline to the
               cortex; 1.1.2 adds the fine pass over the column, ``inference.fine_pass``).
``default-one-pass``  1.1.1's default: the coarse pass alone (``--fine-spacing-mm 0``).
``default-all-tiles``  the default running every tile of the body box instead of only the tiles
               that follow the spine: what the default must reproduce. ``--baseline`` (default:
               these two) adds a Dice column against each.
others         engines/precisions/tilings worth showing (see ``VARIANTS``); ``*-avx2`` run OpenVINO
               with its kernels capped at AVX2: a CPU without AVX-512, VNNI or bf16, emulated.

Every variant runs read -> mask -> STL (``--repeat N``: every variant but the reference ones N
times, the fastest run reported). The table reports wall time per stage, total, peak RSS,
speed-up against the reference, Dice against the reference mask and, where a case has labels,
slab Dice against the ground truth.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from SpineContextSegLib import PACKAGE_DIR
from SpineContextSegLib.errors import SegmentationError, UsageError

STAGES = ("read", "preprocess", "network", "stitch", "refine", "postprocess", "write", "mesh")

#: name -> SegmentOptions overrides (``reference`` is special-cased).
VARIANTS: Dict[str, Dict[str, object]] = {
    "reference": {},
    "reference-1mm": {},
    "reference-model-tile": {},
    "default": {},
    "default-2mm": {"spacing_mm": 2.0, "fine_spacing_mm": 0.0, "cortical_edge": False},
    # 1.1.1's default: the coarse pass alone
    "default-one-pass": {"fine_spacing_mm": 0.0},
    "default-all-tiles": {"all_tiles": True},
    "onnxruntime-fp32": {"engine": "onnxruntime", "precision": "fp32"},
    "openvino-fp32": {"engine": "openvino", "precision": "fp32"},
    "openvino-bf16": {"engine": "openvino", "precision": "bf16"},
    # the model folder's model_int8.onnx (`spinecontextseg quantize`)
    "openvino-int8": {"engine": "openvino", "precision": "int8"},
    "onnxruntime-int8": {"engine": "onnxruntime", "precision": "int8"},
    # a laptop CPU without AVX-512, VNNI or bf16, emulated (see VARIANT_ENVIRONMENT)
    "openvino-fp32-avx2": {"engine": "openvino", "precision": "fp32"},
    "openvino-int8-avx2": {"engine": "openvino", "precision": "int8"},
    "torch-fp32": {"engine": "torch", "precision": "fp32"},
    "default-overlap0.5": {"overlap": 0.5},
}
#: Environment of a variant's child: oneDNN (OpenVINO's CPU kernels) capped at plain AVX2, as on
#: a CPU that has no AVX-512, VNNI or bf16. ONNX Runtime's own kernels ignore the cap.
VARIANT_ENVIRONMENT: Dict[str, Dict[str, str]] = {
    "openvino-fp32-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "openvino-int8-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
}
DEFAULT_VARIANTS = ("reference", "default", "default-one-pass", "default-2mm", "default-all-tiles", "onnxruntime-fp32", "openvino-fp32", "openvino-bf16")
DEFAULT_BASELINES = ("default-2mm", "default-all-tiles")
REFERENCE_PATCH = (64, 128, 128)
REFERENCE_OVERLAP = 0.5


def repository_tile_starts(size: int, patch: int, overlap: float) -> List[int]:
    """The authors' start rule; tiles may hang past the far edge (zero-padded there)."""
    stride = int(patch * (1 - overlap))
    return sorted(set(list(range(0, max(size - patch + stride, 1), stride)) + [max(size - patch, 0)]))


def reference_segment(
    input_path: str, output_path: str, stl_path: str, model_dir: Optional[str], threads: Optional[int], spacing_mm: Optional[float] = None,
    *, model_tile: bool = False,
) -> Dict[str, float]:
    """The paper's pipeline (see module docstring); returns stage timings in seconds.

    ``model_tile``: tiles of the model card's patch size instead of the paper's 64x128x128.
    """
    import itertools

    import numpy as np
    import SimpleITK as sitk
    import torch

    from SpineContextSegLib.io.images import read_image, write_labelmap
    from SpineContextSegLib.labels import SPINE
    from SpineContextSegLib.io.meshing import mesh_labelmap_to_stl
    from SpineContextSegLib.inference.model_files import build_network_from_card, load_model
    from SpineContextSegLib.inference.network import with_output_activation
    from SpineContextSegLib.inference.preprocessing import hu_to_unit_interval, resample_to_reference, to_canonical
    from SpineContextSegLib.inference.stitcher import gaussian_importance_map

    timings: Dict[str, float] = {}
    clock = time.perf_counter()
    image = read_image(input_path)
    timings["read"] = time.perf_counter() - clock

    clock = time.perf_counter()
    bundle = load_model(model_dir)
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    state = torch.load(bundle.torch_path, map_location="cpu", weights_only=False)
    model = with_output_activation(build_network_from_card(bundle.card, state["state_dict"])).eval()
    canonical = to_canonical(image, [spacing_mm] * 3 if spacing_mm else bundle.card.spacing_mm)
    volume = hu_to_unit_interval(sitk.GetArrayFromImage(canonical), tuple(bundle.card.hu_window))
    patch = tuple(bundle.card.patch_size) if model_tile else REFERENCE_PATCH
    timings["preprocess"] = time.perf_counter() - clock

    network_s, clock = 0.0, time.perf_counter()
    shape = volume.shape
    starts = [repository_tile_starts(n, p, REFERENCE_OVERLAP) for n, p in zip(shape, patch)]
    padded = tuple(max(s[-1] + p, n) for s, p, n in zip(starts, patch, shape))
    canvas = np.zeros(padded, np.float32)  # 0 = -1000 HU, the authors' padding
    canvas[: shape[0], : shape[1], : shape[2]] = volume
    weights = gaussian_importance_map(patch)
    accumulated = np.zeros(padded, np.float32)
    weight_sum = np.zeros(padded, np.float32)
    with torch.no_grad():
        for corner in itertools.product(*starts):
            tile = tuple(slice(c, c + p) for c, p in zip(corner, patch))
            tick = time.perf_counter()
            probability = model(torch.from_numpy(np.ascontiguousarray(canvas[tile])[None, None]))[0, 0].numpy()
            network_s += time.perf_counter() - tick
            accumulated[tile] += probability * weights
            weight_sum[tile] += weights
    probability = accumulated[: shape[0], : shape[1], : shape[2]] / weight_sum[: shape[0], : shape[1], : shape[2]]
    timings["network"] = network_s
    timings["stitch"] = time.perf_counter() - clock - network_s

    clock = time.perf_counter()
    probability_image = sitk.GetImageFromArray(probability.astype(np.float32))
    probability_image.CopyInformation(canonical)
    on_input = resample_to_reference(probability_image, image, method="linear", pixel_type=sitk.sitkFloat32)
    mask = sitk.Cast(sitk.BinaryThreshold(on_input, 0.5, 1e9, 1, 0), sitk.sitkUInt8)
    timings["postprocess"] = time.perf_counter() - clock

    clock = time.perf_counter()
    write_labelmap(mask, output_path, [SPINE])
    timings["write"] = time.perf_counter() - clock
    clock = time.perf_counter()
    if sitk.GetArrayViewFromImage(mask).any():
        mesh_labelmap_to_stl(mask, stl_path)
    timings["mesh"] = time.perf_counter() - clock
    timings["tiles"] = float(np.prod([len(s) for s in starts]))
    return timings


def run_variant(variant: str, input_path: str, output_path: str, model_dir: Optional[str], threads: Optional[int]) -> Dict[str, object]:
    """Run one variant in this process (the child); returns timings and peak RSS."""
    from SpineContextSegLib.inference.pipeline import SegmentOptions, segment_file

    stl_path = os.path.splitext(output_path)[0] + ".stl"
    start = time.perf_counter()
    if variant.startswith("reference"):
        spacing = 1.0 if variant == "reference-1mm" else None
        timings = reference_segment(input_path, output_path, stl_path, model_dir, threads, spacing, model_tile=variant == "reference-model-tile")
        info: Dict[str, object] = {"engine": "torch eager fp32", "tiles": timings.pop("tiles")}
    else:
        options = SegmentOptions(model_dir=model_dir, threads=threads, **VARIANTS[variant])  # type: ignore[arg-type]
        result = segment_file(input_path, output_path, options, stl_path=stl_path)
        timings = dict(result["timings_s"])  # type: ignore[arg-type]
        info = dict(result["info"])  # type: ignore[arg-type]
    timings["total"] = time.perf_counter() - start
    return {"variant": variant, "timings_s": timings, "peak_rss_mb": peak_rss_mb(), "info": info}


def peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this process's own program, MB (None where it cannot be read).

    Linux: ``VmHWM`` of ``/proc/self/status``. Not ``ru_maxrss``: after fork and exec it keeps
    the parent's memory at the fork, so every variant child of a bench that generated the
    1.4 GB full-size phantom would report at least 1.4 GB.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)  # bytes on macOS, kB elsewhere


def _child(variant: str, input_path: str, output_path: str, model_dir: Optional[str], threads: Optional[int]) -> Dict[str, object]:
    command = [sys.executable, "-m", "SpineContextSegLib.evaluation.bench", "--child", variant, input_path, output_path]
    if model_dir:
        command += ["--model", model_dir]
    if threads:
        command += ["--threads", str(threads)]
    root = os.path.dirname(PACKAGE_DIR)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), **VARIANT_ENVIRONMENT.get(variant, {}))
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        return {"variant": variant, "error": (completed.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def full_size_phantom(path: str, seed: int = 7) -> str:
    """A 512x512x400 CT at 0.78x0.78x1 mm from the phantom generator (timing input, T6 to sacrum, cropped)."""
    import SimpleITK as sitk

    from SpineContextSegLib.phantoms.generator import generate_phantom

    if not os.path.exists(path):
        phantom = generate_phantom(seed, spacing_mm=(0.78125, 0.78125, 1.0), first_level=13, last_level=26, field_of_view="torso")
        ct = phantom.ct
        # pad or crop in-plane to 512x512, as a scanner's reconstruction would
        size = list(ct.GetSize())
        target = [512, 512, min(size[2], 400)]
        lower = [max(0, (t - s) // 2) for s, t in zip(size, target)]
        upper = [max(0, t - s - l) for s, t, l in zip(size, target, lower)]
        ct = sitk.ConstantPad(ct, lower, upper, -1024)
        crop_lo = [max(0, (s - t) // 2) for s, t in zip(ct.GetSize(), target)]
        ct = sitk.RegionOfInterest(ct, target, crop_lo)
        sitk.WriteImage(ct, path, useCompression=True)
        labels = sitk.Resample(phantom.spine_mask, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        sitk.WriteImage(labels, path.replace(".nii.gz", "_label.nii.gz"), useCompression=True)
    return path


def dice_between(a_path: str, b_path: str) -> float:
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(sitk.ReadImage(a_path)) > 0
    b = sitk.GetArrayFromImage(sitk.ReadImage(b_path)) > 0
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def ground_truth_dice(mask_path: str, case) -> Optional[float]:
    """Dice of a variant's mask against ground truth: ``case`` is a data-set case (slab Dice,
    see :func:`metrics.score_masks`), the path of a complete label map (the full-size phantom's:
    whole-volume Dice), or None (no ground truth)."""
    import SimpleITK as sitk

    from SpineContextSegLib.evaluation.metrics import score_masks

    if case is None:
        return None
    if isinstance(case, str):
        scores = score_masks(sitk.ReadImage(mask_path), sitk.ReadImage(case) > 0, use_slab=False, surface_distances=False)
        return float(scores["dice"])
    gt = case.load_spine_mask()
    if gt is None:
        return None
    labels = case.load_vertebra_labels()
    scores = score_masks(sitk.ReadImage(mask_path), gt, slab_labels_img=labels, surface_distances=False)
    return float(scores["dice"])


def format_table(rows: List[Dict[str, object]], baselines: Sequence[str] = DEFAULT_BASELINES) -> str:
    header = ["case", "variant"] + [f"{s} s" for s in STAGES]
    header += ["total s", "peak RSS MB", "speed-up vs ref", "vs 1 mm ref", "Dice vs ref", "Dice vs GT", "Dice vs ref at model tile"]
    header += [f"Dice vs {baseline}" for baseline in baselines]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['case']} | {row['variant']} | failed: {row['error']} |")
            continue
        timings = row["timings_s"]  # type: ignore[index]
        cells = [str(row["case"]), str(row["variant"])]
        cells += [f"{timings.get(stage, 0.0):.2f}" for stage in STAGES]  # type: ignore[union-attr]
        cells += [f"{timings['total']:.2f}", "-" if row.get("peak_rss_mb") is None else f"{row['peak_rss_mb']:.0f}"]  # type: ignore[index]
        cells += [f"{row['speedup']:.1f}x" if row.get("speedup") else "-"]
        cells += [f"{row['speedup_paper']:.0f}x" if row.get("speedup_paper") else "-"]
        cells += [f"{row['dice_ref']:.4f}" if row.get("dice_ref") is not None else "-"]
        cells += [f"{row['dice_gt']:.3f}" if row.get("dice_gt") is not None else "-"]
        cells += [f"{row['dice_ref_tile']:.4f}" if row.get("dice_ref_tile") is not None else "-"]
        against = row.get("dice_baselines", {})
        cells += [f"{against[baseline]:.4f}" if baseline in against else "-" for baseline in baselines]  # type: ignore[operator,index]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", nargs="*", default=[], help="CT files, case folders or dataset roots (labels are used for Dice vs GT)")
    parser.add_argument("--full-size", action="store_true", help="add a 512x512x~400 phantom CT (0.78x0.78x1 mm)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument(
        "--baseline",
        default=",".join(DEFAULT_BASELINES),
        help=f"comma-separated variants whose masks the last columns compare against (default {','.join(DEFAULT_BASELINES)}: model 1.1.0's default and every tile run)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="run each variant but the reference ones N times and report the fastest run (a first run can pay for loading the engine's libraries from disk)",
    )
    parser.add_argument("--model", help="model folder (default: bundled)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--work-dir", help="keep inputs/outputs here (default: a temp folder)")
    parser.add_argument("--markdown", help="also write the table to this file")


def _collect_cases(paths: List[str]):
    from SpineContextSegLib.io.datasets import find_cases

    cases = []
    for path in paths:
        if os.path.isfile(path):
            cases.append((os.path.basename(path), path, None))
            continue
        for case in find_cases(path):
            cases.append((case.case_id, case.image_path, case))
    return cases


def run(args: argparse.Namespace) -> int:
    if args.repeat < 1:
        raise UsageError(f"--repeat must be at least 1, got {args.repeat}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    baselines = [v.strip() for v in args.baseline.split(",") if v.strip()]
    unknown = [v for v in variants + baselines if v not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown variants: {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    from SpineContextSegLib.inference.model_files import load_model

    task = load_model(args.model).card.task
    if task != "spine":  # the reference rebuilds the paper's binary pipeline
        raise SegmentationError("model_incompatible", f"bench compares spine models with the paper's pipeline; this model's task is {task!r}. Use a spine model.")
    work = args.work_dir or tempfile.mkdtemp(prefix="scs-bench-")
    os.makedirs(work, exist_ok=True)
    cases = _collect_cases(args.cases)
    if args.full_size:
        path = full_size_phantom(os.path.join(work, "full_size_phantom.nii.gz"))
        label_path = path.replace(".nii.gz", "_label.nii.gz")
        cases.append(("phantom-512x512x400", path, label_path if os.path.exists(label_path) else None))
    rows = []
    for case_id, image_path, case in cases:
        case_rows = []
        for variant in variants:
            output = os.path.join(work, f"{case_id}__{variant}.nii.gz")
            runs = 1 if variant.startswith("reference") else args.repeat  # the paper's pipelines take minutes
            attempts = [_child(variant, image_path, output, args.model, args.threads) for _ in range(runs)]
            timed = [attempt for attempt in attempts if "error" not in attempt]
            fastest = min(timed, key=lambda attempt: attempt["timings_s"]["total"]) if timed else attempts[-1]  # type: ignore[index]
            row = dict(fastest, case=case_id, output=output)
            print(json.dumps({k: v for k, v in row.items() if k != "info"}), file=sys.stderr, flush=True)
            case_rows.append(row)
        done = {row["variant"]: row for row in case_rows if "error" not in row}
        for row in done.values():
            total = row["timings_s"]["total"]  # type: ignore[index]
            if "reference" in done and row["variant"] != "reference-1mm":
                row["speedup"] = done["reference"]["timings_s"]["total"] / total  # type: ignore[index]
                row["dice_ref"] = dice_between(row["output"], done["reference"]["output"])  # type: ignore[arg-type]
            if "reference-model-tile" in done and row["variant"] != "reference-1mm":
                row["dice_ref_tile"] = dice_between(row["output"], done["reference-model-tile"]["output"])  # type: ignore[arg-type]
            if row["variant"] != "reference-1mm":
                row["dice_baselines"] = {b: dice_between(row["output"], done[b]["output"]) for b in baselines if b in done}  # type: ignore[arg-type]
            if "reference-1mm" in done:
                row["speedup_paper"] = done["reference-1mm"]["timings_s"]["total"] / total  # type: ignore[index]
            if row["variant"] != "reference-1mm":  # 2 mm weights on a 1 mm grid: not a meaningful mask
                row["dice_gt"] = ground_truth_dice(row["output"], case)  # type: ignore[arg-type]
        rows.extend(case_rows)
    table = format_table(rows, baselines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")
    return 0


def _child_main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--model")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    result = run_variant(args.child, args.input, args.output, args.model, args.threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
