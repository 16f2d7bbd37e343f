"""sentence-transformers Dense heads through the stages after drop / slim (those: tests/test_dense_heads.py), on the
EmbeddingGemma-layout and LaBSE-like replicas (tests/st_replicas.py): `effir distill` (both sides and --query-side:
the Router folder reloads in sentence-transformers without effir, the head on both routes), `effir export` (ONNX
and OpenVINO fp32 graphs, the head applied after them by effir and by the guide's onnxruntime recipe), `effir
verify` (a damaged Dense module fails), `effir analyze` / `effir bench`, and benchmarks/mteb_eval.py."""

import importlib.util
import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_CORPUS, TINY_QUERIES, write_beir
from safetensors.torch import load_file, save_file
from st_replicas import DENSE_REPLICAS, ST_SCRIPT, assert_same_dense, build_replica, run_without_effir

import effir
from effir import serving
from effir.cli import main
from effir.flops import flops_per_sequence

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["fish", "what is the capital of france",
         "the river in the city is blue water and a fish is in it, and the sun is a star of the planet"]
needs_serving = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "onnxscript", "openvino")),
    reason="onnx, onnxruntime, onnxscript and openvino are not installed (pip install 'effir[serve]')")


@pytest.fixture(scope="module")
def dropped(tmp_path_factory) -> dict:
    """``{replica: (source folder, its effir drop --mlp 2 folder)}``."""
    base = tmp_path_factory.mktemp("dense-stages")
    out = {}
    for name in DENSE_REPLICAS:
        src = build_replica(name, base / name)
        assert main(["drop", str(src), "--strategy", "last", "--mlp", "2", "--compensate", "none", "--output",
                     str(base / f"{name}-drop"), "--device", "cpu", "--dtype", "fp32"]) == 0
        out[name] = (src, base / f"{name}-drop" / "model")
    return out


def _effir_embeddings(folder, truncate_dim=None) -> dict:
    enc = effir.load(folder, device="cpu", dtype="fp32", truncate_dim=truncate_dim)
    return {"query": enc.encode_queries(TEXTS), "document": enc.encode_documents(TEXTS)}


def _st_job(name, folder, truncate_dim=None) -> dict:
    return {"name": name, "dir": str(folder), "remote": True, "prompt_name": None, "texts": TEXTS,
            "truncate_dim": truncate_dim}


def _worst(got: dict, expected: dict) -> dict:
    return {(job, side): (torch.tensor(got[job][side]) - exp[side]).abs().max().item()
            for job, exp in expected.items() for side in ("query", "document")}


def test_distilled_folders_keep_the_head_and_embed_as_sentence_transformers(dropped, tmp_path):
    """`effir distill` (every weight trained, so the backbone moves) from each dropped replica to its source, both
    sides and --query-side: the folders carry the source's Dense modules unchanged (on both routes of the query-side
    folder), and sentence-transformers without effir (the query-side folder as a Router) embeds queries and
    documents as effir does within 1e-5; truncate_dim set on the source travels with it."""
    texts = write_beir(tmp_path / "texts", corpus=TINY_CORPUS, queries=TINY_QUERIES, qrels=[])
    folders, jobs, expected = {}, [], {}
    for name, (src, student) in dropped.items():
        for mode in ("both", "query-side"):
            out = tmp_path / f"{name}-{mode}"
            assert main(["distill", str(student), "--teacher", str(src), "--texts", f"beir:{texts}", "--output",
                         str(out), "--device", "cpu", "--no-progress", "--batch-size", "2", "--max-steps", "2",
                         "--full", "--lr", "1e-3", "--precision", "fp32", "--teacher-dtype", "fp32",
                         *(["--query-side"] if mode == "query-side" else [])]) == 0
            folders[f"{name}/{mode}"] = out / "model"
    folders["embeddinggemma/query-side truncate_dim=8"] = folders["embeddinggemma/query-side"]
    for job, folder in folders.items():
        dim = 8 if "truncate_dim" in job else None
        expected[job] = _effir_embeddings(folder, dim)
        jobs.append(_st_job(job, folder, dim))
    got = run_without_effir(ST_SCRIPT, tmp_path, jobs)
    worst = _worst(got, expected)
    print("max |effir - sentence-transformers|:", {f"{j} {s}": f"{v:.1e}" for (j, s), v in worst.items()})
    assert max(worst.values()) <= 1e-5, {k: v for k, v in worst.items() if v > 1e-5}
    for name, (src, student) in dropped.items():
        dense = ["Dense"] * len(DENSE_REPLICAS[name].dense)
        both, query_side = folders[f"{name}/both"], folders[f"{name}/query-side"]
        assert_same_dense(src, both)
        assert got[f"{name}/both"]["modules"] == ["Transformer", "Pooling", *dense, "Normalize"]
        assert got[f"{name}/query-side"]["modules"] == {r: ["Transformer", "Pooling", *dense, "Normalize"]
                                                        for r in ("query", "document")}
        for route in ("query", "document"):
            assert_same_dense(src, query_side / route)
        start = _effir_embeddings(student)
        assert (expected[f"{name}/both"]["document"] - start["document"]).abs().max() > 1e-4  # distillation moved it
        source = _effir_embeddings(src)
        assert torch.equal(expected[f"{name}/query-side"]["document"], source["document"])  # the parent's documents
        assert (expected[f"{name}/query-side"]["query"] - source["query"]).abs().max() > 1e-4
    assert expected["embeddinggemma/query-side truncate_dim=8"]["query"].shape == (3, 8)
    assert got["embeddinggemma/query-side truncate_dim=8"]["truncate_dim"] == 8


def _guide_recipe() -> str:
    """The onnxruntime + numpy recipe in docs/guide.md (the python block after ``<!-- onnx-recipe -->``)."""
    text = (REPO / "docs" / "guide.md").read_text()
    block = re.search(r"<!-- onnx-recipe -->\n```python\n(.*?)```", text, re.DOTALL)
    assert block, "docs/guide.md lost its onnx recipe"
    return block.group(1)


# Runs the guide's recipe and sentence-transformers on each job's exported folder, in a process without effir.
RECIPE_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["effir"] = None
    from sentence_transformers import SentenceTransformer

    job = json.load(open(sys.argv[1]))
    exec(job["recipe"])
    out = {}
    for name, folder in job["dirs"].items():
        st = SentenceTransformer(folder, device="cpu", trust_remote_code=True)
        out[name] = {"recipe": {side: embed(folder, job["texts"], side).tolist() for side in ("query", "document")},
                     "st": {"query": st.encode_query(job["texts"]).tolist(),
                            "document": st.encode_document(job["texts"]).tolist()}}
    json.dump(out, open(sys.argv[2], "w"))
""")


def _served(folder, backend: str) -> torch.Tensor:
    enc = serving.apply_variant(effir.load(folder, device="cpu", dtype="fp32", padding_side="right"), backend, "none")
    return torch.cat([enc.encode_queries(TEXTS, batch_size=2), enc.encode_documents(TEXTS, batch_size=2)])


@needs_serving
@pytest.mark.parametrize("name", list(DENSE_REPLICAS))
def test_exported_graphs_embed_with_the_head(dropped, tiny_beir, tmp_path, name):
    """The head stays outside the ONNX / OpenVINO graphs: effir applies it after them (`effir eval --backend`, the
    export's own probe check) and so does the guide's onnxruntime + numpy recipe, within 1e-4 of torch and of
    sentence-transformers, truncate_dim included."""
    src, folder = dropped[name]
    ref = None
    for fmt in ("onnx", "openvino"):
        out = tmp_path / fmt
        assert main(["export", str(folder), "--format", fmt, "--output", str(out)]) == 0
        assert_same_dense(src, out)
        ref = _served(out, "torch") if ref is None else ref
        assert (_served(out, fmt) - ref).abs().max().item() < 1e-4
        check = json.loads((out / "export.json").read_text())["checks"][serving.SERVED_FILES[(fmt, False)]]
        assert check["max_abs_diff"] < 1e-4
    metrics = {}
    for backend in ("torch", "onnx", "openvino"):
        folder_for = tmp_path / ("onnx" if backend != "openvino" else "openvino")
        assert main(["eval", str(folder_for), "--data", str(tiny_beir), "--output", str(tmp_path / f"e-{backend}"),
                     "--backend", backend, "--device", "cpu", "--dtype", "fp32"]) == 0
        metrics[backend] = json.loads((tmp_path / f"e-{backend}" / "results.json").read_text())["metrics"]
    # the served embeddings equal torch's within 1e-4 (above); the tiny random replica's scores nearly tie, so a
    # 1e-5 rounding difference can swap two documents: the metrics are checked to exist, not to be equal
    assert metrics["onnx"].keys() == metrics["openvino"].keys() == metrics["torch"].keys()
    truncated = shutil.copytree(tmp_path / "onnx", tmp_path / "onnx-truncated")
    config = truncated / "config_sentence_transformers.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "truncate_dim": 8}))
    got = run_without_effir(RECIPE_SCRIPT, tmp_path, {"recipe": _guide_recipe(), "texts": TEXTS, "dirs": {
        "full": str(tmp_path / "onnx"), "truncated": str(truncated)}})
    for job, result in got.items():
        for side in ("query", "document"):
            recipe, st = torch.tensor(result["recipe"][side]), torch.tensor(result["st"][side])
            assert recipe.shape == st.shape == (3, 8 if job == "truncated" else DENSE_REPLICAS[name].dense[-1][0])
            assert (recipe - st).abs().max().item() < 1e-4, (job, side)


def test_verify_covers_the_head(dropped, tmp_path, capsys):
    """`effir verify` passes a dropped Dense-headed folder; a Dense module whose weights were changed afterwards fails
    its integrity and reference checks."""
    src, folder = dropped["labse-like"]
    copy = shutil.copytree(folder, tmp_path / "model")
    assert main(["verify", str(copy), "--skip", "transformers"]) == 0
    assert "2_Dense/model.safetensors" in json.loads((copy / "effir.json").read_text())["weights_sha256"]
    capsys.readouterr()
    path = copy / "2_Dense" / "model.safetensors"
    state = load_file(str(path))
    save_file({**state, "linear.bias": state["linear.bias"] + 0.1}, str(path))
    assert main(["verify", str(copy), "--skip", "transformers", "--skip", "sentence-transformers"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"FAIL +integrity: 2_Dense/model.safetensors differ", out), out
    assert re.search(r"FAIL +reference: .*max \|embedding diff\|", out), out


def test_verify_passes_a_head_saved_without_its_hash(dropped, tmp_path, capsys):
    """A folder saved before effir hashed Dense modules passes integrity on the backbone, saying the head is not
    covered; its backbone weights are still checked."""
    copy = shutil.copytree(dropped["labse-like"][1], tmp_path / "model")
    meta_path = copy / "effir.json"
    meta = json.loads(meta_path.read_text())
    meta["weights_sha256"] = {k: v for k, v in meta["weights_sha256"].items() if "/" not in k}
    meta_path.write_text(json.dumps(meta))
    assert main(["verify", str(copy), "--skip", "transformers"]) == 0
    assert re.search(r"PASS +integrity: .*2_Dense/model.safetensors not covered", capsys.readouterr().out)
    meta["weights_sha256"]["model.safetensors"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    assert main(["verify", str(copy), "--skip", "transformers", "--skip", "sentence-transformers"]) == 1
    assert re.search(r"FAIL +integrity: .*model.safetensors differ", capsys.readouterr().out)


def test_analyze_and_bench_run_on_a_headed_model(dropped, tiny_beir, tmp_path):
    """analyze scores the transformer's sub-layers; bench times the dropped folder (head included) against its
    source; both read the folder's head without touching it."""
    src, folder = dropped["embeddinggemma"]
    assert main(["analyze", str(src), "--calibration", f"beir:{tiny_beir}", "--output", str(tmp_path / "a"),
                 "--device", "cpu", "--dtype", "fp32"]) == 0
    scores = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert scores["num_layers"] == 4 and all(len(v) == 4 and all(x > 0 for x in v) for v in scores["scores"].values())
    assert main(["bench", str(folder), "--baseline", str(src), "--output", str(tmp_path / "b"), "--query-length", "8",
                 "--doc-lengths", "16", "--query-batch-sizes", "2", "--doc-batch-sizes", "2", "--repeats", "1",
                 "--max-repeats", "1", "--min-time", "0", "--warmup", "0", "--device", "cpu", "--dtype", "fp32"]) == 0
    bench = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert {c["side"] for c in bench["cells"]} == {"query", "document"}
    assert all(c["predicted_speedup"] > 1 for c in bench["cells"])  # two MLPs fewer, the same head on both
    baseline = effir.load(str(src), device="cpu", dtype="fp32")
    sizes = [baseline.model.config.hidden_size] + [out for out, _, _ in DENSE_REPLICAS["embeddinggemma"].dense]
    head_flops = sum(2 * n_in * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True))  # per Dense
    for c in bench["cells"]:  # the head counted once per sequence, on top of the transformer's FLOPs
        body = flops_per_sequence(baseline.model, int(c["seq_len"]), baseline.adapter)["total"]
        assert c["baseline"]["flops_per_sequence"] == body + head_flops
    assert bench["models"]["baseline"]["head_parameters"] == sum(p.numel() for p in baseline.head.parameters()) > 0
    assert_same_dense(src, folder)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mteb") is None, reason="mteb not installed (pip install mteb)")
@pytest.mark.parametrize("name", list(DENSE_REPLICAS))
def test_mteb_eval_scores_each_replica_as_effir_eval(tiny_beir, tmp_path, name):
    """benchmarks/mteb_eval.py (mteb through sentence-transformers, offline on a local BEIR folder) gives the nDCG@10
    that `effir eval` gives, within 1e-4."""
    spec = importlib.util.spec_from_file_location("mteb_eval", REPO / "benchmarks" / "mteb_eval.py")
    mteb_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mteb_eval)
    folder = build_replica(name, tmp_path / name)
    result = mteb_eval.main(["--model", str(folder), "--beir", str(tiny_beir), "--device", "cpu"])
    assert main(["eval", str(folder), "--data", str(tiny_beir), "--output", str(tmp_path / "e"), "--device", "cpu",
                 "--dtype", "fp32"]) == 0
    ours = json.loads((tmp_path / "e" / "results.json").read_text())["metrics"]
    assert result["mteb"]["ndcg_at_10"] == pytest.approx(ours["nDCG@10"], abs=1e-4)


# What mteb's retrieval evaluation computes once its SentenceTransformer wrapper has embedded the data (mteb itself is
# not needed): encode_query / encode_document, cosine scores, pytrec_eval's ndcg_cut_10 averaged over the queries.
PYTREC_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["effir"] = None
    import pytrec_eval
    from sentence_transformers import SentenceTransformer

    job = json.load(open(sys.argv[1]))
    out = {}
    for name, folder in job["dirs"].items():
        st = SentenceTransformer(folder, device="cpu")
        q = st.encode_query(list(job["queries"].values()), convert_to_tensor=True, normalize_embeddings=True)
        d = st.encode_document(list(job["corpus"].values()), convert_to_tensor=True, normalize_embeddings=True)
        scores = (q @ d.T).tolist()
        run = {qid: dict(zip(job["corpus"], map(float, row))) for qid, row in zip(job["queries"], scores)}
        per_query = pytrec_eval.RelevanceEvaluator(job["qrels"], {"ndcg_cut.10"}).evaluate(run)
        out[name] = sum(v["ndcg_cut_10"] for v in per_query.values()) / len(per_query)
    json.dump(out, open(sys.argv[2], "w"))
""")


def test_effir_eval_scores_as_sentence_transformers_and_pytrec_eval(tiny_beir, tmp_path):
    """`effir eval` of each replica gives the nDCG@10 that sentence-transformers' embeddings scored by pytrec_eval
    give (mteb's recipe, without mteb), within 1e-4."""
    from effir.data import load_beir

    data = load_beir(tiny_beir)
    folders = {name: build_replica(name, tmp_path / name) for name in DENSE_REPLICAS}
    corpus = {i: (d.get("title", "") + " " + d.get("text", "")).strip() for i, d in data.corpus.items()}
    got = run_without_effir(PYTREC_SCRIPT, tmp_path, {"dirs": {k: str(v) for k, v in folders.items()},
                                                     "queries": data.queries, "corpus": corpus, "qrels": data.qrels})
    for name, folder in folders.items():
        assert main(["eval", str(folder), "--data", str(tiny_beir), "--output", str(tmp_path / f"e-{name}"),
                     "--device", "cpu", "--dtype", "fp32"]) == 0
        ours = json.loads((tmp_path / f"e-{name}" / "results.json").read_text())["metrics"]["nDCG@10"]
        print(f"{name}: effir eval nDCG@10 {ours:.6f}, sentence-transformers + pytrec_eval {got[name]:.6f}")
        assert ours == pytest.approx(got[name], abs=1e-4)
