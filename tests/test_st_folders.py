"""Retrievers arrive as sentence-transformers folders: effir embeds tiny replicas of real ones (tests/st_replicas.py)
exactly as sentence-transformers does, before and after `effir drop` / `effir slim`, and the folders it writes keep
the source's prompts, pooling and normalisation."""

import json
import os
import subprocess
import sys

import pytest
import torch
from st_replicas import QWEN_SPECIALS, REPLICAS, ST_SCRIPT, WEB_SEARCH, build_replica, run_without_effir

import effir
from effir import cli
from effir.utils import EffirError

TEXTS = ["what is the capital of france", "fish", "the river in the city is blue water and a fish is in it"]
# (pooling, normalize, query prefix, document prefix, query / document budget): the tiny models have 256
# positions, so every budget above that is capped there, as sentence-transformers caps it
EXPECTED = {
    "qwen3-embedding": ("last", True, REPLICAS["qwen3-embedding"].prompts["query"], "", 256, 256),
    "gte-qwen2": ("last", True, WEB_SEARCH, "", 256, 256),
    "e5-mistral": ("last", True, "", "", 256, 256),
    "bge": ("cls", True, REPLICAS["bge"].prompts["query"], "", 256, 256),
    "kalm": ("mean", True, REPLICAS["kalm"].prompts["query"], "", 256, 256),
    "no-normalize": ("mean", False, "", "", 256, 256),
    "minilm": ("mean", True, "", "", 256, 256),
    "st6": ("last", True, "query: ", "passage: ", 256, 256),
}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("replicas")
    return {name: build_replica(name, base / name) for name in REPLICAS}


@pytest.mark.parametrize("name", sorted(REPLICAS))
def test_effir_reads_what_the_folder_says(replicas, name, capsys):
    enc = effir.load(replicas[name], device="cpu", dtype="fp32")
    s = enc.settings
    pooling, normalize, query, document, qlen, dlen = EXPECTED[name]
    assert (s.pooling, s.normalize, s.query_template, s.document_template) == (pooling, normalize, query + "{text}",
                                                                              document + "{text}")
    assert (s.query_max_length, s.document_max_length, s.append_eos) == (qlen, dlen, False)
    assert s.similarity == "cosine"  # every replica says cosine (ST's reading of a folder that names none, too)
    assert enc.padding_side == enc.tokenizer.padding_side
    # effir feeds the model exactly the tokenizer's ids: its own end token (if any) once, nothing added
    for side in ("query", "document"):
        assert enc.token_ids(TEXTS, side) == enc.tokenizer(enc.format(TEXTS, side))["input_ids"]
    notes = capsys.readouterr().err
    if REPLICAS[name].max_seq_length > 256:
        assert "effir caps that at 256" in notes and notes.count("\n") == 1 + (name == "e5-mistral")


def test_qwen3_embedding_gets_one_end_token_the_pad_token(replicas):
    enc = effir.load(replicas["qwen3-embedding"], device="cpu", dtype="fp32")
    ids = enc.token_ids(TEXTS, "document")
    assert enc.padding_side == "left"
    assert all(seq[-1] == QWEN_SPECIALS["<|endoftext|>"] and seq.count(QWEN_SPECIALS["<|endoftext|>"]) == 1 and
               QWEN_SPECIALS["<|im_end|>"] not in seq for seq in ids)
    # the same when effir's own last-token recipe (append_eos) is forced on: the tokenizer already closes the text
    enc.settings.append_eos = True
    assert enc.token_ids(TEXTS, "document") == ids


def test_task_prompts_without_a_query_prompt_say_so_and_prompt_name_picks_one(replicas, capsys, tmp_path,
                                                                              tiny_beir):
    effir.load(replicas["e5-mistral"], device="cpu", dtype="fp32")
    notice = [line for line in capsys.readouterr().err.splitlines() if "'query' prompt" in line]
    assert len(notice) == 1 and "web_search_query" in notice[0] and "--prompt-name" in notice[0]
    enc = effir.load(replicas["e5-mistral"], device="cpu", dtype="fp32", prompt_name="web_search_query")
    assert enc.settings.query_template == WEB_SEARCH + "{text}"
    assert effir.load(replicas["e5-mistral"], device="cpu", prompt_name="sts_query",
                      query_prompt="none").settings.query_template == "{text}"  # explicit options win
    with pytest.raises(EffirError, match="'nope' is not a prompt of .*'web_search_query'"):
        effir.load(replicas["e5-mistral"], device="cpu", prompt_name="nope")
    # a folder effir wrote keeps the source's named prompts, so --prompt-name still works there
    out = effir.checkpoint.save(effir.load(replicas["e5-mistral"], device="cpu", dtype="fp32"), tmp_path / "saved")
    again = effir.load(out, device="cpu", dtype="fp32", prompt_name="web_search_query")
    assert again.settings.query_template == WEB_SEARCH + "{text}"
    capsys.readouterr()
    rc = cli.main(["eval", str(replicas["e5-mistral"]), "--data", str(tiny_beir), "--prompt-name", "nope",
                   "--output", str(tmp_path / "e"), "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if "'nope'" in line]
    assert rc == 2 and len(err) == 1 and "is not a prompt of" in err[0]


@pytest.mark.parametrize("edit, match", [
    (lambda f: _patch(f / "modules.json", lambda m: m + [{"idx": 3, "name": "3", "path": "3_Dense",
                                                           "type": "sentence_transformers.models.LayerNorm"}]),
     r"module\(s\) \['LayerNorm'\] that effir cannot reproduce"),
    (lambda f: _patch(f / "1_Pooling" / "config.json", lambda c: {**c, "pooling_mode_mean_tokens": False,
                                                                  "pooling_mode_max_tokens": True}),
     r"pools with \['max'\]"),
    (lambda f: _patch(f / "1_Pooling" / "config.json", lambda c: {**c, "include_prompt": False}),
     "include_prompt: false"),
    (lambda f: (f / "modules.json").write_text("[{"), "modules.json is not valid JSON"),
    (lambda f: _patch(f / "config_sentence_transformers.json", lambda c: {**c, "similarity_fn_name": "manhattan"}),
     "scores by 'manhattan' similarity"),
])
def test_folders_effir_cannot_reproduce_are_refused(tmp_path, edit, match):
    folder = build_replica("minilm", tmp_path / "m")
    edit(folder)
    with pytest.raises(EffirError, match=match):
        effir.load(folder, device="cpu")


def test_uncased_folder_with_a_cased_tokenizer_is_refused(tmp_path):
    folder = build_replica("no-normalize", tmp_path / "m")  # the word-level tokenizer does not lowercase
    _patch(folder / "sentence_bert_config.json", lambda c: {**c, "do_lower_case": True})
    with pytest.raises(EffirError, match="do_lower_case"):
        effir.load(folder, device="cpu")


def _patch(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _run_st(tmp_path, jobs: list[dict]) -> dict:
    """Run ``ST_SCRIPT`` on ``jobs`` where effir cannot be imported."""
    return run_without_effir(ST_SCRIPT, tmp_path, jobs)


COMPRESSIONS = {
    "drop": ["drop", "--strategy", "last", "--mlp", "2", "--compensate", "none"],
    # drop's default: the dropped MLPs replaced by fitted maps (remote code with MappedBranch)
    "drop-lstsq": ["drop", "--strategy", "last", "--mlp", "2", "--compensate-samples", "4", "--seq-len", "32",
                   "--no-progress"],
    # the plain cut: it moves the embeddings far enough to show that the comparisons mean something
    "slim": ["slim", "--method", "magnitude", "--ratio", "0.5", "--width-multiple", "8", "--no-progress",
             "--compensate", "none"],
    # slim's default least-squares refit: the same structure, weights refit to stay close to the source
    "slim-lstsq": ["slim", "--method", "magnitude", "--ratio", "0.5", "--width-multiple", "8", "--no-progress"],
}


def _compressed(src, out, stage: str):
    verb, *flags = COMPRESSIONS[stage]
    assert cli.main([verb, str(src), *flags, "--output", str(out), "--device", "cpu", "--dtype", "fp32"]) == 0
    return out / "model"


def test_embeddings_equal_sentence_transformers_before_and_after_drop_and_slim(replicas, tmp_path):
    """For every replica, its `effir drop` and `effir slim` outputs, a prompt picked by name, and plain HF
    folders whose export needs (e5-mistral: BOS template) or must skip (Qwen3-Embedding: the tokenizer appends an
    end token) the tokenizer's EOS edit: sentence-transformers' encode_query / encode_document equal effir's
    within 1e-5, the written folders keep the source's prompts, pooling and normalisation, and the compressed
    ones refuse to load without trust_remote_code."""
    folders = {}
    for name, src in replicas.items():
        folders[name] = (src, False, None)
        for stage in COMPRESSIONS:
            folders[f"{name}/{stage}"] = (_compressed(src, tmp_path / name / stage, stage), True, None)
    folders["e5-mistral/web_search_query"] = (replicas["e5-mistral"], False, "web_search_query")
    for name in ("e5-mistral", "qwen3-embedding"):  # no sentence-transformers files: effir's defaults, EOS recipe
        plain = build_replica(name, tmp_path / "plain" / name, st_files=False)
        folders[f"{name}/plain"] = (_compressed(plain, tmp_path / "plain-drop" / name, "drop"), True, None)
    jobs, expected = [], {}
    for job, (folder, remote, prompt_name) in folders.items():
        enc = effir.load(folder, device="cpu", dtype="fp32", prompt_name=prompt_name)
        expected[job] = {"query": enc.encode_queries(TEXTS), "document": enc.encode_documents(TEXTS), "enc": enc}
        jobs.append({"name": job, "dir": str(folder), "remote": remote, "prompt_name": prompt_name, "texts": TEXTS})
    got = _run_st(tmp_path, jobs)
    worst = {}
    for job, exp in expected.items():
        for side in ("query", "document"):
            worst[(job, side)] = (torch.tensor(got[job][side]) - exp[side]).abs().max().item()
    print("max |effir - sentence-transformers|:", {f"{j} {side}": f"{v:.1e}" for (j, side), v in worst.items()})
    assert max(worst.values()) <= 1e-5, {k: v for k, v in worst.items() if v > 1e-5}
    for name in replicas:
        for stage in COMPRESSIONS:
            if stage not in ("slim-lstsq", "drop-lstsq"):  # the compressed models embed differently: the comparisons above mean something
                moved = (expected[f"{name}/{stage}"]["document"] - expected[name]["document"]).abs().max().item()
                assert moved > 1e-3, (name, stage, moved)
            st, src = got[f"{name}/{stage}"], got[name]
            assert (st["prompts"], st["pooling"], st["normalize"]) == (src["prompts"], src["pooling"],
                                                                        src["normalize"]), (name, stage)
            assert all(r and "contains custom code" in r for r in st["refusals"]), (name, stage, st["refusals"])
    assert got["e5-mistral/drop"]["prompts"]["web_search_query"] == WEB_SEARCH
    # the plain folders: effir's last-token recipe reached sentence-transformers, with exactly one end token
    mistral = expected["e5-mistral/plain"]["enc"]
    assert mistral.settings.append_eos
    assert mistral.tokenizer("a fish")["input_ids"][-1] == mistral.tokenizer.eos_token_id
    qwen = expected["qwen3-embedding/plain"]["enc"]
    assert qwen.token_ids(["a fish"], "document")[0][-1:] == [QWEN_SPECIALS["<|endoftext|>"]]
    assert QWEN_SPECIALS["<|im_end|>"] not in qwen.token_ids(["a fish"], "document")[0]


def _mteb_python() -> str | None:
    """A Python with mteb: this one, or $EFFIR_MTEB_PYTHON (mteb pulls datasets, pandas, polars, pyarrow)."""
    import importlib.util

    if importlib.util.find_spec("mteb") is not None:
        return sys.executable
    return os.environ.get("EFFIR_MTEB_PYTHON")


@pytest.mark.skipif(_mteb_python() is None, reason="mteb not installed (pip install mteb, or set EFFIR_MTEB_PYTHON)")
def test_effir_eval_matches_mteb_on_every_replica(replicas, tiny_beir, tmp_path):
    """`effir eval` of each replica (and of its dropped form) gives the nDCG@10 that benchmarks/mteb_eval.py gets
    through mteb's sentence-transformers wrapper on the same tiny BEIR folder."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "mteb_eval.py"
    src = Path(effir.__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(src), "HF_MODULES_CACHE": str(tmp_path / "m")}
    folders = {**replicas, "qwen3-embedding/drop": _compressed(replicas["qwen3-embedding"], tmp_path / "d", "drop")}
    scores = {}
    for name, folder in folders.items():
        out = tmp_path / "eval" / name
        assert cli.main(["eval", str(folder), "--data", str(tiny_beir), "--output", str(out), "--device", "cpu",
                         "--dtype", "fp32", "--no-cache"]) == 0
        ours = json.loads((out / "results.json").read_text())
        mteb_json = tmp_path / "mteb" / f"{name.replace('/', '-')}.json"
        mteb_json.parent.mkdir(exist_ok=True)
        proc = subprocess.run([_mteb_python(), str(script), "--model", str(folder), "--beir", str(tiny_beir),
                               "--device", "cpu", "--json", str(mteb_json)], env=env, capture_output=True, text=True,
                              timeout=600, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr[-3000:]
        scores[name] = (ours["metrics"]["nDCG@10"], json.loads(mteb_json.read_text())["mteb"]["ndcg_at_10"])
    print("nDCG@10 (effir eval, mteb):", scores)
    assert all(abs(a - b) <= 1e-4 for a, b in scores.values()), scores
