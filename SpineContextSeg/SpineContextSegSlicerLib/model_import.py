"""Imported models: where they are kept, and importing a model folder after checking it.

The panel's *Import model* button; the copy is then the panel's model path.
"""
from __future__ import annotations

import os

from . import mrml_io


def userModelsDirectory() -> str:
    """Where imported models are kept: ``$SPINECONTEXTSEG_MODELS_DIR`` or ``~/.SpineContextSeg/models``."""
    return os.environ.get("SPINECONTEXTSEG_MODELS_DIR") or os.path.join(os.path.expanduser("~"), ".SpineContextSeg", "models")


def importModel(path: str) -> str:
    """Validate a model folder (or its model.onnx / model.json) and copy it into :func:`userModelsDirectory`.

    Returns the new folder. Raises ``SegmentationError`` (``model_*`` codes) for a bad model.
    """
    import shutil

    from SpineContextSegLib.inference.model_files import CARD_FILE, ONNX_FILE, TORCH_FILE, load_model

    bundle = load_model(path)  # checks model.json and the sha256 of model.onnx
    name = mrml_io.safe_file_name(f"{bundle.card.name}-v{bundle.card.version}") or "model"
    destination = os.path.join(userModelsDirectory(), name)
    if os.path.abspath(destination) == os.path.abspath(bundle.directory):
        return destination
    staging = destination + ".importing"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for filename in (ONNX_FILE, CARD_FILE, TORCH_FILE):
        source = os.path.join(bundle.directory, filename)
        if os.path.isfile(source):
            shutil.copy2(source, os.path.join(staging, filename))
    load_model(staging)  # the copy is intact
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(staging, destination)
    return destination
