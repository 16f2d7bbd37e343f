"""`effir analyze` end to end on tiny models: scores.json schema, heatmap, sides, dropped layers, bad input."""

import json

import pytest
import torch

import effir
from effir.checkpoint import fingerprint
from effir.cli import main
from effir.redundancy import massive_sources, sublayer_importance

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GROUPS = ("attention", "mlp", "block")


def _analyze(model_dir, out, *extra):
    return main(["analyze", str(model_dir), "--output", str(out), "--device", "cpu", "--dtype", "fp32", *extra])


def _check_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img


@pytest.mark.both_cpu_paths
def test_both_sides_every_architecture(tiny_model_dir, tiny_beir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _analyze(tiny_model_dir, out, "--calibration", f"beir:{tiny_beir}", "--side", "both",
                    "--document-samples", "4") == 0
    r = json.loads((out / "scores.json").read_text())
    assert set(r) == {"format", "model", "fingerprint", "num_layers", "calibration", "side", "scores", "by_side",
                      "side_agreement", "drop_order", "peak_growth", "super_neuron_ratio", "massive"}
    assert r["massive"] == {"threshold": 100.0, **massive_sources(r["peak_growth"], r["super_neuron_ratio"])}
    assert len(r["super_neuron_ratio"]) == 4 and all(v >= 1 for v in r["super_neuron_ratio"])
    for g in GROUPS:
        assert len(r["peak_growth"][g]) == 4 and all(v > 0 for v in r["peak_growth"][g])
    assert r["format"] == 1 and r["model"] == str(tiny_model_dir) and r["num_layers"] == 4 and r["side"] == "both"
    assert r["fingerprint"] == fingerprint(effir.load(tiny_model_dir, device="cpu", dtype="fp32"))
    c = r["calibration"]
    assert c["source"] == f"beir:{tiny_beir}" and c["side"] == "both" and c["samples"] == 3 + 4
    q, d = c["by_side"]["query"], c["by_side"]["document"]
    assert q["samples"] == 3 and d["samples"] == 4 and c["tokens"] == q["tokens"] + d["tokens"]
    assert (q["seq_len"], d["seq_len"]) == (128, 512 if "bert" not in str(tiny_model_dir) else 256)
    for g in GROUPS:
        assert len(r["scores"][g]) == 4 and all(isinstance(v, float) and v > 0 for v in r["scores"][g])
        mean = [(a * q["tokens"] + b * d["tokens"]) / c["tokens"]
                for a, b in zip(r["by_side"]["query"][g], r["by_side"]["document"][g], strict=True)]
        assert r["scores"][g] == pytest.approx(mean, rel=1e-9)  # token-weighted mean of the two sides
        assert r["by_side"]["query"][g] != r["by_side"]["document"][g]  # the sides really are scored apart
        assert sorted(r["drop_order"][g]) == [0, 1, 2, 3]
        assert [r["scores"][g][i] for i in r["drop_order"][g]] == sorted(r["scores"][g])
        assert -1 <= r["side_agreement"][g] <= 1
    _check_png(out / "importance.png")
    table = capsys.readouterr().out
    assert "drop order" in table and "rank correlation" in table and len(table.splitlines()) >= 4 + 2


def test_side_query_uses_query_template(tiny_llama_dir, tiny_beir, tmp_path):
    out = tmp_path / "q"
    assert _analyze(tiny_llama_dir, out, "--calibration", f"beir:{tiny_beir}", "--side", "query",
                    "--query-prompt", "e5") == 0
    r = json.loads((out / "scores.json").read_text())
    assert r["side"] == "query" and "by_side" not in r and r["calibration"]["samples"] == 3
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32", query_prompt="e5")
    queries = [json.loads(line)["text"] for line in (tiny_beir / "queries.jsonl").read_text().splitlines()]
    expected = sublayer_importance(enc.model, enc.adapter, [enc.tokenize(queries, "query")])
    assert r["calibration"]["tokens"] == expected["tokens"]
    for g in GROUPS:
        assert r["scores"][g] == pytest.approx(expected[g], rel=1e-5)
    # a different prompt gives different scores, so the template really reaches the model
    out2 = tmp_path / "q2"
    assert _analyze(tiny_llama_dir, out2, "--calibration", f"beir:{tiny_beir}", "--side", "query",
                    "--query-prompt", "none") == 0
    assert json.loads((out2 / "scores.json").read_text())["scores"]["mlp"] != r["scores"]["mlp"]


def test_text_blocks_from_file(tiny_llama_dir, tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text("\n\n".join(["the cat is in the tree and the dog is in the water"] * 40))
    out = tmp_path / "t"
    assert _analyze(tiny_llama_dir, out, "--calibration", str(text), "--samples", "5", "--seq-len", "16",
                    "--batch-size", "2") == 0
    r = json.loads((out / "scores.json").read_text())
    assert r["side"] == "text" and r["calibration"]["side"] == "text"  # auto = text for a prose source
    assert r["calibration"]["samples"] == 5 and r["calibration"]["seq_len"] == 16 and r["calibration"]["tokens"] == 80
    _check_png(out / "importance.png")
    # seq-len is capped at max_position_embeddings (256 for the tiny models)
    out2 = tmp_path / "t2"
    assert _analyze(tiny_llama_dir, out2, "--calibration", str(text), "--samples", "1", "--seq-len", "4096") == 0
    assert json.loads((out2 / "scores.json").read_text())["calibration"]["seq_len"] == 256


def test_builtin_wiki_default(tiny_llama_dir, tmp_path):
    from effir.calibration import wiki_path
    from effir.utils import EffirError

    try:
        wiki_path()
    except EffirError:
        pytest.skip("gensim wheel not installed")
    out = tmp_path / "w"
    assert _analyze(tiny_llama_dir, out, "--samples", "2", "--seq-len", "32") == 0
    r = json.loads((out / "scores.json").read_text())
    assert r["calibration"]["source"] == "wiki" and r["calibration"]["tokens"] == 64


def test_dropped_sublayers_are_null(tiny_llama_dir, tiny_beir, tmp_path):
    from effir.checkpoint import save
    from effir.surgery import drop_sublayers

    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    drop_sublayers(enc.model, enc.adapter, attention=[2], mlp=[0, 3])
    small = save(enc, tmp_path / "small")
    out = tmp_path / "a"
    assert _analyze(small, out, "--calibration", f"beir:{tiny_beir}") == 0
    r = json.loads((out / "scores.json").read_text())
    assert r["scores"]["mlp"][0] is None and r["scores"]["mlp"][3] is None and r["scores"]["attention"][2] is None
    assert r["by_side"]["query"]["mlp"][0] is None
    assert sorted(r["drop_order"]["mlp"]) == [1, 2] and sorted(r["drop_order"]["attention"]) == [0, 1, 3]
    assert sorted(r["drop_order"]["block"]) == [0, 1, 2, 3]
    _check_png(out / "importance.png")


@pytest.mark.parametrize("calibration, match", [
    ("c4", "unknown calibration source"),
    ("{tmp}/missing.txt", "does not exist"),
    ("{tmp}/empty.txt", "contains no text"),
    ("beir:{tmp}/nowhere", "does not exist"),
])
def test_bad_calibration_is_one_line_exit_2(tiny_llama_dir, tmp_path, capsys, calibration, match):
    (tmp_path / "empty.txt").write_text("\n\n")
    out = tmp_path / "out"
    assert _analyze(tiny_llama_dir, out, "--calibration", calibration.format(tmp=tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("effir analyze: error:") and match in err
    assert not (out / "scores.json").exists()


def test_bad_options_and_no_clobber(tiny_llama_dir, tiny_beir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _analyze(tiny_llama_dir, out, "--samples", "0") == 2  # the old name, an alias, names the new one
    assert "--calibration-samples must be at least 1" in capsys.readouterr().err
    assert _analyze(tiny_llama_dir, out, "--calibration", f"beir:{tiny_beir}", "--side", "query") == 0
    before = (out / "scores.json").read_text()
    assert _analyze(tiny_llama_dir, out, "--calibration", f"beir:{tiny_beir}", "--side", "document") == 2
    assert "already exists" in capsys.readouterr().err and (out / "scores.json").read_text() == before
    assert _analyze(tiny_llama_dir, out, "--calibration", f"beir:{tiny_beir}", "--side", "document",
                    "--overwrite") == 0
    assert json.loads((out / "scores.json").read_text())["side"] == "document"
    capsys.readouterr()
    assert _analyze(tmp_path / "no-model", tmp_path / "x", "--calibration", f"beir:{tiny_beir}") == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_scores_are_left_padding_invariant_through_the_stage(tiny_llama_dir, tiny_beir):
    """The stage's batches are right-padded; the same texts left-padded score the same."""
    right = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    left = effir.load(tiny_llama_dir, device="cpu", dtype="fp32", padding_side="left")
    texts = ["the cat", "the river in the city is blue water and a fish is in it"]
    a = sublayer_importance(right.model, right.adapter, [right.tokenize(texts, "document")])
    b = sublayer_importance(left.model, left.adapter, [left.tokenize(texts, "document")])
    for g in GROUPS:
        torch.testing.assert_close(torch.tensor(a[g]), torch.tensor(b[g]), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_real_smollm2_on_scifact(tmp_path):
    """Real weights, real data: both sides of SciFact; the embedding-adjacent first layer is never redundant."""
    from conftest import SCIFACT

    from effir.files import package_file
    from effir.refs import BUILTINS
    from effir.utils import EffirError

    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    b = BUILTINS["smollm2-135m"]
    try:
        package_file(b.package, b.relpath, b.install)
    except EffirError:
        pytest.skip("smollm2-135m weights not installed")
    out = tmp_path / "real"
    assert main(["analyze", "smollm2-135m", "--calibration", f"beir:{SCIFACT}", "--samples", "8",
                 "--document-samples", "4", "--output", str(out), "--device", "cpu"]) == 0
    r = json.loads((out / "scores.json").read_text())
    assert r["num_layers"] == 30 and r["calibration"]["by_side"]["document"]["samples"] == 4
    for g in GROUPS:
        assert r["drop_order"][g][-1] == 0  # layer 0 rewrites the embeddings: most important in every group
        assert all(0 < v < 1.5 for v in r["scores"][g])
    assert r["side_agreement"]["block"] > 0.5
    # the attention sink: MLP 11 writes SmolLM2's massive activation (853x on prose); flagged whatever its score
    assert 11 in r["massive"]["mlp"] and r["peak_growth"]["mlp"][11] >= 100 and r["super_neuron_ratio"][11] >= 1000
    assert r["massive"]["attention"] == [] and 0 not in r["massive"]["mlp"]
    _check_png(out / "importance.png")
