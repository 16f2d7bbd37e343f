"""ONNX int8 with ONNX Runtime's own quantisers, in three methods; ``effir export --int8`` picks one per model.

Every kernel and algorithm is ONNX Runtime's (``onnxruntime.quantization``); this module is glue:

- ``dynamic``: ``quantize_dynamic``: int8 weights per output channel, uint8 activations with one scale per tensor,
  computed per call (``DynamicQuantizeMatMul`` / ``MatMulInteger``). The fastest, and it holds on encoders; but a
  decoder LLM's massive activations (one token's input to a projection hundreds of times a typical token's) set
  that one scale and leave every other token of the batch a few levels.
- ``mixed``: ``dynamic``, except the MatMuls whose input carries massive activations on calibration text (the
  tensor's ``max |x|`` over its median token's RMS above a ratio in ``OUTLIER_RATIOS``, measured by
  :func:`input_ratios`), which become ``blockwise`` MatMuls.
- ``blockwise``: every MatMul with a constant weight becomes ``MatMulNBits`` (``MatMulNBitsQuantizer``: 8-bit
  symmetric weights in blocks of ``BLOCK_SIZE`` input rows) with ``accuracy_level`` 4: the activations are quantised
  to int8 per token and per block at run time, so no token's outliers reach another token's scale.

``METHODS`` lists them fastest first; docs/results/serving-cpu.md has their measured speed and quality.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

METHODS = ("dynamic", "mixed", "blockwise")
BLOCK_SIZE = 32
"""Input rows per ``MatMulNBits`` block: one weight scale and, at accuracy level 4, one activation scale per token."""
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations (CompInt8), quantised per block
OUTLIER_RATIOS = (1000.0, 300.0, 100.0, 30.0, 20.0)
"""``mixed`` makes blockwise the MatMuls whose input's ``max |x|`` exceeds its median token's RMS by one of these,
the largest first, until the embeddings hold: one int8 scale over such a tensor leaves a typical token's values
~127 / ratio levels, a rounding noise of ~ratio / 440 of its RMS."""


def quantize(method: str, src: Path, dst: Path, outliers: list[str] | tuple = (), large: bool = False) -> Path:
    """Write ``src`` quantised by ``method`` to ``dst``.

    ``outliers``: the MatMul nodes ``mixed`` makes ``blockwise``; ``large``: keep the weights beside the ``.onnx``
    (ONNX external data, for graphs near protobuf's 2 GB limit).
    """
    if method == "dynamic":
        return quantize_dynamic(src, dst, large=large)
    if method == "blockwise":
        return quantize_blockwise(src, dst, large=large)
    if method == "mixed":
        tmp = dst.with_name(dst.stem + ".dynamic.onnx")
        try:
            quantize_dynamic(src, tmp, exclude=outliers, large=large)
            return quantize_blockwise(tmp, dst, large=large)
        finally:
            for p in (tmp, tmp.with_name(tmp.name + ".data")):
                p.unlink(missing_ok=True)
    raise ValueError(f"unknown int8 method {method!r}; one of {', '.join(METHODS)}")


def quantize_dynamic(src: Path, dst: Path, exclude: list[str] | tuple = (), large: bool = False) -> Path:
    """ONNX Runtime dynamic quantisation of MatMul / Gemm: int8 weights per output channel, uint8 activations."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    ort_quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=list(exclude),
                         use_external_data_format=large)
    return dst


def quantize_blockwise(src: Path, dst: Path, large: bool = False) -> Path:
    """``MatMulNBits`` 8-bit for every MatMul left with a constant fp32 weight; int8 activations per block."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                          bits=8, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=large)
    return dst


def input_ratios(src: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """For each MatMul with a constant weight in ``src``: its input's ``max |x|`` over its median token's RMS.

    Tokens are those the ``attention_mask`` of each feed keeps; both statistics run over the input's last axis.
    ONNX Runtime runs the graph with ``ReduceMax(Abs(x))`` and ``ReduceMean(x * x)`` outputs added per input tensor
    (``(B, T)`` each), so the statistics describe exactly the tensors a quantiser sees.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(src))
    inputs = _matmul_inputs(model)  # input tensor -> MatMul nodes reading it
    names = _add_token_stats(model, list(inputs))  # per tensor: max |x|, mean x^2
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    stats: dict[str, list[list[np.ndarray]]] = {t: [[], []] for t in inputs}
    with tempfile.TemporaryDirectory(prefix="effir-probe-") as tmp:
        # Through a file with external data, not bytes in memory: protobuf cannot serialise a graph over 2 GB.
        path = Path(tmp) / "probe.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="probe.onnx.data")
        del model
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph_inputs = {i.name for i in session.get_inputs()}
        for feed in feeds:
            outs = session.run(names, {k: v for k, v in feed.items() if k in graph_inputs})
            keep = feed["attention_mask"].astype(bool)  # (B, T)
            for i, tensor in enumerate(inputs):
                for j in (0, 1):
                    out = outs[2 * i + j]
                    stats[tensor][j].append(out[keep] if out.shape == keep.shape else out.reshape(-1))
        del session
    ratios = {}
    for tensor, nodes in inputs.items():
        peak, rms = np.concatenate(stats[tensor][0]).max(), np.sqrt(np.median(np.concatenate(stats[tensor][1])))
        ratios.update({node: float(peak / max(float(rms), 1e-12)) for node in nodes})
    return ratios


def outliers(ratios: dict[str, float], threshold: float) -> list[str]:
    """The MatMul nodes whose input ratio (:func:`input_ratios`) exceeds ``threshold``, largest first."""
    return sorted((n for n, r in ratios.items() if r > threshold), key=lambda n: -ratios[n])


def _matmul_inputs(model) -> dict[str, list[str]]:
    constants = {i.name for i in model.graph.initializer}
    inputs: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in constants:
            inputs.setdefault(node.input[0], []).append(node.name)
    return inputs


def _add_token_stats(model, tensors: list[str]) -> list[str]:
    """Append ``ReduceMax(Abs(t))`` and ``ReduceMean(t * t)`` over the last axis per tensor to ``model``'s outputs
    (opset 18+, where reductions take their axes as an input); return the output names, two per tensor."""
    from onnx import TensorProto, helper, numpy_helper

    axes = "effir_probe_axes"
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), axes))
    names = []
    for i, t in enumerate(tensors):
        absolute, square, peak, mean = (f"effir_probe_{k}_{i}" for k in ("abs", "sq", "max", "ms"))
        model.graph.node.extend([helper.make_node("Abs", [t], [absolute]),
                                 helper.make_node("ReduceMax", [absolute, axes], [peak], keepdims=0),
                                 helper.make_node("Mul", [t, t], [square]),
                                 helper.make_node("ReduceMean", [square, axes], [mean], keepdims=0)])
        model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in (peak, mean))
        names += [peak, mean]
    return names
