"""Model folders: ``model.onnx`` + ``model.json`` (+ ``model.pt`` for the torch engine and fine-tuning,
+ ``model_int8.onnx`` for ``--precision int8``).

``model.json`` is the model card the pipeline runs from:

================  ===============================================================
name, version     identity of the weights
task              ``"spine"`` (binary) or ``"vertebrae"`` (multi-label, VerSe ids)
architecture      ``SpineContextResUNet`` etc. and ``architecture_kwargs``
labels            output channels -> label table (``labels.LabelInfo.to_json``)
spacing_mm        canonical grid spacing, (x, y, z) = (L, P, S) mm
hu_window         HU mapped to [0, 1]
patch_size        tile size in numpy order (D, H, W) = (S, P, L) voxels
overlap           default tile overlap
fine_spacing_mm   optional grid (mm) of a second pass over the column's box
                  (``inference.fine_pass``); absent or null: one pass
threshold         probability threshold for the binary task
onnx_sha256       checksum of model.onnx; loading refuses a mismatch
trained           false for randomly initialised weights (tests, placeholders)
training_data     what it was trained on; ``scores`` what it measured
int8              optional INT8 model (``spinecontextseg quantize``): ``file``, ``sha256``,
                  ``method``, ``calibration``, ``agreement`` = {case: Dice of its int8 mask
                  vs its fp32 mask}; empty when there is none
================  ===============================================================
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib import RESOURCES_DIR
from SpineContextSegLib.io.files import atomic_output

ONNX_FILE = "model.onnx"
CARD_FILE = "model.json"
TORCH_FILE = "model.pt"
INT8_FILE = "model_int8.onnx"
#: ``--precision auto`` uses the INT8 model only if every case in ``card.int8["agreement"]`` reaches this Dice.
INT8_MIN_AGREEMENT_DICE = 0.99
ONNX_OPSET = 17

#: The model that ships with the package.
BUNDLED_MODEL_DIR = os.path.join(RESOURCES_DIR, "models", "spine")


@dataclasses.dataclass
class ModelCard:
    name: str
    version: str
    task: str
    architecture: str
    labels: List[Dict[str, Any]]
    spacing_mm: List[float]
    hu_window: List[float]
    patch_size: List[int]
    overlap: float
    onnx_sha256: str = ""
    architecture_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    threshold: float = 0.5
    fine_spacing_mm: Optional[float] = None
    trained: bool = False
    training_data: str = ""
    training: Dict[str, Any] = dataclasses.field(default_factory=dict)
    scores: Dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: str = ""
    int8: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def out_channels(self) -> int:
        return 1 if self.task == "spine" else len(self.labels) + 1

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "ModelCard":
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}  # type: ignore[misc]
        missing = sorted(required - set(data))
        if missing:
            raise SegmentationError("model_metadata", f"model.json lacks required fields: {', '.join(missing)}. Re-export the model.")
        card = cls(**{k: v for k, v in data.items() if k in names})
        if card.task not in ("spine", "vertebrae") or len(card.spacing_mm) != 3 or len(card.patch_size) != 3 or len(card.hu_window) != 2:
            raise SegmentationError("model_metadata", "model.json has an invalid task, spacing_mm, patch_size or hu_window. Re-export the model.")
        return card


@dataclasses.dataclass
class ModelBundle:
    """A loaded, checksum-verified model folder."""

    directory: str
    card: ModelCard

    @property
    def onnx_path(self) -> str:
        return os.path.join(self.directory, ONNX_FILE)

    @property
    def torch_path(self) -> str:
        return os.path.join(self.directory, TORCH_FILE)

    @property
    def int8_path(self) -> Optional[str]:
        """The INT8 model the card lists (it may be absent on disk), or None when the card lists none."""
        if not self.card.int8.get("file"):
            return None
        return os.path.join(self.directory, os.path.basename(str(self.card.int8["file"])))


def int8_agreement_holds(card: ModelCard, min_dice: float = INT8_MIN_AGREEMENT_DICE) -> bool:
    """True when the card records INT8 agreement on at least one case and every case reaches ``min_dice``."""
    agreement = card.int8.get("agreement") or {}
    try:
        return bool(agreement) and all(float(value) >= min_dice for value in agreement.values())
    except (TypeError, ValueError):  # a hand-edited card: never trust what cannot be read
        return False


def int8_model_available(bundle: ModelBundle) -> bool:
    """True when the card lists an INT8 model with a checksum and the file is there (not hashed: see :func:`verified_int8_path`)."""
    path = bundle.int8_path
    return path is not None and bool(bundle.card.int8.get("sha256")) and os.path.isfile(path)


def verified_int8_path(bundle: ModelBundle) -> str:
    """The INT8 model's path after checking it against the card's sha256.

    Raises ``int8_model_missing`` when the card lists none or the file is absent, and
    ``model_checksum`` when the file does not match the card.
    """
    path = bundle.int8_path
    if path is None or not bundle.card.int8.get("sha256"):
        raise SegmentationError(
            "int8_model_missing",
            f"{bundle.directory} has no INT8 model (model.json lists none). Create one with `spinecontextseg quantize {bundle.directory} -o DIR`, or use --precision fp32.",
        )
    if not os.path.isfile(path):
        raise SegmentationError("int8_model_missing", f"{path} is listed in model.json but missing. Re-copy the model folder, or use --precision fp32.")
    actual = sha256_of_file(path)
    if actual != bundle.card.int8["sha256"]:
        raise SegmentationError(
            "model_checksum",
            f"{path} does not match its model card (sha256 {actual[:12]}… != {str(bundle.card.int8['sha256'])[:12]}…): the file is corrupt or was replaced. Re-copy the model folder.",
        )
    return path


def sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(directory: Optional[str] = None) -> ModelBundle:
    """Load and verify a model folder (default: the bundled model).

    ``directory`` may also be the path of ``model.onnx`` or ``model.json`` itself.
    """
    directory = directory or BUNDLED_MODEL_DIR
    if os.path.isfile(directory) and os.path.basename(directory) in (ONNX_FILE, CARD_FILE):
        directory = os.path.dirname(directory)
    if not os.path.isdir(directory):
        raise SegmentationError("model_not_found", f"Model folder not found: {directory}. Pass --model DIR with model.onnx and model.json.")
    card_path, onnx_path = os.path.join(directory, CARD_FILE), os.path.join(directory, ONNX_FILE)
    if not os.path.isfile(onnx_path):
        raise SegmentationError("model_not_found", f"{directory} has no {ONNX_FILE}. Pass a folder exported by `spinecontextseg export-onnx`.")
    if not os.path.isfile(card_path):
        raise SegmentationError("model_metadata", f"{directory} has no {CARD_FILE} (the model card). Re-export the model.")
    try:
        with open(card_path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        raise SegmentationError("model_metadata", f"{card_path} is not valid JSON. Re-export the model.") from None
    if not isinstance(data, dict):
        raise SegmentationError("model_metadata", f"{card_path} is not a JSON object. Re-export the model.")
    card = ModelCard.from_json(data)
    actual = sha256_of_file(onnx_path)
    if actual != card.onnx_sha256:
        raise SegmentationError(
            "model_checksum",
            f"{onnx_path} does not match its model card (sha256 {actual[:12]}… != {card.onnx_sha256[:12]}…): "
            f"the file is corrupt or was replaced. Re-copy the model folder.",
        )
    return ModelBundle(directory=os.path.abspath(directory), card=card)


def write_card(card: ModelCard, directory: str) -> str:
    path = os.path.join(directory, CARD_FILE)
    with atomic_output(path) as temp_path:
        with open(temp_path, "w", encoding="utf-8") as handle:
            json.dump(card.to_json(), handle, indent=2)
            handle.write("\n")
    return path


def export_model(network, card: ModelCard, directory: str, *, example_shape: Optional[Sequence[int]] = None) -> ModelBundle:
    """Write ``model.onnx`` (probabilities out, dynamic batch and spatial axes), ``model.pt`` and ``model.json``.

    ``network`` is a torch module returning logits; the exported graph ends in sigmoid
    (binary) or softmax (multi-class) so every engine returns probabilities.
    """
    import torch

    from SpineContextSegLib.inference.network import with_output_activation

    os.makedirs(directory, exist_ok=True)
    network = network.eval().float()
    model = with_output_activation(network).eval()
    shape = tuple(example_shape or (1, 1, *card.patch_size))
    example = torch.zeros(shape, dtype=torch.float32)
    onnx_path = os.path.join(directory, ONNX_FILE)
    with atomic_output(onnx_path) as temp_path, torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            temp_path,
            input_names=["image"],
            output_names=["probability"],
            dynamic_axes={"image": {0: "batch", 2: "depth", 3: "height", 4: "width"}, "probability": {0: "batch", 2: "depth", 3: "height", 4: "width"}},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    with atomic_output(os.path.join(directory, TORCH_FILE)) as temp_path:
        torch.save({"state_dict": network.state_dict(), "architecture": card.architecture, "architecture_kwargs": card.architecture_kwargs}, temp_path)
    card.onnx_sha256 = sha256_of_file(onnx_path)
    card.int8 = {}  # an INT8 model quantised from other weights does not describe these
    write_card(card, directory)
    return ModelBundle(directory=os.path.abspath(directory), card=card)


def build_network_from_card(card: ModelCard, state_dict=None):
    """The torch network a card describes, with ``state_dict`` loaded when given."""
    from SpineContextSegLib.inference.network import build_network

    kwargs = dict(card.architecture_kwargs)
    kwargs.setdefault("out_channels", card.out_channels)
    network = build_network(card.architecture, **kwargs)
    if state_dict is not None:
        network.load_state_dict(state_dict)
    return network.eval()


def export_checkpoint(checkpoint_path: str, directory: str, **card_overrides: Any) -> ModelBundle:
    """``spinecontextseg export-onnx``: a training checkpoint -> a model folder.

    The checkpoint is a ``torch.save`` dict with ``state_dict`` (or ``model``) and ``card``
    (a ``ModelCard`` JSON dict, as written by training).
    """
    import torch

    if not os.path.isfile(checkpoint_path):
        raise SegmentationError("model_not_found", f"Checkpoint not found: {checkpoint_path}.")
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    except Exception:  # torch raises many types for a bad file
        raise SegmentationError("model_metadata", f"{checkpoint_path} is not a readable PyTorch checkpoint.") from None
    if not isinstance(checkpoint, dict) or "card" not in checkpoint:
        raise SegmentationError("model_metadata", f"{checkpoint_path} has no model card; it was not written by `spinecontextseg train`.")
    card_data = dict(checkpoint["card"])
    card_data.update(card_overrides)
    card = ModelCard.from_json(card_data)
    state = checkpoint.get("state_dict") or checkpoint.get("model")
    network = build_network_from_card(card, state)
    return export_model(network, card, directory)
