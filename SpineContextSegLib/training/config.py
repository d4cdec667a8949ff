"""The training recipe's settings: :class:`TrainConfig` (one field per ``train`` option) and the tasks."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

TASKS = ("spine", "vertebrae")  # --task: binary spine mask, or one channel per vertebra


@dataclasses.dataclass
class TrainConfig:
    data: List[str] = dataclasses.field(default_factory=list)
    task: str = "spine"  # "spine" (binary) or "vertebrae" (one channel per vertebra)
    layout: str = "auto"
    exclude: List[str] = dataclasses.field(default_factory=list)
    # relative sampling weight of real cases whose id contains the key (default 1): a case with
    # coarse labels can stay in the mix without dominating it
    case_weights: Dict[str, float] = dataclasses.field(default_factory=dict)
    phantoms: int = 0  # phantom volumes kept in the pool
    phantom_fraction: float = 0.5  # share of patches drawn from phantoms when both kinds exist
    phantom_refresh: int = 25  # replace one pool phantom every N iterations (0: never)
    # (low, high) HU range the phantoms' cortical shell is drawn from (None: the generator's 700-1200)
    phantom_cortical_hu: Optional[Tuple[float, float]] = None
    validation_fraction: float = 0.2
    validation_phantoms: int = 1
    validation_patches: int = 16
    spacing_mm: float = 2.0
    patch_size: Tuple[int, int, int] = (64, 64, 64)
    batch_size: int = 4
    learning_rate: float = 1e-3
    epochs: int = 50
    iterations_per_epoch: int = 100
    plateau_patience: int = 5
    foreground_fraction: float = 0.7
    slab_probability: float = 0.2  # patches cut to a thin slab (few axial slices, or a narrow sagittal reformat)
    scale_range: Tuple[float, float] = (0.7, 1.4)  # = augment.AugmentationConfig's (that module needs torch)
    architecture: str = "SpineContextResUNet"
    architecture_kwargs: Dict[str, object] = dataclasses.field(default_factory=dict)
    hu_window: Tuple[float, float] = (-1000.0, 2000.0)
    seed: int = 0
    device: str = "auto"
    bf16: str = "auto"  # auto | on | off (CPU autocast)
    channels_last: bool = True
    threads: Optional[int] = None
    max_minutes: Optional[float] = None
    output_dir: str = "runs/train"
    resume: Optional[str] = None
    init_weights: Optional[str] = None
    export_dir: Optional[str] = None
    augment: bool = True
