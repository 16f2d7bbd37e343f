"""`effir compress` end to end on tiny models: within its budget, the best proxy chosen, a query-side folder under
--query-side, a rerun after a kill that keeps the search, and one-line errors on bad input with nothing written."""

import json

import pytest

import effir
from effir.cli import main
from effir.refs import query_side_routes
from effir.stages import compress
from effir.surgery import count_parameters

FAST = ["--width-multiple", "8", "--calibration-samples", "4", "--seq-len", "32", "--holdout", "12", "--steps", "2",
        "--batch-size", "4", "--max-texts", "24", "--device", "cpu", "--no-progress", "--no-bench"]
QUICK = ["--skip-check", "sentence-transformers"]
"""Leaves out verify's check in a process of its own (seconds); the reload test keeps it."""


def _args(model, out, *extra, keep="0.5", texts=None, checks=QUICK):
    return ["compress", str(model), "--keep", keep, "--texts", *(texts or ["wiki"]), "--output", str(out), *FAST,
            *checks, *map(str, extra)]


def _params(ref) -> int:
    enc = effir.load(ref, device="cpu", dtype="fp32")
    return count_parameters(enc.model, enc.adapter)["without_embeddings"]


def test_stays_within_its_budget_and_keeps_the_best_proxy(tiny_model_dir, tiny_beir, tmp_path):
    out = tmp_path / "out"
    # 0.6: a tiny BERT's attention and pooler alone are over half its parameters
    assert main(_args(tiny_model_dir, out, keep="0.6", texts=["wiki", f"beir:{tiny_beir}"])) == 0
    assert _params(out / "model") <= 0.6 * _params(tiny_model_dir)
    s = json.loads((out / "compress.json").read_text())
    reachable = [c for c in s["candidates"] if c["reachable"]]
    assert len(s["candidates"]) >= 2 and reachable
    assert s["plan"]["k"] == max(reachable, key=lambda c: c["proxy"])["k"]
    assert all(c["cost"] <= s["target"] for c in reachable)
    after = s["retention"]["after_distillation"]
    assert set(after["by_side"]) == {"query", "document"} and 0 <= after["top10_overlap"] <= 1
    assert s["verified"]
    assert "PASS transformers" in (out / "verify.txt").read_text()
    report = (out / "report.md").read_text().splitlines()
    assert report[2].startswith("- **retention**") and report[3].startswith("- **speed-up**")


def test_the_result_reloads_with_the_same_embeddings(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert main(_args(tiny_llama_dir, out, checks=[])) == 0
    verify = (out / "verify.txt").read_text()  # transformers and sentence-transformers embed as effir.load does
    assert "PASS transformers" in verify and "PASS sentence-transformers" in verify, verify
    texts = ["the river in the city", "a cell protein and a gene"]
    first = effir.load(out / "model", device="cpu").encode(texts, "query")
    again = effir.load(out / "model", device="cpu").encode(texts, "query")
    assert (first - again).abs().max() == 0
    assert _params(out / "model") <= 0.5 * _params(tiny_llama_dir)


def test_query_side_gives_a_query_side_folder(tiny_llama_dir, tiny_beir, tmp_path):
    out = tmp_path / "out"
    assert main(_args(tiny_llama_dir, out, "--query-side", texts=[f"beir:{tiny_beir}", "wiki"])) == 0
    assert query_side_routes(out / "model")
    assert _params(out / "model" / "query") <= 0.5 * _params(tiny_llama_dir)
    s = json.loads((out / "compress.json").read_text())
    assert s["query_side"] and set(s["retention"]["after_distillation"]["by_side"]) == {"query"}


def test_a_rerun_after_a_kill_keeps_the_search(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def killed(args, out):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(compress, "_distill", killed)
        assert main(_args(tiny_llama_dir, out)) == 130
    assert (out / "plan.json").exists() and (out / "student" / "model").exists() and not (out / "model").exists()
    assert main(_args(tiny_llama_dir, out)) == 0
    assert "search skipped" in capsys.readouterr().out
    assert main(_args(tiny_llama_dir, out)) == 2  # finished: only --overwrite runs it again
    assert "already holds a finished run" in capsys.readouterr().err
    assert main(_args(tiny_llama_dir, out, "--steps", 3)) == 2  # other options: not silently mixed
    assert "other options (steps)" in capsys.readouterr().err


@pytest.mark.parametrize("keep, texts, match", [
    ("0.02", None, "no plan reaches --keep 0.02"),
    ("0", None, "--keep must be in (0, 1)"),
    ("1.5", None, "--keep must be in (0, 1)"),
    ("0.5", ["EMPTY"], "contains no text"),
    ("0.5", ["nowhere.txt"], "does not exist"),
], ids=["unreachable", "zero", "above-one", "empty-source", "missing-source"])
def test_bad_input_is_one_line_and_writes_nothing(tiny_llama_dir, tmp_path, capsys, keep, texts, match):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    out = tmp_path / "out"
    texts = [str(empty) if t == "EMPTY" else str(tmp_path / t) if t.endswith(".txt") else t for t in texts or ["wiki"]]
    assert main(_args(tiny_llama_dir, out, keep=keep, texts=texts)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("effir compress: error: ") and "\n" not in err and match in err, err
    assert not (out / "model").exists() and not (out / "plan.json").exists()


def test_no_texts_is_a_usage_error(tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["compress", str(tiny_llama_dir), "--keep", "0.5", "--output", str(tmp_path / "out")])
    assert info.value.code == 2 and "--texts" in capsys.readouterr().err


def test_a_flops_budget_counts_flops(tiny_llama_dir, tmp_path):
    from effir.flops import flops_per_sequence

    out = tmp_path / "out"
    assert main(_args(tiny_llama_dir, out, "--budget", "flops", "--flops-length", 64, keep="0.7")) == 0

    def flops(ref):
        enc = effir.load(ref, device="cpu", dtype="fp32")
        return flops_per_sequence(enc.model, 64, enc.adapter)["total"]

    s = json.loads((out / "compress.json").read_text())
    assert s["budget"] == "flops" and flops(out / "model") == s["cost"] <= 0.7 * flops(tiny_llama_dir)
