"""``spinecontextseg train``'s command line: the options, ``--case-weight ID=W``, ``--save-volumes`` and the run.

The recipe itself is :class:`SpineContextSegLib.training.trainer.Trainer`.
"""
from __future__ import annotations

import argparse
from typing import Dict, Sequence

from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.training.config import TASKS, TrainConfig
from SpineContextSegLib.training.data import load_case_volumes, save_training_volume
from SpineContextSegLib.training.trainer import Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--data", nargs="*", default=[], help="dataset roots: VerSe (rawdata/derivatives), CTSpine1K, images/+labels/, or case folders")
    parser.add_argument("--task", default=d.task, choices=TASKS, help="spine: binary mask (BCE + Dice); vertebrae: one channel per vertebra (DiceCE)")
    parser.add_argument("--layout", default="auto", help="auto | verse | ctspine1k | images-labels | totalsegmentator | shared")
    parser.add_argument("--exclude", action="append", default=[], help="skip cases whose id or path contains this (repeatable)")
    parser.add_argument("--case-weight", action="append", default=[], metavar="ID=W", help="sample real cases whose id contains ID W times as often as the others (default 1; repeatable)")
    parser.add_argument("--phantoms", type=int, default=d.phantoms, help="synthetic phantom volumes in the training pool")
    parser.add_argument("--phantom-fraction", type=float, default=d.phantom_fraction)
    parser.add_argument("--phantom-refresh", type=int, default=d.phantom_refresh)
    parser.add_argument(
        "--phantom-cortical-hu", type=float, nargs=2, metavar=("LOW", "HIGH"),
        help="draw the phantoms' cortical shell at LOW..HIGH HU (default: the generator's 700..1200; real rims look dimmer on a 2 mm grid)",
    )
    parser.add_argument("--slab-probability", type=float, default=d.slab_probability, help="share of patches cut to a thin slab")
    parser.add_argument("--scale-range", type=float, nargs=2, default=list(d.scale_range), metavar=("LOW", "HIGH"), help="random isotropic zoom of the patches (< 1 shrinks anatomy)")
    parser.add_argument("--validation-fraction", type=float, default=d.validation_fraction)
    parser.add_argument("--validation-phantoms", type=int, default=d.validation_phantoms)
    parser.add_argument("--spacing", type=float, default=d.spacing_mm, help="training grid spacing, mm (isotropic)")
    parser.add_argument("--patch", type=int, nargs=3, default=list(d.patch_size), metavar=("D", "H", "W"))
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.learning_rate)
    parser.add_argument(
        "--plateau-patience", type=int, default=d.plateau_patience,
        help=f"epochs without a better validation loss before the learning rate drops tenfold (default {d.plateau_patience})",
    )
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--iterations-per-epoch", type=int, default=d.iterations_per_epoch)
    parser.add_argument("--architecture", default=d.architecture, choices=("SpineContextResUNet", "ResUNet", "UNet3D"))
    parser.add_argument("--widths", type=int, nargs=3, help="encoder widths (default 16 32 64)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--bf16", default="auto", choices=("auto", "on", "off"), help="CPU bf16 autocast (auto: when the CPU has AVX512-BF16/AMX)")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--max-minutes", type=float, help="stop after the epoch that passes this wall-clock budget")
    parser.add_argument("-o", "--output-dir", default=d.output_dir)
    parser.add_argument("--resume", help="checkpoint (last.pt) to continue from")
    parser.add_argument("--init-weights", help="start from these weights (fine-tuning)")
    parser.add_argument("--export", dest="export_dir", help="export the best checkpoint to this model folder at the end")
    parser.add_argument("--save-volumes", metavar="DIR", help="only resample the --data cases onto the training grid and save them to DIR "
                        "(*.volume.npz; --data DIR reads them back without SimpleITK, e.g. on a GPU machine)")


def _parse_case_weights(items: Sequence[str]) -> Dict[str, float]:
    from SpineContextSegLib.errors import UsageError

    weights = {}
    for item in items:
        key, _, value = item.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not key or not weight > 0:
            raise UsageError(f"--case-weight wants ID=W with a positive W, got {item!r}")
        weights[key] = weight
    return weights


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    kwargs = {}
    if args.widths:
        kwargs["widths"] = list(args.widths)
    return TrainConfig(
        data=list(args.data),
        task=args.task,
        layout=args.layout,
        exclude=list(args.exclude),
        case_weights=_parse_case_weights(args.case_weight),
        phantoms=args.phantoms,
        phantom_fraction=args.phantom_fraction,
        phantom_refresh=args.phantom_refresh,
        phantom_cortical_hu=(min(args.phantom_cortical_hu), max(args.phantom_cortical_hu)) if args.phantom_cortical_hu else None,
        slab_probability=args.slab_probability,
        scale_range=(min(args.scale_range), max(args.scale_range)),
        validation_fraction=args.validation_fraction,
        validation_phantoms=args.validation_phantoms,
        spacing_mm=args.spacing,
        patch_size=tuple(args.patch),
        batch_size=args.batch_size,
        learning_rate=args.lr,
        plateau_patience=args.plateau_patience,
        epochs=args.epochs,
        iterations_per_epoch=args.iterations_per_epoch,
        architecture=args.architecture,
        architecture_kwargs=kwargs,
        seed=args.seed,
        device=args.device,
        bf16=args.bf16,
        channels_last=not args.no_channels_last,
        threads=args.threads,
        max_minutes=args.max_minutes,
        output_dir=args.output_dir,
        resume=args.resume,
        init_weights=args.init_weights,
        export_dir=args.export_dir,
        augment=not args.no_augment,
    )


def run(args: argparse.Namespace) -> int:
    if getattr(args, "save_volumes", None):
        config = config_from_args(args)
        cases = load_case_volumes(config)
        if not cases:
            raise SegmentationError("input_not_found", "--save-volumes: no labelled case found under --data.")
        for _, volume in cases:
            print(f"saved {save_training_volume(volume, args.save_volumes, config)}", flush=True)
        return 0
    trainer = Trainer(config_from_args(args))
    trainer.load_data()
    best = trainer.fit()
    if best:
        print(f"best checkpoint: {best}")
    return 0
