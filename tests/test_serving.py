"""Export for serving (ONNX / OpenVINO, fp32 and int8) and the runtimes behind eval / bench (effir.serving).

Equivalence, not smoke: the exported fp32 graph of every architecture in the table, compressed (dropped attention
and MLP sub-layers, an MLP replaced by a map, a narrowed MLP), embeds queries and documents as the torch model does within 1e-4.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from effir import onnx_int8, serving
from effir.arch import get_path, layer_list
from effir.checkpoint import load, save
from effir.cli import main
from effir.surgery import drop_sublayers, replace_mlp, slice_mlp

needs_onnx = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "onnxscript")),
                                reason="onnx, onnxruntime and onnxscript are not installed (pip install 'effir[serve]')")
needs_openvino = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("openvino", "nncf", "onnxscript")),
                                    reason="openvino and nncf are not installed (pip install 'effir[serve]')")
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed (pip install 'effir[quant]')")

QUERIES = ["what is the capital of france", "cat", "how does the virus affect the cell protein and the gene"]
DOCS = [{"title": "paris", "text": "paris is the capital of france and a city on a river"}, "blue", "the sun is a star"]


def _compressed(folder, out):
    """Attention 1 and MLP 0 dropped, MLP 2 replaced by a rank-4 map (effir drop --compensate), MLP 3 narrowed."""
    enc = load(folder, device="cpu", dtype="fp32")
    drop_sublayers(enc.model, enc.adapter, attention=[1], mlp=[0])
    branch = replace_mlp(enc.model, enc.adapter, 2, 4)
    with torch.no_grad():
        for p in branch.parameters():
            p.normal_(0, 0.1)
    slice_mlp(enc.model, enc.adapter, 3, list(range(0, 60, 3)))
    return save(enc, out)


def _embeddings(folder, backend="torch", quantize="none"):
    enc = load(folder, device="cpu", dtype="fp32", padding_side="right")
    enc = serving.apply_variant(enc, backend, quantize)
    return torch.cat([enc.encode(QUERIES, "query", batch_size=2), enc.encode(DOCS, "document", batch_size=2)])


@needs_onnx
def test_onnx_export_equals_torch_on_every_architecture(tiny_model_dir, tmp_path, model_type):
    src = _compressed(tiny_model_dir, tmp_path / "compressed")
    out = tmp_path / "served"
    assert main(["export", str(src), "--format", "onnx", "--int8", "--output", str(out)]) == 0
    assert (out / "onnx" / "model.onnx").exists() and (out / "onnx" / "model_qint8.onnx").exists()
    ref = _embeddings(out)
    got = _embeddings(out, "onnx")
    assert (got - ref).abs().max().item() < 1e-4
    int8 = _embeddings(out, "onnx", "int8")
    assert int8.shape == ref.shape and torch.isfinite(int8).all()
    report = json.loads((out / "export.json").read_text())
    assert report["checks"]["onnx/model.onnx"]["max_abs_diff"] < 1e-4
    # the sentence-transformers files travel with it: prompts intact
    st = json.loads((out / "config_sentence_transformers.json").read_text())
    assert set(st["prompts"]) >= {"query", "document"}


@needs_onnx
def test_an_int8_graph_far_from_the_torch_model_is_exported_with_a_warning(tiny_llama_dir, tmp_path, capsys,
                                                                            monkeypatch):
    from effir.stages import export

    out = tmp_path / "served"
    assert main(["export", str(tiny_llama_dir), "--format", "onnx", "--int8", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    # a tiny random model quantises well, by the fastest method (whether int8 beats fp32 on it is another matter:
    # its speed line may warn)
    assert "embeds the probes at cosine" not in captured.err
    assert "onnx int8 method: dynamic (first <= 0.002" in captured.out
    report = json.loads((out / "export.json").read_text())
    assert report["int8_method"]["method"] == "dynamic" and len(report["int8_method"]["candidates"]) == 1
    cosine = report["checks"]["onnx/model_qint8.onnx"]["min_cosine"]
    monkeypatch.setattr(export, "INT8_MIN_COSINE", cosine + 1e-3)  # as if the model defeated the quantiser
    assert main(["export", str(tiny_llama_dir), "--format", "onnx", "--int8", "--output", str(out),
                 "--overwrite"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "embeds the probes at cosine" in line]
    assert len(warned) == 1 and "onnx/model_qint8.onnx embeds the probes at cosine" in warned[0]
    assert "--quantize int8, against --quantize none" in warned[0] and "onnx/model.onnx" in warned[0]


def _massive(folder, out):
    """A tiny llama with a massive activation, as a decoder LLM's attention-sink token has: layer 0's down projection
    reads ~256 on [UNK] tokens (in every probe and calibration batch) and ~0.01 elsewhere.

    Layer 0 loses its attention, so its MLP reads the embeddings; their dims 0-7 are 1 on [UNK] and 0 on every other
    token, and gate and up neurons 0-31 read only those dims. The other neurons' output is 30x larger, so that losing
    it (what one int8 scale over the tensor does) shows in the embeddings.
    """
    enc = load(folder, device="cpu", dtype="fp32")
    drop_sublayers(enc.model, enc.adapter, attention=[0], mlp=[])
    layer = layer_list(enc.model, enc.adapter)[0]
    with torch.no_grad():
        emb = enc.model.get_input_embeddings().weight
        emb[:, :8] = 0
        emb[enc.tokenizer.convert_tokens_to_ids("a"), :8] = 1
        for name in enc.adapter.up_projs:
            w = get_path(layer, name).weight  # (I, H)
            w[:32] = 0
            w[:32, :8] = 1
        get_path(layer, enc.adapter.down_proj).weight[:, 32:] *= 30
    return save(enc, out)


@needs_onnx
@pytest.mark.parametrize("method", onnx_int8.METHODS)
def test_every_onnx_int8_method_runs_near_fp32(tiny_llama_dir, tmp_path, method):
    out = tmp_path / "served"
    assert main(["export", str(tiny_llama_dir), "--format", "onnx", "--int8", "--int8-method", method,
                 "--output", str(out)]) == 0
    record = json.loads((out / "export.json").read_text())["int8_method"]
    assert record["requested"] == record["method"] == method and [c["method"] for c in record["candidates"]] == [method]
    # distortion: the mean angular error over the spread the model keeps between different documents
    assert 0 < record["document_spread"] < 1
    assert set(record["speed_vs_fp32"]) == {"query", "document"} and min(record["speed_vs_fp32"].values()) > 0
    assert record["distortion"] == pytest.approx((1 - record["mean_cosine"]) / (1 - record["document_spread"]))
    ref, got = _embeddings(out), _embeddings(out, "onnx", "int8")
    assert torch.nn.functional.cosine_similarity(got, ref).min().item() > 0.95


@needs_onnx
def test_auto_int8_avoids_dynamic_on_a_massive_activation(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "served"
    src = _massive(tiny_llama_dir, tmp_path / "massive")
    # The planted activation makes every document embed alike (mean cosine 0.98 between them), so the distortion of
    # even per-block int8 is large against that spread: the pick level is raised to one that still rejects dynamic
    # (distortion > 1 here) to test how the candidates are found and ordered.
    assert main(["export", str(src), "--format", "onnx", "--int8", "--int8-max-distortion", "0.05",
                 "--output", str(out)]) == 0
    record = json.loads((out / "export.json").read_text())["int8_method"]
    first = record["candidates"][0]
    assert first["method"] == "dynamic" and first["distortion"] > 1 and record["distortion"] <= 0.05, record
    # the planted MatMul (only it) is found on calibration text and kept per block; the rest stays dynamic
    assert record["method"] == "mixed" and len(record["blockwise_matmuls"]) == 1, record
    out_line = [line for line in capsys.readouterr().out.splitlines() if "onnx int8 method" in line]
    assert out_line[0].startswith("effir export: onnx int8 method: mixed (>1000x: 1 blockwise) (first <= 0.05")
    ref, got = _embeddings(out), _embeddings(out, "onnx", "int8")
    assert torch.nn.functional.cosine_similarity(got, ref).min().item() > 0.98


@needs_openvino
def test_openvino_export_equals_torch(tiny_llama_dir, tmp_path):
    out = tmp_path / "ov"
    assert main(["export", str(tiny_llama_dir), "--format", "openvino", "--int8", "--calibration-samples", "4",
                 "--output", str(out)]) == 0
    ref = _embeddings(out)
    assert (_embeddings(out, "openvino") - ref).abs().max().item() < 1e-4
    assert torch.isfinite(_embeddings(out, "openvino", "int8")).all()


@needs_onnx
def test_eval_and_bench_on_the_onnx_backend(tiny_llama_dir, tiny_beir, tmp_path):
    out = tmp_path / "served"
    assert main(["export", str(tiny_llama_dir), "--format", "onnx", "--output", str(out)]) == 0
    results = {}
    for backend in ("torch", "onnx"):
        o = tmp_path / f"eval-{backend}"
        assert main(["eval", str(out), "--data", str(tiny_beir), "--output", str(o), "--backend", backend,
                     "--device", "cpu", "--dtype", "fp32"]) == 0
        results[backend] = json.loads((o / "results.json").read_text())
    assert results["onnx"]["metrics"] == pytest.approx(results["torch"]["metrics"], abs=1e-9)
    assert results["onnx"]["fingerprint"] == results["torch"]["fingerprint"] + "-onnx-none"
    assert results["onnx"]["size"]["stored_as"] == "model.onnx"
    bench = tmp_path / "bench"
    assert main(["bench", str(out), "--backend", "onnx", "--baseline", str(tiny_llama_dir), "--output", str(bench),
                 "--query-batch-sizes", "2", "--doc-lengths", "16", "--doc-batch-sizes", "2", "--repeats", "1",
                 "--min-time", "0", "--device", "cpu"]) == 0
    b = json.loads((bench / "bench.json").read_text())
    assert b["models"]["candidate"]["reference"].endswith("[onnx-none]")
    assert b["cells"][0]["predicted_speedup"] == pytest.approx(1.0)


@needs_torchao
def test_torch_int8_keeps_the_embeddings_close(tiny_llama_dir):
    ref = _embeddings(tiny_llama_dir)
    got = _embeddings(tiny_llama_dir, "torch", "int8")
    assert torch.nn.functional.cosine_similarity(got, ref).min().item() > 0.9


@pytest.mark.parametrize("argv, words", [
    (["eval", "{m}", "--data", "{d}", "--quantize", "nf4", "--device", "cpu"], "--quantize nf4 needs a CUDA GPU"),
    (["bench", "{m}", "--quantize", "nf4", "--device", "cpu"], "--quantize nf4 needs a CUDA GPU"),
    (["eval", "{m}", "--data", "{d}", "--backend", "onnx", "--device", "cpu"], "does not exist; write it with"),
    (["bench", "{m}", "--backend", "onnx", "--dtype", "bf16"], "computes in fp32"),
    (["export", "{m}", "--format", "onnx", "--calibration-samples", "0"], "--calibration-samples must be >= 1"),
    (["export", "{m}", "--format", "onnx", "--int8", "--int8-method", "fast"], "--int8-method must be auto or one of"),
    (["export", "{m}", "--format", "onnx", "--int8-method", "mixed"], "chooses the ONNX int8 quantiser: add --int8"),
    (["export", "{m}", "--format", "onnx", "--int8", "--int8-max-distortion", "0"], "--int8-max-distortion must be > 0"),
])
def test_refusals_are_one_line_with_exit_code_2(argv, words, tiny_llama_dir, tiny_beir, tmp_path, capsys):
    if "--backend" in argv or argv[0] == "export":
        pytest.importorskip("onnxruntime", reason="the onnx refusals are checked after the package check")
    argv = [a.format(m=tiny_llama_dir, d=tiny_beir) for a in argv] + ["--output", str(tmp_path / "out")]
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"effir {argv[0]}: error: ") and words in lines[0], lines[0]


def test_nf4_refusal_on_cpu_needs_no_model():
    with pytest.raises(serving.EffirError, match="needs a CUDA GPU"):
        serving.check_variant("torch", "nf4", "cpu", "auto")


def test_document_spread_is_the_mean_cosine_between_different_documents():
    from effir.stages.export import _document_spread

    docs = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])  # cosines 0, 1/sqrt(2), 1/sqrt(2)
    reference = [("query", {}, torch.ones(2, 2)), ("document", {}, docs[:2]), ("document", {}, docs[2:])]
    assert _document_spread(reference) == pytest.approx(2 ** 0.5 / 3)
