"""`effir drop` end to end on tiny models: which sub-layers go, what is saved, and one-line errors on bad input."""

import json

import pytest
import torch

import effir
from effir import cli
from effir.arch import get_path, layer_list
from effir.checkpoint import fingerprint, read_effir_json
from effir.surgery import drop_sublayers

TEXTS = ["what is the capital of france", "fish", "the river in the city is blue water"]
SCORES = {"attention": [0.05, 0.9, 0.01, 0.3], "mlp": [0.5, 0.1, 0.3, 0.2], "block": [0.4, 0.2, 0.9, 0.1]}


def write_scores(path, model_dir, scores=SCORES, **extra):
    """A scores.json in `effir analyze`'s format, for the model as `effir drop --device cpu` loads it."""
    enc = effir.load(model_dir, device="cpu")
    report = {"format": 1, "model": str(model_dir), "fingerprint": fingerprint(enc), "num_layers": 4,
              "calibration": {"source": "hand-made"}, "side": "both", "scores": scores,
              "by_side": {"query": scores, "document": {**scores, "mlp": [0.1, 0.5, 0.3, 0.2]}}, **extra}
    path.write_text(json.dumps(report))
    return path


def drop(*args):
    return cli.main(["drop", *map(str, args), "--device", "cpu"])


def _embeddings(enc):
    return torch.cat([enc.encode(TEXTS, "query"), enc.encode(TEXTS, "document")])


@pytest.mark.both_cpu_paths
def test_importance_drops_the_lowest_of_each_group(tiny_model_dir, tmp_path, capsys):
    scores = write_scores(tmp_path / "scores.json", tiny_model_dir)
    out = tmp_path / "out"
    assert drop(tiny_model_dir, "--scores", scores, "--mlp", 2, "--attention", 1, "--output", out,
                "--compensate", "none") == 0
    meta = read_effir_json(out / "model")
    assert meta["structure"]["dropped_mlp"] == [1, 3]  # scores 0.1 and 0.2
    assert meta["structure"]["dropped_attention"] == [2]  # score 0.01
    step = meta["history"][-1]
    assert step["stage"] == "drop" and step["strategy"] == "importance" and step["dropped_mlp"] == [1, 3]
    assert step["fingerprint"] == json.loads(scores.read_text())["fingerprint"]
    text = capsys.readouterr().out
    assert "parameters before:" in text and "parameters after:" in text and "dropped MLP now: [1, 3]" in text
    assert f"{meta['parameters']['without_embeddings']:,} without embeddings" in text
    # the saved model is exactly the source model with those sub-layers skipped
    ref = effir.load(tiny_model_dir, device="cpu", dtype="fp32")
    drop_sublayers(ref.model, ref.adapter, attention=[2], mlp=[1, 3])
    torch.testing.assert_close(_embeddings(effir.load(out / "model", device="cpu", dtype="fp32")), _embeddings(ref),
                               atol=1e-5, rtol=0)


def test_blocks_then_groups_and_side_scores(tiny_llama_dir, tmp_path):
    scores = write_scores(tmp_path / "scores.json", tiny_llama_dir)
    out = tmp_path / "out"
    assert drop(tiny_llama_dir, "--scores", scores, "--blocks", 2, "--mlp", 1, "--output", out) == 0
    s = read_effir_json(out / "model")["structure"]
    # blocks 3 and 1 (block scores 0.1, 0.2) go whole; then the lowest MLP left by MLP score: layer 2 (0.3 < 0.5)
    assert s["dropped_attention"] == [1, 3] and s["dropped_mlp"] == [1, 2, 3]
    assert read_effir_json(out / "model")["history"][-1]["blocks"] == [1, 3]
    out2 = tmp_path / "doc-side"
    assert drop(tiny_llama_dir, "--scores", scores, "--mlp", 1, "--side", "document", "--output", out2) == 0
    assert read_effir_json(out2 / "model")["structure"]["dropped_mlp"] == [0]  # document-side MLP scores rank layer 0 first


def test_massive_activation_sources_are_kept_unless_asked(tiny_llama_dir, tmp_path, capsys):
    massive = {"threshold": 100.0, "attention": [], "mlp": [1], "block": []}
    scores = write_scores(tmp_path / "scores.json", tiny_llama_dir, massive=massive)
    assert drop(tiny_llama_dir, "--scores", scores, "--mlp", 2, "--output", tmp_path / "kept") == 0
    assert read_effir_json(tmp_path / "kept" / "model")["structure"]["dropped_mlp"] == [2, 3]  # 1 (0.1) is kept
    assert "keeping mlp 1: massive-activation source" in capsys.readouterr().err
    assert drop(tiny_llama_dir, "--scores", scores, "--blocks", 2, "--output", tmp_path / "blocks") == 0
    assert read_effir_json(tmp_path / "blocks" / "model")["history"][-1]["blocks"] == [0, 3]  # block 1 holds the source
    assert drop(tiny_llama_dir, "--scores", scores, "--mlp", 2, "--drop-massive", "--output", tmp_path / "all") == 0
    assert read_effir_json(tmp_path / "all" / "model")["structure"]["dropped_mlp"] == [1, 3]
    capsys.readouterr()
    assert drop(tiny_llama_dir, "--scores", scores, "--mlp", 4, "--output", tmp_path / "too-many") == 2
    err = capsys.readouterr().err
    assert "only 3 mlp left to drop (1 kept as massive-activation sources; --drop-massive allows them)" in err


def test_strategy_last_needs_no_scores(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert drop(tiny_llama_dir, "--strategy", "last", "--blocks", 1, "--mlp", 2, "--output", out) == 0
    s = read_effir_json(out / "model")["structure"]
    assert s["dropped_attention"] == [3] and s["dropped_mlp"] == [1, 2, 3]


def test_dropping_from_a_compressed_model_composes(tiny_llama_dir, tmp_path):
    first = tmp_path / "first"
    assert drop(tiny_llama_dir, "--strategy", "last", "--mlp", 1, "--output", first, "--compensate", "none") == 0
    # scores of the compressed model: the dropped MLP 3 scores null (as `effir analyze` writes it)
    scores = {**SCORES, "mlp": [0.5, 0.1, 0.3, None]}
    path = write_scores(tmp_path / "scores2.json", first / "model", scores=scores)
    second = tmp_path / "second"
    assert drop(first / "model", "--scores", path, "--mlp", 2, "--output", second, "--compensate", "none") == 0
    meta = read_effir_json(second / "model")
    assert meta["structure"]["dropped_mlp"] == [1, 2, 3]  # 2 more, by original index
    assert [h["dropped_mlp"] for h in meta["history"]] == [[3], [1, 2]]
    ref = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    drop_sublayers(ref.model, ref.adapter, mlp=[1, 2, 3])
    torch.testing.assert_close(_embeddings(effir.load(second / "model", device="cpu", dtype="fp32")), _embeddings(ref),
                               atol=1e-5, rtol=0)
    with_last = tmp_path / "third"
    assert drop(second / "model", "--strategy", "last", "--mlp", 1, "--output", with_last) == 0
    assert read_effir_json(with_last / "model")["structure"]["dropped_mlp"] == [0, 1, 2, 3]  # the last MLP still there


def _one_line_error(capsys, code, match):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("effir")]  # (transformers' progress bars aside)
    assert len(lines) == 1 and "Traceback" not in err and match in lines[0], err


@pytest.mark.parametrize("flags, match", [
    (["--strategy", "last", "--mlp", 5], "cannot drop 5 mlp: the model has 4 layers"),
    (["--strategy", "last", "--blocks", 5], "cannot drop 5 blocks"),
    (["--strategy", "last", "--blocks", 4, "--attention", 1], "only 0 attention left"),
    (["--strategy", "last"], "nothing to drop"),
    (["--mlp", 1], "needs --scores"),
    (["--strategy", "last", "--mlp", -1], "--mlp must be >= 0"),
    (["--mlp", 1, "--scores", "missing.json"], "not found"),
])
def test_bad_counts_are_one_line_errors(tiny_llama_dir, tmp_path, capsys, flags, match):
    _one_line_error(capsys, drop(tiny_llama_dir, *flags, "--output", tmp_path / "out"), match)
    assert not (tmp_path / "out").exists()


def test_scores_of_another_model_are_refused_unless_forced(tiny_llama_dir, tmp_path, capsys):
    scores = write_scores(tmp_path / "scores.json", tiny_llama_dir)
    report = json.loads(scores.read_text())
    report["fingerprint"] = "0123456789abcdef"
    scores.write_text(json.dumps(report))
    _one_line_error(capsys, drop(tiny_llama_dir, "--scores", scores, "--mlp", 1, "--output", tmp_path / "o"),
                    "computed on a different model")
    assert not (tmp_path / "o").exists()
    assert drop(tiny_llama_dir, "--scores", scores, "--mlp", 1, "--output", tmp_path / "o", "--force") == 0
    assert read_effir_json(tmp_path / "o" / "model")["structure"]["dropped_mlp"] == [1]


@pytest.mark.parametrize("edit, match", [
    (lambda r: r.update(num_layers=6), "scores 6 layers"),
    (lambda r: r["scores"].update(mlp=[0.1, 0.2]), "scores.mlp must be 4 finite numbers"),
    (lambda r: r.update(format=7), "not an effir scores file"),
    (lambda r: r.pop("by_side"), "no document-side scores"),
])
def test_bad_scores_files(tiny_llama_dir, tmp_path, capsys, edit, match):
    scores = write_scores(tmp_path / "scores.json", tiny_llama_dir)
    report = json.loads(scores.read_text())
    edit(report)
    scores.write_text(json.dumps(report))
    code = drop(tiny_llama_dir, "--scores", scores, "--mlp", 1, "--side", "document", "--output", tmp_path / "o")
    _one_line_error(capsys, code, match)
    scores.write_text("{not json")
    _one_line_error(capsys, drop(tiny_llama_dir, "--scores", scores, "--mlp", 1, "--output", tmp_path / "o"),
                    "not valid JSON")


def test_existing_output_needs_overwrite(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert drop(tiny_llama_dir, "--strategy", "last", "--mlp", 1, "--output", out) == 0
    _one_line_error(capsys, drop(tiny_llama_dir, "--strategy", "last", "--mlp", 2, "--output", out), "--overwrite")
    assert read_effir_json(out / "model")["structure"]["dropped_mlp"] == [3]  # untouched
    assert drop(tiny_llama_dir, "--strategy", "last", "--mlp", 2, "--output", out, "--overwrite") == 0
    assert read_effir_json(out / "model")["structure"]["dropped_mlp"] == [2, 3]


def test_corrupted_effir_json_in_the_input_model(tiny_llama_dir, tmp_path, capsys):
    first = tmp_path / "first"
    assert drop(tiny_llama_dir, "--strategy", "last", "--mlp", 1, "--output", first) == 0
    (first / "model" / "effir.json").write_text("{oops")
    _one_line_error(capsys, drop(first / "model", "--strategy", "last", "--mlp", 1, "--output", tmp_path / "o"), "corrupted")


def _stored_dtypes(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.mark.parametrize("source_dtype, flags, stored", [
    (torch.float32, [], "F32"), (torch.bfloat16, [], "BF16"), (torch.float32, ["--dtype", "bf16"], "BF16")])
@pytest.mark.both_cpu_paths
def test_the_saved_dtype_is_the_source_dtype_unless_asked(_tiny_models, tiny_tokenizer, tmp_path, cpu_bf16,
                                                        source_dtype, flags, stored):
    """On a CPU with native bf16 (forced here) too: the dtype written is the source's, never the compute dtype."""
    import copy

    src = tmp_path / "src"
    copy.deepcopy(_tiny_models["llama"]).to(source_dtype).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    assert drop(src, "--strategy", "last", "--mlp", 1, "--output", tmp_path / "out", *flags) == 0
    assert _stored_dtypes(tmp_path / "out" / "model") == {stored}
    assert effir.load(tmp_path / "out" / "model", device="cpu", dtype="source").dtype == effir.utils.floating_dtype(stored)


def test_the_model_is_written_into_DIR_model_like_every_stage_writes_it(tiny_llama_dir, tmp_path, capsys):
    """A new user's next step after a drop: `effir slim DIR/model`; and passing DIR names DIR/model in one line."""
    out = tmp_path / "out"
    assert drop(tiny_llama_dir, "--strategy", "last", "--mlp", 1, "--output", out) == 0
    assert cli.main(["slim", str(out / "model"), "--method", "magnitude", "--ratio", "0.25", "--width-multiple", "4",
                     "--output", str(tmp_path / "slim"), "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    _one_line_error(capsys, drop(out, "--strategy", "last", "--mlp", 1, "--output", tmp_path / "o"),
                    f"pass {out / 'model'}")


@pytest.mark.parametrize("compensate, rank", [("lstsq", None), ("lstsq", 4), ("bias", None)])
def test_each_dropped_mlp_is_replaced_by_its_fitted_stand_in(tiny_model_dir, tmp_path, compensate, rank):
    """--compensate (default lstsq): every dropped MLP becomes a map of rank --compensate-rank (default: the hidden
    size) plus a bias, or a bias alone; counted in the parameters, recorded with its fit, and embedding otherwise
    than the plain drop (reloading in effir, transformers and sentence-transformers: test_verify)."""
    out = tmp_path / "out"
    flags = ["--compensate", compensate, *(["--compensate-rank", rank] if rank else []), "--compensate-samples", 8,
             "--seq-len", 32]
    assert drop(tiny_model_dir, "--strategy", "last", "--mlp", 2, "--attention", 1, "--output", out, *flags) == 0
    assert drop(tiny_model_dir, "--strategy", "last", "--mlp", 2, "--attention", 1, "--output", tmp_path / "plain",
                "--compensate", "none") == 0
    meta, plain = (read_effir_json(p / "model") for p in (out, tmp_path / "plain"))
    hidden = effir.load(tiny_model_dir, device="cpu").model.config.hidden_size
    want = 0 if compensate == "bias" else rank or hidden
    assert meta["structure"]["mlp_maps"] == {"2": want, "3": want} and meta["structure"]["dropped_mlp"] == [2, 3]
    assert "mlp_maps" not in plain["structure"]
    src = effir.load(tiny_model_dir, device="cpu")
    extra = {0: hidden, 4: hidden + 2 * 4 * hidden, hidden: hidden + hidden * hidden}[want]  # bias + map
    a, layer = src.adapter, layer_list(src.model, src.adapter)[3]
    kept_norm = a.mlp_out_norm if a.post_norm else a.mlp_in_norm if want else None  # what the map keeps
    extra += sum(p.numel() for p in get_path(layer, kept_norm).parameters()) if kept_norm else 0
    assert meta["parameters"]["total"] - plain["parameters"]["total"] == 2 * extra
    step = meta["history"][-1]
    assert step["compensate"] == compensate and step["compensate_rank"] == want and step["compensate_samples"] == 8
    assert all(0 <= e < 1 for e in step["compensation"]["error_refit"]) and step["compensation"]["layers"] == [2, 3]
    got, bare = (_embeddings(effir.load(p / "model", device="cpu", dtype="fp32")) for p in (out, tmp_path / "plain"))
    assert (got - bare).abs().max() > 1e-3


def test_bad_compensation_options_are_one_line_errors(tiny_llama_dir, tmp_path, capsys):
    for flags, match in ((["--compensate-rank", 0], "--compensate-rank must be >= 1"),
                         (["--compensate-samples", 0], "--compensate-samples must be >= 1"),
                         (["--calibration", str(tmp_path / "none.txt")], "none.txt")):
        code = drop(tiny_llama_dir, "--strategy", "last", "--mlp", 1, "--output", tmp_path / "o", *flags)
        _one_line_error(capsys, code, match)
        assert not (tmp_path / "o" / "model").exists()
