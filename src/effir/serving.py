"""Serving runtimes and weight quantisation: ONNX / OpenVINO export (fp32 and int8), and the runtimes behind an
:class:`~effir.encoder.Encoder`, so ``eval`` and ``bench`` measure exactly what a server would run.

Every kernel and algorithm comes from a maintained library; this module is only glue:

- ONNX export: ``torch.onnx.export`` (the dynamo exporter, with onnxscript); the graph maps ``input_ids`` and
  ``attention_mask`` ``(B, T)`` to ``last_hidden_state`` ``(B, T, H)``, the names and layout optimum's exporter
  gives a ``feature-extraction`` model, written as ``onnx/model.onnx`` beside sentence-transformers' files.
  Pooling, normalisation, prompts and EOS stay outside the graph, in the folder's sentence-transformers modules
  and in effir's :class:`~effir.encoder.Encoder`.
- ONNX int8: one of ONNX Runtime's quantisers (:mod:`effir.onnx_int8`: ``dynamic``, what sentence-transformers'
  ``export_dynamic_quantized_onnx_model`` runs through optimum; ``mixed``; ``blockwise`` ``MatMulNBits``)
  -> ``onnx/model_qint8.onnx``.
- OpenVINO: ``openvino.convert_model`` of the ONNX graph -> ``openvino/openvino_model.xml``; int8 by NNCF's
  post-training static quantisation on calibration text (``nncf.quantize``, transformer preset), what
  sentence-transformers' ``export_static_quantized_openvino_model`` runs through optimum-intel
  -> ``openvino/openvino_model_qint8_quantized.xml``.
- torch int8 (``--quantize int8`` on the torch backend): torchao's ``Int8DynamicActivationInt8WeightConfig``.
- torch NF4 (CUDA only): bitsandbytes ``Linear4bit`` with NF4 and double quantisation (the paper's Table 6 setting).

sentence-transformers 6 loads ``backend="onnx"`` / ``"openvino"`` through optimum-onnx / optimum-intel; at the time
of writing neither installs beside transformers 5.x (optimum-onnx 0.1.0 pins transformers < 4.58, optimum-intel
2.2.0 < 5.6 and fails to import on 5.24), so effir runs the exported files with onnxruntime / openvino directly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from .encoder import AsymmetricEncoder
from .utils import EffirError

BACKENDS = ("torch", "onnx", "openvino")
QUANTIZATIONS = ("none", "int8", "nf4")
# (backend, int8) -> file inside an exported folder
SERVED_FILES = {
    ("onnx", False): "onnx/model.onnx",
    ("onnx", True): "onnx/model_qint8.onnx",
    ("openvino", False): "openvino/openvino_model.xml",
    ("openvino", True): "openvino/openvino_model_qint8_quantized.xml",
}
# package (import name) -> pip requirement, per feature
NEEDS = {
    "onnx": {"onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript"},
    "openvino": {"onnx": "onnx", "onnxscript": "onnxscript", "openvino": "openvino", "nncf": "nncf"},
    "int8": {"torchao": "torchao"},
    "nf4": {"bitsandbytes": "bitsandbytes"},
}
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "last_hidden_state"
EXTERNAL_DATA_BYTES = 1 << 30  # larger graphs keep their weights beside the .onnx (protobuf's 2 GB limit)


def require(feature: str, flag: str) -> None:
    """Raise a one-line :class:`EffirError` naming what to install when ``feature``'s packages are missing."""
    missing = [pip for mod, pip in NEEDS[feature].items() if importlib.util.find_spec(mod) is None]
    if missing:
        extra = "serve" if feature in ("onnx", "openvino") else "quant"
        raise EffirError(f"{flag} needs {', '.join(missing)}: pip install {' '.join(missing)} "
                         f"(or pip install 'effir[{extra}]')")


def check_variant(backend: str, quantize: str, device: str | None, dtype: str | None) -> None:
    """Refuse, before any model is loaded, a backend / quantisation this machine or effir cannot run."""
    if backend not in BACKENDS:
        raise EffirError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if quantize not in QUANTIZATIONS:
        raise EffirError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if quantize == "nf4":
        if backend != "torch":
            raise EffirError("--quantize nf4 runs on the torch backend only (bitsandbytes); the exported files "
                             "offer int8")
        if not cuda:
            raise EffirError("--quantize nf4 needs a CUDA GPU (bitsandbytes' NF4 kernels) and this machine has none; "
                             "use --quantize int8 on a CPU")
        require("nf4", "--quantize nf4")
    if backend != "torch":
        require(backend, f"--backend {backend}")
        if device is not None and not str(device).startswith("cpu"):
            raise EffirError(f"--backend {backend} runs on the CPU here; drop --device {device}")
        if dtype not in (None, "auto", "fp32", "float32"):
            raise EffirError(f"--backend {backend} computes in fp32 (int8 with --quantize int8); drop --dtype {dtype}")
    elif quantize == "int8":
        require("int8", "--quantize int8")


def variant_name(backend: str, quantize: str) -> str | None:
    """``None`` for plain torch, else e.g. ``onnx-int8``: the part of a cache key that changes the embeddings."""
    return None if (backend, quantize) == ("torch", "none") else f"{backend}-{quantize}"


# -- applying a variant to a loaded encoder ---------------------------------------------------------------------
def apply_variant(encoder, backend: str, quantize: str, threads: int | None = None):
    """Return ``encoder`` running on ``backend`` with ``quantize`` (the torch model is replaced or quantised).

    For ``onnx`` / ``openvino`` the encoder's model must come from a folder written by ``effir export``; its torch
    model then moves to the ``meta`` device (shapes kept for FLOP counts, memory freed) and is reachable as
    :func:`torch_module` of the new ``encoder.model``.
    """
    if variant_name(backend, quantize) and isinstance(encoder, AsymmetricEncoder):
        raise EffirError(f"{encoder.meta.get('reference')} is a query-side folder; --backend / --quantize serve one "
                         "model: run without them, or export its query route")
    if backend == "torch":
        if quantize == "int8":
            quantize_int8(encoder.model)
        elif quantize == "nf4":
            quantize_nf4(encoder.model)
        return encoder
    folder = Path(encoder.meta.get("path", ""))
    path = folder / SERVED_FILES[(backend, quantize == "int8")]
    if not path.exists():
        fmt = f"--format {backend}" + (" --int8" if quantize == "int8" else "")
        raise EffirError(f"{path} does not exist; write it with: effir export {encoder.meta.get('reference')} "
                         f"{fmt} --output DIR, then pass DIR")
    if encoder.padding_side != "right":
        raise EffirError("served backends need right padding (the graph takes no position ids)")
    runner = OnnxRunner(path, threads) if backend == "onnx" else OpenVinoRunner(path, threads)
    encoder.model = ServedModel(runner, encoder.model.config, encoder.model.to("meta"))
    return encoder


def quantize_int8(model: nn.Module) -> None:
    """torchao: int8 weights per channel and int8 activations quantised per token at run time, in place."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(model, Int8DynamicActivationInt8WeightConfig())


def quantize_nf4(model: nn.Module) -> None:  # pragma: no cover - needs CUDA
    """bitsandbytes NF4 with double quantisation (the paper's Table 6) for every ``nn.Linear``, in place, on CUDA."""
    import bitsandbytes as bnb

    device = next(model.parameters()).device
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(child.weight.data.float().cpu(), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.float().cpu(), requires_grad=False)
            setattr(parent, name, q.to(device))  # moving Params4bit to CUDA quantises it


def size_report(encoder) -> dict:
    """The paper's Table 6 size columns: parameters, their 16-bit size, and what this variant stores."""
    from .surgery import count_parameters

    source = torch_module(encoder.model)
    params = count_parameters(source, encoder.adapter)["total"]
    if isinstance(encoder.model, ServedModel):
        stored, what = files_bytes(encoder.model.runner.path), str(encoder.model.runner.path.name)
    elif any(type(p) is not nn.Parameter and type(p.data) is not torch.Tensor for p in source.parameters()):
        stored, what = serialized_bytes(source), "torch state_dict (quantised)"
    else:
        stored, what = sum(p.numel() * p.element_size() for p in source.parameters()), "torch parameters"
    return {"parameters": params, "bytes_16bit": 2 * params, "bytes_stored": stored, "stored_as": what}


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the stored size, whatever the tensors' (quantised) types."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def files_bytes(path: Path) -> int:
    """Size of a served model file plus the weights stored beside it (``.bin`` / ONNX external data)."""
    related = [path, path.with_suffix(".bin"), path.with_name(path.name + ".data")]
    return sum(p.stat().st_size for p in related if p.exists())


# -- runtimes ----------------------------------------------------------------------------------------------------
class ServedModel(nn.Module):
    """A stand-in for the HF model inside an :class:`~effir.encoder.Encoder` that runs an exported graph.

    ``forward(input_ids, attention_mask, position_ids=None)`` -> an object with ``last_hidden_state`` ``(B, T, H)``
    (float32, CPU). Position ids are not inputs of the graph: under right padding they equal the default ones on
    every token that is pooled. One empty parameter gives the encoder its device (CPU) and dtype (float32).
    """

    def __init__(self, runner, config, source: nn.Module | None = None):
        super().__init__()
        self.runner = runner
        self.config = config
        self._source = (source,)  # a tuple: not registered as a submodule (its parameters live on ``meta``)
        self._anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    @property
    def source(self) -> nn.Module | None:
        return self._source[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids=None, **_):
        feeds = {"input_ids": input_ids.cpu().numpy().astype(np.int64),
                 "attention_mask": attention_mask.cpu().numpy().astype(np.int64)}
        return SimpleNamespace(last_hidden_state=torch.from_numpy(np.ascontiguousarray(self.runner(feeds))))


def torch_module(model: nn.Module) -> nn.Module:
    """The torch model behind ``model`` (its ``meta`` copy for a :class:`ServedModel`), for FLOPs and counts."""
    return model.source if isinstance(model, ServedModel) and model.source is not None else model


class OnnxRunner:
    """An ONNX Runtime CPU session: ``feeds`` -> ``last_hidden_state`` as a numpy array."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.log_severity_level = 3  # errors only: the optimiser's notes are not the user's business
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([OUTPUT], {k: v for k, v in feeds.items() if k in self.inputs})[0]


class OpenVinoRunner:
    """An OpenVINO CPU compiled model (fp32 inference precision; int8 where the graph is quantised)."""

    def __init__(self, path: Path, threads: int | None = None):
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
        self.path = Path(path)
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(OUTPUT)

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.request.infer(feeds)[self.output].copy()


# -- export ------------------------------------------------------------------------------------------------------
class _LastHidden(nn.Module):
    """``(input_ids, attention_mask)`` -> ``last_hidden_state``: the graph an exported folder serves."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_onnx(model: nn.Module, sample: dict[str, torch.Tensor], path: Path) -> Path:
    """Export ``model`` (fp32, CPU, eval) to ONNX at ``path`` with dynamic batch and sequence axes.

    ``sample``: a tokenized batch (right padding, at least two rows of different lengths) to trace with.
    """
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    large = sum(p.numel() * 4 for p in model.parameters()) > EXTERNAL_DATA_BYTES
    with torch.inference_mode(False), torch.no_grad(), _quiet():
        program = torch.onnx.export(_LastHidden(model).eval(), (sample["input_ids"], sample["attention_mask"]),
                                    input_names=list(INPUTS), output_names=[OUTPUT], dynamo=True,
                                    dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                    "attention_mask": {0: batch, 1: seq}}, verbose=False)
    program.save(str(path), external_data=large)
    onnx.checker.check_model(str(path))
    return path


def quantize_onnx_int8(src: Path, dst: Path, method: str = "dynamic", outliers: list[str] | tuple = ()) -> Path:
    """ONNX Runtime int8 by ``method`` (one of :data:`effir.onnx_int8.METHODS`; ``outliers``: see ``mixed``)."""
    from . import onnx_int8

    with _quiet():
        return onnx_int8.quantize(method, src, dst, outliers, large=files_bytes(src) > EXTERNAL_DATA_BYTES)


def onnx_to_openvino(src: Path, dst: Path) -> Path:
    """Convert an ONNX graph to OpenVINO IR (fp32 weights) at ``dst`` (``.xml`` + ``.bin``)."""
    import openvino as ov

    dst.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(src)), str(dst), compress_to_fp16=False)
    return dst


def quantize_openvino_int8(src: Path, dst: Path, batches: list[dict[str, torch.Tensor]]) -> Path:
    """NNCF post-training static quantisation (transformer preset) calibrated on tokenized ``batches``."""
    import nncf
    import openvino as ov

    data = nncf.Dataset([{k: v.numpy().astype(np.int64) for k, v in b.items()} for b in batches])
    with _quiet():
        model = nncf.quantize(ov.Core().read_model(str(src)), data, model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(batches))
    ov.save_model(model, str(dst), compress_to_fp16=False)
    return dst


@contextlib.contextmanager
def _quiet():
    """Hide the exporters' and quantisers' progress prints, warnings and root-logger notes (effir reports the result)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def scratch_dir() -> tempfile.TemporaryDirectory:
    """A temporary folder for intermediate graphs (the ONNX file an OpenVINO export is converted from)."""
    return tempfile.TemporaryDirectory(prefix="effir-export-")
