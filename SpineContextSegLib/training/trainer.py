"""``spinecontextseg train``: the paper's recipe, on real cases and synthetic phantoms.

Defaults follow the paper: BCE + Dice loss, Adam lr 1e-3, batch 4, ReduceLROnPlateau x0.1
after 5 epochs without validation-loss improvement, foreground oversampling (70 % of
patches centred on spine). Added: augmentation (:mod:`SpineContextSegLib.training.augment`), a loss mask for partly
labelled scans, bf16 autocast and channels_last_3d on CPUs that benefit, CUDA, and
PyTorch DDP under ``torchrun`` (gloo on CPU, NCCL on GPUs) for large cohorts.

Two tasks (``--task``):

``spine``
    One output channel (sigmoid), the binary spine mask; loss BCE + Dice.
``vertebrae``
    The second paper's multi-class network: softmax over background + one channel per
    vertebra (:func:`SpineContextSegLib.labels.vertebra_class_ids`: C1-L6, sacrum, T13),
    loss DiceCE (:func:`~SpineContextSegLib.training.losses.masked_dice_ce_loss`). Targets are VerSe ids (TotalSegmentator ids
    mapped by :mod:`SpineContextSegLib.io.datasets`); cases without vertebra ids are skipped.
    VerSe and CTSpine1K never label the sacrum, so on a case whose lowest labelled vertebra
    is L5/L6 and that has no sacrum label, everything below that vertebra is left
    unsupervised (:func:`~SpineContextSegLib.training.data.unsupervise_below_unlabelled_sacrum`) instead of taught as background.

Training data are resampled once onto the canonical grid at ``--spacing`` (default 2 mm:
1 mm costs ~8x more per epoch; see the README's model card) and kept in memory.

This module holds the :class:`Trainer` (model, optimiser, iterations, validation, checkpoints);
the settings are :mod:`SpineContextSegLib.training.config`, the volumes and targets
:mod:`SpineContextSegLib.training.data`, the patches :mod:`SpineContextSegLib.training.patches`,
the losses :mod:`SpineContextSegLib.training.losses` and the command line
:mod:`SpineContextSegLib.training.command`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.training.config import TrainConfig
from SpineContextSegLib.training.data import load_case_volumes, phantom_volume
from SpineContextSegLib.training.losses import loss_for_task, predicted_classes
from SpineContextSegLib.training.patches import cut_to_slab, extract_region, sample_centre


def load_matching_weights(network, state_dict) -> List[str]:
    """Load ``state_dict`` into ``network``, leaving out an output head of another shape.

    Fine-tuning a vertebrae network from spine weights keeps everything but the last 1x1x1
    convolution. Returns the names left out.

    Raises
    ------
    SegmentationError
        ``model_incompatible`` when anything other than the head does not fit.
    """
    own = network.state_dict()
    other_shape = [k for k, v in state_dict.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    skipped = [k for k in other_shape if k.startswith("head.")]
    missing = [k for k in own if k not in state_dict and k not in skipped]
    misfits = [k for k in other_shape if k not in skipped] + missing + [k for k in state_dict if k not in own]
    if misfits:
        raise SegmentationError(
            "model_incompatible",
            f"--init-weights does not fit the network ({len(misfits)} tensors missing, extra or of another shape, e.g. "
            f"{misfits[0]}): pass weights of the same --architecture and --widths.",
        )
    network.load_state_dict({k: v for k, v in state_dict.items() if k not in skipped}, strict=False)
    return skipped


class Trainer:
    """The training loop of one process: :meth:`load_data`, then :meth:`fit` (epochs of :meth:`train_step`, :meth:`validate`, checkpoints)."""

    def __init__(self, config: TrainConfig):
        import torch

        self.config = config
        self.torch = torch
        self._choose_device()
        self._seed()
        self.card = self._model_card()
        self.loss = loss_for_task(config.task)
        self._build_model()
        self._build_optimizer()
        self.history: List[Dict[str, float]] = []
        self.epoch = 0
        self.iterations = 0
        self.best_dice = -1.0
        self.elapsed_s = 0.0

    # ------------------------------------------------------------------ setup
    def _choose_device(self) -> None:
        """Process rank under ``torchrun``, the device (CUDA or CPU), CPU threads and bf16."""
        torch = self.torch
        config = self.config
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        use_cuda = config.device in ("auto", "cuda") and torch.cuda.is_available()
        if config.device == "cuda" and not use_cuda:
            raise SegmentationError("cuda_unavailable", "--device cuda but PyTorch sees no GPU.")
        if self.distributed:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
            if use_cuda:
                torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        else:
            self.device = torch.device("cuda" if use_cuda else "cpu")
        if self.device.type == "cpu" and config.threads:
            torch.set_num_threads(config.threads)
        from SpineContextSegLib.inference.engine import cpu_supports_bf16

        self.bf16 = self.device.type == "cpu" and (config.bf16 == "on" or (config.bf16 == "auto" and cpu_supports_bf16()))

    def _seed(self) -> None:
        """Seed torch (the initial weights), the patch sampler and the augmentation, per rank."""
        torch = self.torch
        config = self.config
        torch.manual_seed(config.seed + self.rank)
        self.rng = np.random.default_rng(config.seed + 1000 * self.rank)
        self.generator = torch.Generator().manual_seed(config.seed + 7 + self.rank)

    def _model_card(self):
        from SpineContextSegLib.inference.model_files import ModelCard
        from SpineContextSegLib.labels import labels_for_task

        config = self.config
        return ModelCard(
            name=f"spinecontextseg-{config.task}",
            version="1.0.0",
            task=config.task,
            architecture=config.architecture,
            architecture_kwargs=dict(config.architecture_kwargs),
            labels=[label.to_json() for label in labels_for_task(config.task)],  # ValueError for an unknown task
            spacing_mm=[config.spacing_mm] * 3,
            hu_window=list(config.hu_window),
            patch_size=list(config.patch_size),
            overlap=0.25,
            trained=True,
        )

    def _build_model(self) -> None:
        """The network (with ``--init-weights``), in its memory format, wrapped in DDP when distributed."""
        from SpineContextSegLib.inference.network import build_network

        torch = self.torch
        config = self.config
        self.network = build_network(config.architecture, out_channels=self.card.out_channels, **config.architecture_kwargs).to(self.device)
        if config.init_weights:
            state = torch.load(config.init_weights, map_location="cpu", weights_only=False)
            skipped = load_matching_weights(self.network, state.get("state_dict", state))
            if skipped and self.rank == 0:
                print(f"--init-weights: output head left at random ({self.card.out_channels} channels here)", flush=True)
        self.memory_format = torch.channels_last_3d if config.channels_last else torch.contiguous_format
        self.network = self.network.to(memory_format=self.memory_format)
        self.model = self.network
        if self.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _build_optimizer(self) -> None:
        """Adam, ReduceLROnPlateau (x0.1 after ``plateau_patience`` epochs) and, on CUDA, a GradScaler."""
        torch = self.torch
        config = self.config
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="min", factor=0.1, patience=config.plateau_patience)
        self.scaler = torch.amp.GradScaler("cuda") if self.device.type == "cuda" else None

    # ------------------------------------------------------------------ data
    def load_data(self) -> None:
        config = self.config
        self._split_cases()
        self.real_probabilities = self._case_probabilities()
        self.phantoms = [phantom_volume(config.seed * 100003 + i + 1000 * self.rank, config) for i in range(config.phantoms)]
        self._next_phantom_seed = config.seed * 100003 + config.phantoms + 1000 * self.rank + 10**6
        if config.validation_phantoms and (config.phantoms or not self.validation):
            self.validation += [phantom_volume(10**8 + config.seed + i, config) for i in range(config.validation_phantoms)]
        if not self.real and not self.phantoms:
            raise SegmentationError("input_not_found", "No training data: pass --data ROOT (VerSe, CTSpine1K, images/labels) and/or --phantoms N.")
        self.validation_batches = self._fixed_validation_patches()

    def _split_cases(self) -> None:
        """The ``--data`` cases, split by patient into ``self.real`` (training) and ``self.validation``."""
        from SpineContextSegLib.io.datasets import patient_level_split

        config = self.config
        cases = load_case_volumes(config) if config.data else []
        if cases:
            train_cases, val_cases = patient_level_split([c for c, _ in cases], config.validation_fraction, config.seed)
            train_ids = {c.case_id for c in train_cases}
            self.real = [v for c, v in cases if c.case_id in train_ids]
            self.validation = [v for c, v in cases if c.case_id not in train_ids]
        else:
            self.real, self.validation = [], []

    def _case_probabilities(self) -> Optional[np.ndarray]:
        """How often each real case is drawn (``--case-weight``)."""
        config = self.config
        weights = np.array([next((w for key, w in config.case_weights.items() if key in v.name), 1.0) for v in self.real], dtype=np.float64)
        # None: uniform draws (the sequence of a run without --case-weight stays as it was)
        return weights / weights.sum() if len(set(weights.tolist())) > 1 else None

    def _fixed_validation_patches(self):
        rng = np.random.default_rng(12345)
        patches = []
        for i in range(self.config.validation_patches if self.validation else 0):
            volume = self.validation[i % len(self.validation)]
            centre = sample_centre(volume, rng, 0.7)
            patches.append(extract_region(volume, centre, self.config.patch_size))
        return patches

    def next_batch(self):
        torch = self.torch
        config = self.config
        # the region the augmented patch samples from: rotation (x1.15) and zoom-out (1 / smallest scale)
        source_factor = 1.15 / min(1.0, config.scale_range[0])
        source = tuple(int(np.ceil(p * source_factor)) if config.augment else p for p in config.patch_size)
        images, labels, weights = [], [], []
        for _ in range(config.batch_size):
            image, label, weight = self._draw_patch(source)
            images.append(image)
            labels.append(label)
            weights.append(weight)
        image = torch.from_numpy(np.stack(images)[:, None])
        label = torch.from_numpy(np.stack(labels)[:, None].astype(np.float32))
        weight = torch.from_numpy(np.stack(weights)[:, None].astype(np.float32))
        if config.augment:
            from SpineContextSegLib.training.augment import AugmentationConfig, augment_batch

            augmentation = AugmentationConfig(scale_range=tuple(config.scale_range))
            image, label, weight = augment_batch(image, label, weight, tuple(config.patch_size), self.generator, config.spacing_mm, augmentation)
        return image, label, weight

    def _draw_patch(self, source):
        """One patch of ``source`` voxels: a phantom or a real case, a centre, maybe a slab cut."""
        config = self.config
        use_phantom = bool(self.phantoms) and (not self.real or self.rng.random() < config.phantom_fraction)
        pool = self.phantoms if use_phantom else self.real
        if use_phantom or self.real_probabilities is None:
            volume = pool[self.rng.integers(len(pool))]
        else:
            volume = pool[self.rng.choice(len(pool), p=self.real_probabilities)]
        image, label, weight = extract_region(volume, sample_centre(volume, self.rng, config.foreground_fraction), source)
        if self.rng.random() < config.slab_probability:
            cut_to_slab(image, weight, self.rng, config.spacing_mm)
        return image, label, weight

    def _refresh_phantom(self) -> None:
        if self.phantoms and self.config.phantom_refresh and self.iterations % self.config.phantom_refresh == 0:
            index = int(self.rng.integers(len(self.phantoms)))
            self.phantoms[index] = phantom_volume(self._next_phantom_seed, self.config)
            self._next_phantom_seed += 1

    # ------------------------------------------------------------------ steps
    def _forward(self, image):
        torch = self.torch
        image = image.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        if self.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.model(image)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return self.model(image)
        return self.model(image)

    def train_step(self) -> float:
        image, label, weight = self.next_batch()
        self.model.train()
        logits = self._forward(image)
        loss = self.loss(logits, label.to(self.device), weight.to(self.device))
        self._optimise(loss)
        self.iterations += 1
        self._refresh_phantom()
        return float(loss.detach())

    def _optimise(self, loss) -> None:
        """Backward pass and optimiser step (through the GradScaler on CUDA)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def validate(self) -> Tuple[float, float]:
        """Mean loss and Dice over the fixed validation patches (vertebrae: mean over the classes present)."""
        torch = self.torch
        if not self.validation_batches:
            return float("nan"), float("nan")
        self.model.eval()
        channels = self.card.out_channels
        classes = max(channels, 2)  # the spine task's one channel is class 1 against background
        losses = []
        intersection, total = np.zeros(classes), np.zeros(classes)
        with torch.no_grad():
            for image, label, weight in self.validation_batches:
                x = torch.from_numpy(image[None, None])
                y = torch.from_numpy(label[None, None].astype(np.float32)).to(self.device)
                w = torch.from_numpy(weight[None, None].astype(np.float32)).to(self.device)
                logits = self._forward(x).float()
                losses.append(float(self.loss(logits, y, w)))
                inside = w[:, 0] > 0
                predicted, target = predicted_classes(logits)[inside], y[:, 0].long()[inside]
                for c in range(1, classes):
                    p, t = predicted == c, target == c
                    intersection[c] += float((p & t).sum())
                    total[c] += float(p.sum() + t.sum())
        scored = total[1:] > 0
        dice = float(np.mean(2 * intersection[1:][scored] / total[1:][scored])) if scored.any() else 1.0
        return float(np.mean(losses)), dice

    # ------------------------------------------------------------------ loop
    def fit(self) -> Optional[str]:
        config = self.config
        os.makedirs(config.output_dir, exist_ok=True)
        if config.resume:
            self.load_checkpoint(config.resume)
        start = time.monotonic() - self.elapsed_s
        best_path = os.path.join(config.output_dir, "best.pt")
        while self.epoch < config.epochs:
            record = self._run_epoch(start)
            if self.rank == 0:
                self._report_epoch(record, best_path)
            if config.max_minutes is not None and self.elapsed_s / 60 >= config.max_minutes:
                break
        return self._finish(best_path)

    def _run_epoch(self, start: float) -> Dict[str, float]:
        """``iterations_per_epoch`` steps, validation and the learning-rate schedule; returns the epoch's record."""
        losses = [self.train_step() for _ in range(self.config.iterations_per_epoch)]
        val_loss, val_dice = self.validate()
        self.epoch += 1
        self.elapsed_s = time.monotonic() - start
        if not np.isnan(val_loss):
            self.scheduler.step(val_loss)
        record = {
            "epoch": self.epoch,
            "iterations": self.iterations,
            "train_loss": float(np.mean(losses)),
            "val_loss": val_loss,
            "val_dice": val_dice,
            "lr": self.optimizer.param_groups[0]["lr"],
            "minutes": round(self.elapsed_s / 60, 2),
        }
        self.history.append(record)
        return record

    def _report_epoch(self, record: Dict[str, float], best_path: str) -> None:
        """Rank 0: print the record, write last.pt (and best.pt when validation Dice improved) and the curve."""
        val_dice = record["val_dice"]
        print(json.dumps(record), flush=True)
        improved = np.isnan(val_dice) or val_dice > self.best_dice  # no validation set: keep the latest
        if improved and not np.isnan(val_dice):
            self.best_dice = val_dice
        self.save_checkpoint(os.path.join(self.config.output_dir, "last.pt"))
        if improved or not os.path.exists(best_path):
            self.save_checkpoint(best_path)
        self.write_curve()

    def _finish(self, best_path: str) -> Optional[str]:
        """Leave the process group, export the best checkpoint (``--export``); rank 0 returns its path."""
        if self.distributed:
            self.torch.distributed.barrier()
            self.torch.distributed.destroy_process_group()
        if self.rank == 0 and self.config.export_dir:
            from SpineContextSegLib.inference.model_files import export_checkpoint

            export_checkpoint(best_path, self.config.export_dir)
        return best_path if self.rank == 0 else None

    # ------------------------------------------------------------------ checkpoints
    def _card_json(self) -> dict:
        config = self.config
        card = dataclasses.replace(self.card)
        card.training_data = describe_training_data(self)
        card.training = {
            "iterations": self.iterations,
            "epochs": self.epoch,
            "minutes": round(self.elapsed_s / 60, 1),
            "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores" + (f", {self.world_size} processes" if self.distributed else ""),
            "device": self.device.type,
            "bf16": self.bf16,
            "best_val_dice": round(self.best_dice, 4),
            "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("resume", "output_dir", "export_dir")},
        }
        return card.to_json()

    def save_checkpoint(self, path: str) -> None:
        from SpineContextSegLib.io.files import atomic_output

        torch = self.torch
        state = {
            "state_dict": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "iterations": self.iterations,
            "history": self.history,
            "best_dice": self.best_dice,
            "elapsed_s": self.elapsed_s,
            "card": self._card_json(),
            "rng": self.rng.bit_generator.state,
            "generator": self.generator.get_state(),
        }
        with atomic_output(path) as temp_path:
            torch.save(state, temp_path)

    def load_checkpoint(self, path: str) -> None:
        state = self.torch.load(path, map_location="cpu", weights_only=False)
        self.network.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.iterations = state["epoch"], state["iterations"]
        self.history, self.best_dice, self.elapsed_s = state["history"], state["best_dice"], state.get("elapsed_s", 0.0)
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])

    def write_curve(self) -> Optional[str]:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        epochs = [h["epoch"] for h in self.history]
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(epochs, [h["train_loss"] for h in self.history], label="train loss")
        left.plot(epochs, [h["val_loss"] for h in self.history], label="validation loss")
        left.set_xlabel("epoch")
        left.set_ylabel("DiceCE loss" if self.config.task == "vertebrae" else "BCE + Dice loss")
        left.legend()
        right.plot(epochs, [h["val_dice"] for h in self.history], color="tab:green")
        right.set_xlabel("epoch")
        right.set_ylabel("validation Dice (patches" + (", mean over vertebrae)" if self.config.task == "vertebrae" else ")"))
        right.set_ylim(0, 1)
        figure.suptitle(f"{self.config.architecture}, {self.config.spacing_mm} mm, patch {tuple(self.config.patch_size)}")
        figure.tight_layout()
        path = os.path.join(self.config.output_dir, "training_curve.png")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path


def describe_training_data(trainer: Trainer) -> str:
    real = sorted({v.name for v in trainer.real})
    parts = []
    if real:
        parts.append(f"{len(real)} real CTs ({', '.join(real)})")
    if trainer.config.phantoms:
        parts.append(f"synthetic phantoms (pool of {trainer.config.phantoms}, refreshed every {trainer.config.phantom_refresh} iterations; {trainer.config.phantom_fraction:.0%} of patches)")
    return "; ".join(parts)
