"""``spinecontextseg evaluate``: score a model, or saved predictions, against labelled CT.

The score is the slab Dice of ``docs/evaluation.md`` (plus IoU, precision, recall, F1,
HD95 and ASSD in the same slab), with the Dice of a plain HU > 200 threshold beside it
for scale. Results go to stdout as a Markdown table, and optionally to CSV/Markdown files.

A *case* is any object with ``case_id`` (str), ``load() -> (ct_img, label_img)`` and
``load_spine_mask() -> mask_img`` (SimpleITK images on one grid; ``label_img`` is the
per-vertebra label map that places the slab), as :class:`SpineContextSegLib.io.datasets.Case`.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Callable, Iterable, List, Optional, Sequence

from SpineContextSegLib.errors import EXIT_OK, SegmentationError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

#: HU threshold of the reference mask quoted beside every score.
BASELINE_HU = 200.0

#: Row keys in the order written to CSV (extra keys follow in first-seen order).
ROW_KEYS = (
    "case", "dice", "iou", "precision", "recall", "f1", "hd95_mm", "assd_mm",
    "threshold_dice", "seconds", "si_axis", "slab_start", "slab_stop", "tp", "fp", "fn",
)

# Markdown columns: (row key, header, decimals).
_MARKDOWN_COLUMNS = (
    ("dice", "Dice", 3),
    ("iou", "IoU", 3),
    ("precision", "Precision", 3),
    ("recall", "Recall", 3),
    ("hd95_mm", "HD95 (mm)", 1),
    ("assd_mm", "ASSD (mm)", 1),
    ("threshold_dice", f"HU>{BASELINE_HU:g} Dice", 3),
    ("identification_rate", "Identified", 3),
    ("mean_vertebra_dice", "Mean vertebra Dice", 3),
    ("median_vertebra_hd95_mm", "Median vertebra HD95 (mm)", 1),
    ("seconds", "Seconds", 1),
)


def evaluate_cases(
    cases: Iterable[object],
    predict: Callable[["sitk.Image"], "sitk.Image"],
    *,
    use_slab: bool = True,
    include_threshold_baseline: bool = True,
) -> List[dict]:
    """Score ``predict`` on every case.

    Parameters
    ----------
    cases : iterable of case objects
        Each with ``case_id``, ``load() -> (ct_img, label_img)`` and ``load_spine_mask()``.
    predict : callable
        ``predict(ct_img) -> mask_img``: a binary mask (non-zero = spine) on the CT's grid.
    use_slab : bool
        Score inside the labelled slab (default) or, if False, the whole volume.
    include_threshold_baseline : bool
        Also score ``CT > 200 HU`` (Dice only) as ``threshold_dice``.

    Returns
    -------
    list of dict
        One row per case with the keys of :data:`ROW_KEYS`: ``case``, the scores of
        :func:`~SpineContextSegLib.evaluation.metrics.score_masks` flattened (``slab_start``,
        ``slab_stop``, ``tp``, ``fp``, ``fn``), ``threshold_dice`` and ``seconds`` (wall
        time of ``predict``).

    Raises
    ------
    ValueError
        If a prediction is not on its CT's grid or a case has no labelled voxel.
    """
    from SpineContextSegLib.evaluation.metrics import score_masks, threshold_baseline
    from SpineContextSegLib.io.grids import check_same_grid

    rows = []
    for case in cases:
        ct_img, label_img = case.load()
        gt_img = case.load_spine_mask()
        start = time.perf_counter()
        pred_img = predict(ct_img)
        seconds = time.perf_counter() - start
        check_same_grid(pred_img, ct_img, what=f"prediction for {case.case_id}", reference_name="CT")
        scores = score_masks(pred_img, gt_img, slab_labels_img=label_img, use_slab=use_slab)
        row = {"case": str(case.case_id)}
        row.update({key: scores[key] for key in ("dice", "iou", "precision", "recall", "f1", "hd95_mm", "assd_mm")})
        if include_threshold_baseline:
            baseline = score_masks(threshold_baseline(ct_img, BASELINE_HU), gt_img, slab_labels_img=label_img, use_slab=use_slab, surface_distances=False)
            row["threshold_dice"] = baseline["dice"]
        row["seconds"] = seconds
        row["si_axis"] = scores["si_axis"]
        row["slab_start"], row["slab_stop"] = scores["slab"]
        row.update(scores["voxels"])
        rows.append(row)
    return rows


def evaluate_vertebra_cases(cases: Iterable[object], predict: Callable[["sitk.Image"], "sitk.Image"]) -> List[dict]:
    """Score per-vertebra labelling: identification rate (VerSe, 20 mm) and Dice per labelled vertebra.

    ``predict(ct_img)`` returns a VerSe-id label map on the CT's grid. Each row has
    ``identification_rate``, ``mean_vertebra_dice`` (over the ground truth's vertebrae; a
    vertebra that is missing or misnamed scores 0), ``median_vertebra_hd95_mm`` (HD95 of each
    ground-truth vertebra against the predicted label of the same name, ``inf`` where that
    label is missing; the median, so one missing vertebra does not hide the others) and
    ``vertebrae``: ``"L1 0.91 (2.0 mm), L2 ..."`` (Dice and HD95 per vertebra).
    """
    import numpy as np
    import SimpleITK as sitk

    from SpineContextSegLib.labels import vertebra_by_verse_id
    from SpineContextSegLib.evaluation.metrics import identification_rate, per_label_dice, per_label_hd95_mm
    from SpineContextSegLib.io.grids import check_same_grid

    rows = []
    for case in cases:
        ct_img, _ = case.load()
        gt_img = case.load_vertebra_labels()
        if gt_img is None:
            continue
        start = time.perf_counter()
        pred_img = predict(ct_img)
        seconds = time.perf_counter() - start
        check_same_grid(pred_img, ct_img, what=f"prediction for {case.case_id}", reference_name="CT")
        gt = sitk.GetArrayFromImage(gt_img)
        pred = sitk.GetArrayFromImage(pred_img)
        gt_ids = [int(v) for v in np.unique(gt) if v]
        dice = per_label_dice(pred, gt)
        spacing_mm = tuple(reversed(ct_img.GetSpacing()))
        hd95 = per_label_hd95_mm(pred, gt, spacing_mm)
        rate, _ = identification_rate(pred, gt, spacing_mm)
        rows.append(
            {
                "case": str(case.case_id),
                "identification_rate": rate,
                "mean_vertebra_dice": float(np.mean([dice.get(v, 0.0) for v in gt_ids])) if gt_ids else math.nan,
                "median_vertebra_hd95_mm": float(np.median([hd95[v] for v in gt_ids])) if gt_ids else math.nan,
                "seconds": seconds,
                "vertebrae": ", ".join(f"{vertebra_by_verse_id(v).name} {dice.get(v, 0.0):.2f} ({_format(hd95[v], 1)} mm)" for v in gt_ids),
                "predicted": " ".join(vertebra_by_verse_id(int(v)).name for v in np.unique(pred) if v),
            }
        )
    return rows


def _columns(rows: Sequence[dict]) -> List[str]:
    present = {key for row in rows for key in row}
    columns = [key for key in ROW_KEYS if key in present]
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns


def write_csv(rows: Sequence[dict], path: str) -> None:
    """Write one line per case (columns :data:`ROW_KEYS`, full precision; ``nan``/``inf`` as text)."""
    from SpineContextSegLib.io.files import atomic_output

    with atomic_output(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=_columns(rows), restval="")
            writer.writeheader()
            writer.writerows(rows)


def _format(value: object, decimals: int) -> str:
    if value is None:
        return ""
    value = float(value)  # type: ignore[arg-type]
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.{decimals}f}"


def _mean(values: List[float]) -> float:
    """Plain mean: an ``inf`` (a missed mask) shows as ``inf``, a NaN (not measured) as ``n/a``."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    if any(math.isinf(v) for v in values):
        return math.inf
    return math.fsum(values) / len(values)


def markdown_table(rows: Sequence[dict]) -> str:
    """The Markdown table of :func:`write_markdown`: one line per case and a mean line.

    Ratios with 3 decimals, millimetres and seconds with 1; ``n/a`` for NaN (not
    measured), ``inf`` for a distance to an empty mask.
    """
    columns = [(key, header, decimals) for key, header, decimals in _MARKDOWN_COLUMNS if any(key in row for row in rows)]
    lines = [
        "| Case | " + " | ".join(header for _, header, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for row in rows:
        lines.append(f"| {row.get('case', '')} | " + " | ".join(_format(row.get(key), decimals) for key, _, decimals in columns) + " |")
    means = []
    for key, _, decimals in columns:
        values = [float(row[key]) for row in rows if key in row]
        means.append(_format(_mean(values), decimals))
    lines.append(f"| **mean ({len(rows)})** | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[dict], path: Optional[str]) -> str:
    """Write :func:`markdown_table` to ``path`` (skipped when None) and return the text."""
    text = markdown_table(rows)
    if path is not None:
        from SpineContextSegLib.io.files import atomic_output

        with atomic_output(path) as temporary:
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(text)
    return text


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``spinecontextseg evaluate``."""
    parser.add_argument(
        "cases", nargs="+", metavar="CASES",
        help="case folders, dataset roots, or a text file listing such paths (one per line, '#' comments)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--pred-dir", metavar="DIR", help="score existing predictions DIR/<case_id>.nii.gz instead of running a model")
    source.add_argument("--model", metavar="DIR", help="model folder (model.onnx + model.json); default: the bundled model")
    parser.add_argument("--engine", default="auto", choices=("auto", "onnxruntime", "openvino", "torch"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--task", default="spine", choices=("spine", "vertebrae"), help="vertebrae: score vertebra naming (identification rate, Dice per vertebra)")
    parser.add_argument("--threshold", type=float, help="probability threshold (default: the model's); a lever to measure, not a setting to tune per case")
    parser.add_argument("--spacing-mm", type=float, help="isotropic grid the network runs on, mm (default: the model's)")
    parser.add_argument("--fine-spacing-mm", type=float, help="grid of the second pass over the column's box, mm (default: the model's; 0: one pass)")
    parser.add_argument("--overlap", type=float, help="tile overlap in [0, 1) (default: the model's)")
    parser.add_argument("--no-cortical-edge", action="store_true", help="keep the network's outline (a lever to measure; see segment --help)")
    parser.add_argument("--no-slab", action="store_true", help="score the whole volume, not only the slab between the labelled vertebrae")
    parser.add_argument("--csv", metavar="OUT.csv", help="also write one line per case to this CSV file")
    parser.add_argument("--markdown", metavar="OUT.md", help="also write the table to this Markdown file")


def _case_roots(entries: Sequence[str]) -> List[str]:
    """Folders named on the command line, with list files expanded (relative lines are relative to the list)."""
    roots = []
    for entry in entries:
        if not os.path.exists(entry):
            raise SegmentationError("input_not_found", f"Not found: {entry}. Give case folders, dataset roots or a list file.")
        if os.path.isdir(entry):
            roots.append(entry)
            continue
        base = os.path.dirname(os.path.abspath(entry))
        try:
            with open(entry, encoding="utf-8") as handle:
                lines = [line.strip() for line in handle]
        except (OSError, UnicodeDecodeError):
            raise SegmentationError("input_unreadable", f"Cannot read the case list {entry} (expected a text file with one folder per line).") from None
        for line in lines:
            if not line or line.startswith("#"):
                continue
            path = line if os.path.isabs(line) else os.path.join(base, line)
            if not os.path.isdir(path):
                raise SegmentationError("input_not_found", f"{entry} lists {line}, which is not a folder.")
            roots.append(path)
    return roots


def _prediction_reader(pred_dir: str) -> Callable[[object], Callable[["sitk.Image"], "sitk.Image"]]:
    import SimpleITK as sitk

    from SpineContextSegLib.io.grids import GridMismatchError, check_same_grid

    if not os.path.isdir(pred_dir):
        raise SegmentationError("input_not_found", f"Prediction folder not found: {pred_dir}.")

    def for_case(case: object) -> Callable[["sitk.Image"], "sitk.Image"]:
        path = os.path.join(pred_dir, f"{case.case_id}.nii.gz")  # type: ignore[attr-defined]

        def read(ct_img: "sitk.Image") -> "sitk.Image":
            if not os.path.isfile(path):
                raise SegmentationError("input_not_found", f"No prediction for case {case.case_id}: expected {path}.")  # type: ignore[attr-defined]
            try:
                mask = sitk.ReadImage(path)
            except RuntimeError:
                raise SegmentationError("input_unreadable", f"Cannot read the prediction {path}.") from None
            try:
                check_same_grid(mask, ct_img, what=f"prediction {path}", reference_name="CT")
            except GridMismatchError as error:
                raise SegmentationError("input_geometry", str(error)) from None
            return mask

        return read

    return for_case


def run(args: argparse.Namespace) -> int:
    """Run ``spinecontextseg evaluate``; print the Markdown table; return the exit status."""
    from SpineContextSegLib.io.datasets import find_cases
    from SpineContextSegLib.evaluation.metrics import EmptyLabelMapError
    from SpineContextSegLib.io.grids import GridMismatchError

    cases = []
    for root in _case_roots(args.cases):
        cases.extend(find_cases(root))
    if not cases:
        raise SegmentationError("input_not_found", "No labelled cases found in " + ", ".join(args.cases) + ".")

    use_slab = not args.no_slab
    levers = {name: getattr(args, name, None) for name in ("threshold", "spacing_mm", "fine_spacing_mm", "overlap")}
    cortical_edge = not getattr(args, "no_cortical_edge", False)
    if args.pred_dir and (any(value is not None for value in levers.values()) or not cortical_edge):
        raise UsageError("--threshold, --spacing-mm, --fine-spacing-mm, --overlap and --no-cortical-edge change a model run; with --pred-dir the predictions are read as they are")
    if args.pred_dir:
        predict_for = _prediction_reader(args.pred_dir)
    else:
        from SpineContextSegLib.inference.pipeline import SegmentOptions, grid_spacing_problem, load_model_and_engine, segment_image, tile_overlap_problem

        threshold, spacing_mm, fine_spacing_mm, overlap = (levers[name] for name in ("threshold", "spacing_mm", "fine_spacing_mm", "overlap"))
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise UsageError(f"--threshold must be a probability between 0 and 1, got {threshold}")
        for option, problem in (
            ("--overlap", tile_overlap_problem(overlap)), ("--spacing-mm", grid_spacing_problem(spacing_mm)), ("--fine-spacing-mm", grid_spacing_problem(fine_spacing_mm or None)),
        ):
            if problem:
                raise UsageError(f"{option}: {problem}")
        options = SegmentOptions(
            model_dir=args.model, device=args.device, engine=getattr(args, "engine", "auto"), task=getattr(args, "task", "spine"), threshold=threshold, spacing_mm=spacing_mm,
            fine_spacing_mm=fine_spacing_mm, overlap=overlap, cortical_edge=cortical_edge,
        )
        bundle, engine = load_model_and_engine(options)  # once, outside the timed predictions

        def predict(ct_img: "sitk.Image") -> "sitk.Image":
            return segment_image(ct_img, options, bundle=bundle, engine=engine).mask

        def predict_for(case: object) -> Callable[["sitk.Image"], "sitk.Image"]:
            return predict

    rows = []
    for case in cases:
        try:
            if getattr(args, "task", "spine") == "vertebrae":
                rows.extend(evaluate_vertebra_cases([case], predict_for(case)))
            else:
                rows.extend(evaluate_cases([case], predict_for(case), use_slab=use_slab))
        except GridMismatchError as error:
            raise SegmentationError("input_geometry", f"Case {case.case_id}: {error}") from None
        except EmptyLabelMapError as error:
            raise SegmentationError("input_empty", f"Case {case.case_id}: {error}") from None
    if args.pred_dir:
        for row in rows:
            row["seconds"] = math.nan  # reading a file says nothing about the model's speed

    if args.csv:
        write_csv(rows, args.csv)
    text = write_markdown(rows, args.markdown)
    sys.stdout.write(text)
    for row in rows:
        if "vertebrae" in row:
            sys.stdout.write(f"{row['case']}: predicted {row['predicted'] or '-'}; Dice {row['vertebrae']}\n")
    return EXIT_OK
