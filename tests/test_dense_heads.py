"""sentence-transformers Dense heads: effir embeds tiny replicas of Dense-headed folders (EmbeddingGemma: bidirectional
gemma3_text with a sliding window, mean pooling, two Dense, Normalize; a LaBSE-like BERT with a tanh Dense) exactly
as sentence-transformers does, before and after `effir drop` / `effir slim`, with and without ``truncate_dim``; the
folders it writes carry the Dense modules unchanged."""

import json
import re
import shutil

import pytest
import torch
from st_replicas import DENSE_REPLICAS, ST_SCRIPT, assert_same_dense, build_replica, run_without_effir

import effir
from effir import cli
from effir.checkpoint import fingerprint
from effir.utils import EffirError

# prompted, every text is longer than the EmbeddingGemma replica's 4-token sliding window
TEXTS = ["fish", "what is the capital of france",
         "the river in the city is blue water and a fish is in it, and the sun is a star of the planet"]
MODULES = {"embeddinggemma": ["Transformer", "Pooling", "Dense", "Dense", "Normalize"],
           "labse-like": ["Transformer", "Pooling", "Dense", "Normalize"]}


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("heads")
    folders = {name: build_replica(name, base / name) for name in DENSE_REPLICAS}
    truncated = shutil.copytree(folders["embeddinggemma"], base / "gemma-truncated")
    _patch(truncated / "config_sentence_transformers.json", lambda c: {**c, "truncate_dim": 16})
    return {**folders, "gemma-truncated": truncated}


def _patch(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _compressed(src, out, stage: str):
    args = (["drop", str(src), "--strategy", "last", "--mlp", "2", "--compensate", "none"] if stage == "drop" else
            ["slim", str(src), "--method", "activation", "--ratio", "0.5", "--width-multiple", "8",
             "--calibration-samples", "2", "--seq-len", "16", "--no-progress",
             "--compensate", "none"])  # the plain cut moves the embeddings (compensated folders: test_st_folders)
    assert cli.main([*args, "--output", str(out), "--device", "cpu", "--dtype", "fp32"]) == 0
    return out / "model"


def test_effir_reads_the_head(heads):
    gemma = effir.load(heads["embeddinggemma"], device="cpu", dtype="fp32")
    s = gemma.settings
    assert (s.pooling, s.head, s.normalize, s.truncate_dim) == ("mean", ["2_Dense", "3_Dense"], True, None)
    assert (s.query_template, s.document_template) == ("task: search result | query: {text}",
                                                       "title: none | text: {text}")
    assert gemma.model.config.use_bidirectional_attention and gemma.dim == 32
    labse = effir.load(heads["labse-like"], device="cpu", dtype="fp32")
    assert labse.settings.head == ["2_Dense"] and labse.dim == 24 and labse.encode_queries(TEXTS).shape == (3, 24)
    assert effir.load(heads["gemma-truncated"], device="cpu").dim == 16


def test_embeddings_equal_sentence_transformers_before_and_after_drop_and_slim(heads, tmp_path):
    """Each Dense-headed replica, its `effir drop` and `effir slim --method activation` outputs, a folder with
    truncate_dim (and its dropped form), and truncate_dim passed to both libraries: sentence-transformers'
    encode_query / encode_document equal effir's within 1e-5, and the written folders load with the source's modules
    and carry its Dense modules unchanged."""
    folders = {}  # job -> (folder, remote, truncate_dim)
    for name in ("embeddinggemma", "labse-like", "gemma-truncated"):
        folders[name] = (heads[name], False, None)
        for stage in ("drop", "slim") if name != "gemma-truncated" else ("drop",):
            folders[f"{name}/{stage}"] = (_compressed(heads[name], tmp_path / name / stage, stage), True, None)
    folders["embeddinggemma/truncate_dim=8"] = (heads["embeddinggemma"], False, 8)
    jobs, expected = [], {}
    for job, (folder, remote, dim) in folders.items():
        enc = effir.load(folder, device="cpu", dtype="fp32", truncate_dim=dim)
        expected[job] = {"query": enc.encode_queries(TEXTS), "document": enc.encode_documents(TEXTS)}
        jobs.append({"name": job, "dir": str(folder), "remote": remote, "prompt_name": None, "texts": TEXTS,
                     "truncate_dim": dim})
    got = run_without_effir(ST_SCRIPT, tmp_path, jobs)
    worst = {(job, side): (torch.tensor(got[job][side]) - exp[side]).abs().max().item()
             for job, exp in expected.items() for side in ("query", "document")}
    print("max |effir - sentence-transformers|:", {f"{j} {side}": f"{v:.1e}" for (j, side), v in worst.items()})
    assert max(worst.values()) <= 1e-5, {k: v for k, v in worst.items() if v > 1e-5}
    widths = {job: expected[job]["query"].shape[1] for job in expected}
    assert widths["gemma-truncated"] == widths["gemma-truncated/drop"] == 16
    assert widths["embeddinggemma/truncate_dim=8"] == 8 and got["gemma-truncated/drop"]["truncate_dim"] == 16
    for job, (folder, remote, _) in folders.items():
        if not remote:
            continue
        source = job.split("/")[0]
        moved = (expected[job]["document"] - expected[source]["document"]).abs().max().item()
        assert moved > 1e-3, (job, moved)  # the backbone changed, so the comparison above means something
        assert got[job]["modules"] == MODULES.get(source, MODULES["embeddinggemma"]), job
        assert all(r and "contains custom code" in r for r in got[job]["refusals"]), (job, got[job]["refusals"])
        assert_same_dense(heads[source], folder)


def test_bidirectional_attention_and_the_sliding_window_shape_the_embedding(heads, tmp_path):
    """The replica exercises what it claims: causal attention, or a window wider than the texts, embeds otherwise."""
    base = effir.load(heads["embeddinggemma"], device="cpu", dtype="fp32").encode_documents(TEXTS)
    for key, value in (("use_bidirectional_attention", False), ("sliding_window", 512)):
        folder = shutil.copytree(heads["embeddinggemma"], tmp_path / key)
        _patch(folder / "config.json", lambda c, k=key, v=value: {**c, k: v})
        other = effir.load(folder, device="cpu", dtype="fp32").encode_documents(TEXTS)
        assert (other - base).abs().max() > 1e-3, key  # every prompted text is longer than the window


@pytest.mark.parametrize("edit, match", [
    (lambda f: _patch(f / "2_Dense" / "config.json",
                      lambda c: {**c, "activation_function": "mypackage.activations.Swish"}),
     "uses activation 'mypackage.activations.Swish', which effir cannot reproduce"),
    (lambda f: _patch(f / "2_Dense" / "config.json", lambda c: {**c, "in_features": 16}),
     r"config.json \(16 -> 24\) needs"),
    (lambda f: (f / "2_Dense" / "pytorch_model.bin").unlink(), "has neither model.safetensors nor pytorch_model.bin"),
    (lambda f: _patch(f / "modules.json", lambda m: [m[0], m[2], m[1], m[3]]), "effir reproduces Transformer, Pooling"),
])
def test_heads_effir_cannot_reproduce_are_refused_in_one_line(tmp_path, tiny_beir, capsys, edit, match):
    folder = build_replica("labse-like", tmp_path / "m")
    edit(folder)
    with pytest.raises(EffirError, match=match):
        effir.load(folder, device="cpu")
    capsys.readouterr()
    rc = cli.main(["eval", str(folder), "--data", str(tiny_beir), "--output", str(tmp_path / "e"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and len([line for line in err.splitlines() if re.search(match, line)]) == 1, err
    assert "Traceback" not in err


def test_truncate_dim_is_checked_and_the_head_enters_the_fingerprint(heads, tmp_path):
    with pytest.raises(EffirError, match="truncate_dim 64 is more than the 24 dimensions"):
        effir.load(heads["labse-like"], device="cpu", truncate_dim=64)
    with pytest.raises(EffirError, match="truncate_dim must be a positive integer"):
        effir.load(heads["labse-like"], device="cpu", truncate_dim=0)
    enc = effir.load(heads["labse-like"], device="cpu", dtype="fp32")
    before = fingerprint(enc)
    with torch.no_grad():
        enc.head.layers[0].linear.bias.add_(1.0)
    assert fingerprint(enc) != before
