import json
import re

import pytest
import torch

import effir
from effir import checkpoint, timing
from effir.cli import main
from effir.surgery import drop_sublayers

# tiny llama (conftest.TINY): per token and layer, attention projections 2*(32*32 + 2*32*16 + 32*32) = 6144 FLOPs,
# MLP 2*3*32*64 = 12288; attention matmuls 2*2*T*T*4*8 = 128*T*T per layer. Dropping 2 of 4 MLPs:
ATTN_LIN, MLP_LIN, ATT = 6144, 12288, 128


def hand_flops(T, mlps):
    return T * (4 * ATTN_LIN + mlps * MLP_LIN) + 4 * ATT * T * T


GRID = ["--query-length", "8", "--doc-lengths", "16,32", "--query-batch-sizes", "1,4", "--doc-batch-sizes", "2",
        "--repeats", "2", "--max-repeats", "2", "--min-time", "0", "--warmup", "0", "--device", "cpu",
        "--dtype", "fp32"]


@pytest.fixture(scope="module")
def dropped_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny llama with the MLPs of layers 1 and 3 dropped, saved as an effir model folder."""
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    drop_sublayers(enc.model, enc.adapter, mlp=[1, 3])
    return checkpoint.save(enc, tmp_path_factory.mktemp("dropped") / "model")


def _check_schema(result, with_baseline):
    assert result["format"] == 1
    env = result["environment"]
    for key in ("device", "device_name", "dtype", "threads", "torch", "transformers", "compile", "warmup",
                "min_repeats", "max_repeats", "min_time_s", "seed", "query_source"):
        assert key in env, key
    for key in ("timed", "flops_method", "memory_method"):
        assert isinstance(result[key], str) and result[key]
    assert "tokenization excluded" in result["timed"]
    names = ["candidate", "baseline"] if with_baseline else ["candidate"]
    assert list(result["models"]) == names
    for m in result["models"].values():
        assert set(m["parameters"]) == {"total", "without_embeddings"}
        assert set(m["structure"]) == {"layers", "attention", "mlp", "mlp_width"}
        assert m["parameter_bytes"] > 0 and m["reference"]
    for cell in result["cells"]:
        assert cell["side"] in ("query", "document") and cell["batch_size"] >= 1 and cell["seq_len"] >= 2
        for name in names:
            m = cell[name]
            assert set(m) == {"latency_ms", "repeats", "sequences_per_s", "tokens_per_s", "flops_per_sequence",
                              "tflops_per_s", "peak_memory_bytes"}
            assert set(m["latency_ms"]) == {"median", "p95", "min"}
            assert 0 < m["latency_ms"]["min"] <= m["latency_ms"]["median"] <= m["latency_ms"]["p95"]
            assert m["sequences_per_s"] == pytest.approx(cell["batch_size"] / m["latency_ms"]["median"] * 1e3)
            assert m["peak_memory_bytes"] > result["models"][name]["parameter_bytes"]
        assert ("speedup" in cell) == with_baseline
        if with_baseline:
            assert cell["speedup"] == pytest.approx(
                cell["baseline"]["latency_ms"]["median"] / cell["candidate"]["latency_ms"]["median"])
            assert cell["efficiency"] == pytest.approx(cell["speedup"] / cell["predicted_speedup"])


@pytest.mark.both_cpu_paths
def test_bench_against_baseline(tmp_path, dropped_dir, tiny_llama_dir, capsys):
    out = tmp_path / "bench"
    assert main(["bench", str(dropped_dir), "--baseline", str(tiny_llama_dir), "--output", str(out), *GRID]) == 0
    result = json.loads((out / "bench.json").read_text())
    _check_schema(result, with_baseline=True)
    cells = [(c["side"], c["seq_len"], c["batch_size"]) for c in result["cells"]]
    assert cells == [("query", 8, 1), ("query", 8, 4), ("document", 16, 2), ("document", 32, 2)]
    for c in result["cells"]:
        T = c["seq_len"]
        assert c["candidate"]["flops_per_sequence"] == hand_flops(T, mlps=2)
        assert c["baseline"]["flops_per_sequence"] == hand_flops(T, mlps=4)
        assert c["predicted_speedup"] == pytest.approx(hand_flops(T, 4) / hand_flops(T, 2))
        assert c["candidate"]["repeats"] == c["baseline"]["repeats"] == 2
        assert c["candidate"]["tokens_per_s"] == pytest.approx(c["candidate"]["sequences_per_s"] * T)
    # 41,248 parameters in the tiny llama; each dropped MLP takes 3*32*64 weights and its 32-wide norm
    assert result["models"]["baseline"]["parameters"] == {"total": 41248, "without_embeddings": 41248 - 128 * 32}
    assert result["models"]["candidate"]["parameters"]["total"] == 41248 - 2 * (3 * 32 * 64 + 32)
    assert result["models"]["candidate"]["structure"] == {"layers": 4, "attention": 4, "mlp": 2, "mlp_width": 128}
    assert {s: v["cells"] for s, v in result["summary"].items()} == {"query": 2, "document": 2}
    printed = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"query side: \d+\.\d\dx (faster|the speed \(slower\)) \(FLOPs predict 1\.\d\dx, "
                        r"efficiency \d+\.\d\d; geometric mean over 2 cells\)", printed[0])
    assert printed[1].startswith("document side: ")
    md = (out / "bench.md").read_text()
    assert sum(line.startswith(("| query |", "| document |")) for line in md.splitlines()) == 4
    assert "efficiency" in md and "tokenization excluded" in md


def test_a_query_side_model_is_timed_against_its_parent_route_by_route(tmp_path, dropped_dir, tiny_llama_dir):
    from effir import asymmetric

    folder = asymmetric.save(effir.load(dropped_dir, device="cpu", dtype="fp32"),
                             effir.load(tiny_llama_dir, device="cpu", dtype="fp32"), tmp_path / "asym")
    out = tmp_path / "bench"
    assert main(["bench", str(folder), "--output", str(out), *GRID]) == 0  # no --baseline: its document route
    result = json.loads((out / "bench.json").read_text())
    _check_schema(result, with_baseline=True)
    for c in result["cells"]:
        mlps = 2 if c["side"] == "query" else 4  # queries through the dropped model, documents through the parent
        assert c["candidate"]["flops_per_sequence"] == hand_flops(c["seq_len"], mlps)
        assert c["baseline"]["flops_per_sequence"] == hand_flops(c["seq_len"], 4)
    assert result["summary"]["document"]["predicted_speedup"] == 1.0
    assert result["summary"]["query"]["predicted_speedup"] > 1.2
    routes = result["models"]["candidate"]["routes"]
    assert (routes["query"]["structure"]["mlp"], routes["document"]["structure"]["mlp"]) == (2, 4)
    assert result["models"]["baseline"]["reference"] == str(folder / "document")
    md = (out / "bench.md").read_text()
    assert "a query-side model" in md and "- query route: " in md and "- document route: " in md


def test_bench_without_baseline_and_real_queries(tmp_path, tiny_llama_dir, tiny_beir, capsys):
    out = tmp_path / "bench"
    args = ["bench", str(tiny_llama_dir), "--output", str(out), "--data", str(tiny_beir), "--sides", "query",
            "--query-batch-sizes", "2", *GRID[6:]]
    assert main(args) == 0
    result = json.loads((out / "bench.json").read_text())
    _check_schema(result, with_baseline=False)
    assert result["summary"] == {} and result["environment"]["query_source"] == "data"
    [cell] = result["cells"]
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    # 3 queries, batch 2: one full batch of the first two, prompt + EOS, padded to the longer one
    batch = enc.tokenize(["what is the capital of france", "what is in the river water"], "query")
    assert cell["seq_len"] == batch["input_ids"].shape[1]
    real = int(batch["attention_mask"].sum())
    assert cell["candidate"]["tokens_per_s"] == pytest.approx(real / cell["candidate"]["latency_ms"]["median"] * 1e3)
    assert "no baseline" in capsys.readouterr().out


def test_models_are_interleaved(tiny_llama_dir, monkeypatch):
    """Each round times both models, alternating which goes first (ABBA), after the warm-up."""
    order = []
    real = timing._timed_call
    cand = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    base = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    monkeypatch.setattr(timing, "_timed_call", lambda enc, b: (order.append("c" if enc is cand else "b"),
                                                              real(enc, b))[1])
    grid = timing.BenchGrid(sides=("query",), query_length=4, doc_lengths=(), query_batch_sizes=(1,),
                            doc_batch_sizes=(1,), warmup=1, repeats=3, max_repeats=3, min_time=0)
    result = timing.bench_encoders(cand, base, grid)
    assert "".join(order) == "cbbccb"
    assert result["cells"][0]["predicted_speedup"] == 1.0


@pytest.mark.parametrize("extra, flag", [
    (["--baseline", "MISSING"], "--baseline"),
    (["--query-batch-sizes", "0"], "--query-batch-sizes"),
    (["--doc-batch-sizes", "8,-1"], "--doc-batch-sizes"),
    (["--doc-lengths", "1"], "--doc-lengths"),
    (["--doc-lengths", "256,abc"], "--doc-lengths"),
    (["--query-length", "0"], "--query-length"),
    (["--doc-lengths", "300"], "max_position_embeddings"),
    (["--sides", "queries"], "--sides"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_llama_dir, capsys, extra, flag):
    out = tmp_path / "bench"
    extra = [str(tmp_path / "missing") if e == "MISSING" else e for e in extra]
    rc = main(["bench", str(tiny_llama_dir), "--output", str(out), *GRID, *extra])
    # transformers' weight-loading progress bar may precede the error (length checks need the loaded config)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("effir bench: error:") and flag in err[0]
    assert not (out / "bench.json").exists()


def test_percentiles():
    values = [float(v) for v in range(1, 21)]
    assert timing.percentile(values, 50) == 10.5
    assert timing.percentile(values, 95) == 19.0
    assert timing.percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_compile_path_traces(tmp_path, dropped_dir, tiny_llama_dir):
    """--compile wraps both models with torch.compile; the eager backend checks the tracing without inductor."""
    out = tmp_path / "bench"
    grid = ["--sides", "query", "--query-batch-sizes", "2", *GRID[6:]]
    assert main(["bench", str(dropped_dir), "--baseline", str(tiny_llama_dir), "--output", str(out), "--compile",
                 "--compile-backend", "eager", *grid]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["environment"]["compile"] == "eager" and result["environment"]["warmup"] == 2
    assert result["cells"][0]["predicted_speedup"] == pytest.approx(hand_flops(32, 4) / hand_flops(32, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_on_cuda_measures_memory(tmp_path, dropped_dir, tiny_llama_dir):
    out = tmp_path / "bench"
    grid = [g if g != "cpu" else "cuda" for g in GRID]
    assert main(["bench", str(dropped_dir), "--baseline", str(tiny_llama_dir), "--output", str(out), *grid]) == 0
    result = json.loads((out / "bench.json").read_text())
    _check_schema(result, with_baseline=True)
    assert result["memory_method"].startswith("cuda_measured")


@pytest.mark.slow
def test_bench_compiled_smollm2(tmp_path):
    """torch.compile path on a real model (compiling takes minutes on CPU)."""
    out = tmp_path / "bench"
    assert main(["bench", "smollm2-135m", "--output", str(out), "--sides", "query", "--query-batch-sizes", "1",
                 "--compile", "--repeats", "2", "--min-time", "0", "--device", "cpu", "--dtype", "fp32"]) == 0
    assert json.loads((out / "bench.json").read_text())["environment"]["compile"] == "inductor"
