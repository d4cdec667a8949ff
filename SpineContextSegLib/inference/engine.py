"""Inference engines behind one small interface: ``predict(batch) -> probabilities``.

=============  ==========================================================================
onnxruntime    default; CPU, or CUDA when ``onnxruntime-gpu`` and a GPU are present
openvino       optional CPU engine (``pip install openvino``), reads the same model.onnx;
               fastest on x86 CPUs, bf16 on CPUs with AVX512-BF16/AMX when asked
torch          optional; needs ``model.pt`` and PyTorch; CUDA with fp16 when present
=============  ==========================================================================

``engine="auto"`` picks OpenVINO when it is installed and the device is the CPU, else
ONNX Runtime. ``device``: ``auto`` (GPU when usable), ``cpu``, ``cuda``.

``precision``: ``fp32``; ``bf16`` (OpenVINO, torch); ``fp16`` (torch on CUDA); ``int8``: the
model folder's ``model_int8.onnx`` (``spinecontextseg quantize``) on ONNX Runtime or OpenVINO;
``auto``: see :func:`resolve_precision` (OpenVINO only: ``auto`` never picks int8 for ONNX
Runtime, whose int8 3D convolutions are not faster than its fp32 ones on AVX2 CPUs).
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Optional

import numpy as np

from SpineContextSegLib.errors import SegmentationError

if TYPE_CHECKING:  # pragma: no cover
    from SpineContextSegLib.inference.model_files import ModelBundle

ENGINES = ("auto", "onnxruntime", "openvino", "torch")
DEVICES = ("auto", "cpu", "cuda")


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            flags = handle.read()
    except OSError:  # not Linux: stay with fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str, bundle: "Optional[ModelBundle]" = None) -> str:
    """The precision ``auto`` stands for on ``device``; any other ``precision`` is returned as is.

    On the CPU: ``bf16`` where the CPU computes it natively; else ``int8`` when ``bundle``'s
    folder holds the INT8 model and its card records int8-vs-fp32 mask agreement of at least
    :data:`~.model_files.INT8_MIN_AGREEMENT_DICE` Dice on every case; else ``fp32``.
    Elsewhere (CUDA) ``fp32``.
    """
    if precision != "auto":
        return precision
    if device != "cpu":
        return "fp32"
    if cpu_supports_bf16():
        return "bf16"
    if bundle is not None:
        from SpineContextSegLib.inference.model_files import int8_agreement_holds, int8_model_available

        # a folder copied without its int8 file (or with an unproven one) runs fp32, silently
        if int8_model_available(bundle) and int8_agreement_holds(bundle.card):
            return "int8"
    return "fp32"


def default_threads() -> int:
    """Leave one core free for the user's viewer, as Slicer extensions recommend."""
    return max(1, (os.cpu_count() or 2) - 1) if (os.cpu_count() or 1) > 2 else (os.cpu_count() or 1)


class InferenceEngine:
    """``predict(batch)``: ``(B, C_in, D, H, W)`` float32 -> ``(B, C_out, D, H, W)`` float32 probabilities."""

    name = "base"
    device = "cpu"
    precision = "fp32"

    def predict(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} ({self.device}, {self.precision})"

    def cpu_fallback(self) -> "Optional[InferenceEngine]":
        """The same model on the CPU, to finish a run after the GPU ran out of memory; None if there is none."""
        return None


class OnnxRuntimeEngine(InferenceEngine):
    name = "onnxruntime"

    def __init__(self, onnx_path: str, *, device: str = "auto", threads: Optional[int] = None, precision: str = "fp32"):
        """``precision`` only labels the run (``int8`` when ``onnx_path`` is the INT8 model); the file decides."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise SegmentationError("engine_missing", "onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu).") from None
        available = ort.get_available_providers()
        want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        if device == "cuda" and not want_cuda:
            raise SegmentationError("cuda_unavailable", "CUDA was requested but onnxruntime has no CUDA provider here. Use --device cpu or install onnxruntime-gpu.")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(onnx_path, sess_options=options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception classes
            raise SegmentationError("model_incompatible", f"onnxruntime could not load {onnx_path}: {str(error).splitlines()[0][:200]}") from None
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if device == "cuda" and self.device != "cuda":
            raise SegmentationError("cuda_unavailable", "CUDA was requested but could not be initialised (driver or CUDA libraries missing). Use --device cpu.")
        check_model_io(self.session.get_inputs()[0].shape, onnx_path)
        self.input_name = self.session.get_inputs()[0].name
        self.onnx_path, self.threads = onnx_path, threads
        self.precision = "int8" if precision == "int8" else "fp32"  # ONNX Runtime computes fp32 graphs in fp32

    def cpu_fallback(self) -> "Optional[InferenceEngine]":
        return OnnxRuntimeEngine(self.onnx_path, device="cpu", threads=self.threads, precision=self.precision) if self.device == "cuda" else None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


class OpenVinoEngine(InferenceEngine):
    name = "openvino"

    def __init__(self, onnx_path: str, *, threads: Optional[int] = None, precision: str = "fp32"):
        try:
            import openvino as ov
        except ImportError:
            raise SegmentationError("engine_missing", "OpenVINO is not installed: pip install openvino (or use --engine onnxruntime).") from None
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(onnx_path)
        except Exception as error:  # OpenVINO raises RuntimeError with a multi-line dump
            raise SegmentationError("model_incompatible", f"OpenVINO could not read {onnx_path}: {_short_message(error)}") from None
        check_model_io([d.get_length() if d.is_static else None for d in self.model.inputs[0].get_partial_shape()], onnx_path)
        self.precision = precision
        # int8: the Q/DQ pairs of the INT8 file run in int8; what quantize kept fp32 stays f32
        self.config = {"INFERENCE_NUM_THREADS": int(threads or default_threads()), "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        self._compiled = {}

    def compiled_for(self, batch_shape) -> object:
        """The model compiled for inputs of ``batch_shape`` ``(N, 1, D, H, W)``; once per shape (every tile of a run has the same)."""
        batch_shape = tuple(int(n) for n in batch_shape)
        compiled = self._compiled.get(batch_shape)
        if compiled is None:
            model = self.model.clone()
            model.reshape({model.inputs[0].get_any_name(): list(batch_shape)})
            compiled = self.core.compile_model(model, "CPU", self.config)
            self._compiled[batch_shape] = compiled
        return compiled

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.compiled_for(batch.shape)(np.ascontiguousarray(batch, dtype=np.float32))[0]


class TorchEngine(InferenceEngine):
    name = "torch"

    def __init__(self, bundle: "ModelBundle", *, device: str = "auto", threads: Optional[int] = None, precision: str = "fp32"):
        try:
            import torch
        except ImportError:
            raise SegmentationError("engine_missing", "PyTorch is not installed: pip install torch==2.13.0 (or use --engine onnxruntime).") from None
        from SpineContextSegLib.inference.model_files import build_network_from_card
        from SpineContextSegLib.inference.network import with_output_activation

        if not os.path.isfile(bundle.torch_path):
            raise SegmentationError("model_not_found", f"{bundle.directory} has no model.pt; the torch engine needs it (use --engine onnxruntime).")
        if device == "cuda" and not torch.cuda.is_available():
            raise SegmentationError("cuda_unavailable", "CUDA was requested but PyTorch sees no GPU. Use --device cpu.")
        self.device = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(threads or default_threads())
        state = torch.load(bundle.torch_path, map_location="cpu", weights_only=False)
        network = build_network_from_card(bundle.card, state["state_dict"])
        self.model = with_output_activation(network).eval().to(self.device)
        self.precision = "fp16" if self.device == "cuda" and precision != "fp32" else precision
        self.torch = torch

    def cpu_fallback(self) -> "Optional[InferenceEngine]":
        """This engine, moved to the CPU (fp32) for the rest of its life: the weights are already in memory."""
        if self.device != "cuda":
            return None
        self.model = self.model.float().to("cpu")
        self.device, self.precision = "cpu", "fp32"
        self.torch.cuda.empty_cache()
        return self

    def predict(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            if self.precision in ("bf16", "fp16"):
                dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
                with torch.autocast(device_type=self.device, dtype=dtype):
                    y = self.model(x)
            else:
                y = self.model(x)
            return y.float().cpu().numpy()


def _short_message(error: BaseException) -> str:
    """The last non-empty line of an engine's multi-line error dump (where the reason is), at most 200 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


#: Substrings of the messages engines raise when memory runs out (CUDA, cuDNN, ONNX Runtime's arena, C++).
_OUT_OF_MEMORY_TEXT = ("out of memory", "failed to allocate memory", "cudaerrormemoryallocation", "cuda_error_out_of_memory", "bad_alloc", "cudnn_status_alloc_failed")


def is_out_of_memory(error: BaseException) -> bool:
    """True for the out-of-memory errors of any engine (``MemoryError``, ``torch.cuda.OutOfMemoryError``, ORT's ``Fail``)."""
    if isinstance(error, MemoryError) or "outofmemory" in type(error).__name__.lower():
        return True
    text = str(error).lower()
    return any(fragment in text for fragment in _OUT_OF_MEMORY_TEXT)


def cpu_engine_after_failure(engine: InferenceEngine, error: BaseException) -> Optional[InferenceEngine]:
    """What to do when ``engine.predict`` raised ``error``.

    Returns the engine to retry on (the CPU) after a GPU out-of-memory error; None when
    ``error`` is not about memory (the caller re-raises it); raises ``out_of_memory`` when
    memory ran out with no CPU to fall back to.
    """
    if not is_out_of_memory(error):
        return None
    fallback = engine.cpu_fallback() if engine.device != "cpu" else None
    if fallback is None:
        where = "the GPU" if engine.device != "cpu" else "this machine"
        raise SegmentationError("out_of_memory", f"The network ran out of memory on {where}. Close other programs, lower --batch-size, or crop the CT.")
    return fallback


def check_model_io(input_shape, onnx_path: str) -> None:
    if len(input_shape) != 5 or input_shape[1] != 1:
        raise SegmentationError(
            "model_incompatible",
            f"{onnx_path} expects input shape {list(input_shape)}; SpineContextSeg models take one CT channel (N, 1, D, H, W).",
        )


def onnxruntime_has_cuda() -> bool:
    """Whether ONNX Runtime was built with CUDA (cheap: no session is created)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def create_engine(
    bundle: "ModelBundle", *, engine: str = "auto", device: str = "auto", threads: Optional[int] = None, precision: str = "fp32"
) -> InferenceEngine:
    """Build the engine for a verified model folder (see module docstring for the choices).

    ``precision="int8"`` (asked for, or what ``auto`` resolved to) runs the folder's
    checksum-verified ``model_int8.onnx`` instead of ``model.onnx``.
    """
    if engine not in ENGINES:
        raise SegmentationError("engine_missing", f"Unknown engine {engine!r}; choose one of {', '.join(ENGINES)}.")
    if device not in DEVICES:
        raise SegmentationError("cuda_unavailable", f"Unknown device {device!r}; choose auto, cpu or cuda.")
    if engine == "torch":
        if precision == "int8":
            raise SegmentationError("int8_model_missing", "The torch engine has no INT8 model; use --engine openvino or onnxruntime with --precision int8.")
        return TorchEngine(bundle, device=device, threads=threads, precision=precision if precision != "auto" else "fp32")
    if engine == "openvino":
        if device == "cuda":
            raise SegmentationError("cuda_unavailable", "The OpenVINO engine runs on the CPU; use --engine onnxruntime or torch for CUDA.")
        return _openvino(bundle, threads, resolve_precision(precision, "cpu", bundle))
    if engine == "auto":
        if device == "cuda" or (device == "auto" and onnxruntime_has_cuda()):
            return _onnxruntime(bundle, device, threads, precision)
        try:
            import openvino  # noqa: F401
        except ImportError:
            return _onnxruntime(bundle, "cpu", threads, precision)
        return _openvino_or_onnxruntime(bundle, threads, precision)
    return _onnxruntime(bundle, device, threads, precision)


def _openvino_or_onnxruntime(bundle: "ModelBundle", threads: Optional[int], precision: str) -> InferenceEngine:
    """OpenVINO, compiled for the model's tile before any work; ONNX Runtime if OpenVINO cannot run here.

    OpenVINO is installed by default, also on CPUs and systems it may not support: with
    ``engine="auto"`` a failure to read or compile the model must cost speed, not the run.
    A bad model file still fails (ONNX Runtime refuses it too, with a clear error).
    """
    resolved = resolve_precision(precision, "cpu", bundle)
    try:
        engine = _openvino(bundle, threads, resolved)
        engine.compiled_for((1, 1, *bundle.card.patch_size))  # where OpenVINO fails; kept for the run's tiles
        return engine
    except SegmentationError as error:
        if error.code in ("model_checksum", "int8_model_missing"):
            raise
        reason = error.message
    except Exception as error:  # OpenVINO raises RuntimeError with a multi-line dump
        reason = _short_message(error)
    logging.getLogger(__name__).warning("OpenVINO cannot run the model here (%s); using ONNX Runtime.", reason)
    return _onnxruntime(bundle, "cpu", threads, precision)


def _model_path(bundle: "ModelBundle", precision: str) -> str:
    """``model_int8.onnx`` (verified against the card) for ``int8``, else ``model.onnx``."""
    if precision != "int8":
        return bundle.onnx_path
    from SpineContextSegLib.inference.model_files import verified_int8_path

    return verified_int8_path(bundle)


def _openvino(bundle: "ModelBundle", threads: Optional[int], precision: str) -> OpenVinoEngine:
    return OpenVinoEngine(_model_path(bundle, precision), threads=threads, precision=precision)


def _onnxruntime(bundle: "ModelBundle", device: str, threads: Optional[int], precision: str) -> OnnxRuntimeEngine:
    # auto never means int8 here (no bundle passed): ONNX Runtime's int8 3D convolutions were
    # no faster than its fp32 ones on an AVX2 CPU; --precision int8 still runs the INT8 file
    resolved = resolve_precision(precision, "cpu" if device == "cpu" else "cuda")
    return OnnxRuntimeEngine(_model_path(bundle, resolved), device=device, threads=threads, precision=resolved)
