"""`effir prune` end to end on tiny models: the 2:4 pattern in every pruned matrix of every architecture, before and
after fine-tuning and reload; the stages after it keep (or drop) its record; one-line errors on bad input."""

import json

import pytest
import torch
from conftest import TINY_CORPUS, TINY_QUERIES, WORDS, write_beir
from safetensors.torch import load_file

import effir
from effir.checkpoint import read_effir_json
from effir.cli import main
from effir.sparsity import nonzeros_per_group, projections

pytest.importorskip("llmcompressor", reason="effir prune's kernels: pip install --no-deps llmcompressor")


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(30)) for i in range(12)))
    return path


@pytest.fixture
def train_dir(tmp_path):
    qrels = [("q1", "d1", 1), ("q2", "d2", 1), ("q3", "d6", 1)]
    return write_beir(tmp_path / "beir", corpus=TINY_CORPUS, queries=TINY_QUERIES, qrels=qrels, split="train")


def prune(model, out, calib, *extra):
    return main(["prune", str(model), "--output", str(out), "--calibration", str(calib), "--calibration-samples", "4",
                 "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--no-progress", *map(str, extra)])


def finetune(model, data, out, *extra):
    return main(["finetune", str(model), "--train", str(data), "--output", str(out), "--device", "cpu",
                 "--no-progress", "--max-steps", "2", "--batch-size", "2", "--num-negatives", "1", "--negatives",
                 "random", "--lr", "1e-2", *map(str, extra)])


def exactly_two_of_four(folder) -> int:
    """Reload ``folder`` and check every pruned matrix: exactly 2 non-zeros in every 4 consecutive inputs of each
    row. Returns how many matrices it checked."""
    enc = effir.load(folder, device="cpu", dtype="fp32")
    found = projections(enc.model, enc.adapter)
    for name, module in found.items():
        counts = nonzeros_per_group(module.weight, 4)
        assert bool((counts == 2).all()), f"{folder}: {name} has groups with {sorted(set(counts.flatten().tolist()))}"
    return len(found)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.both_cpu_paths
def test_the_pattern_holds_before_and_after_finetuning_and_reload(tiny_model_dir, train_dir, calib, tmp_path,
                                                                   method, capsys):
    out = tmp_path / "pruned"
    assert prune(tiny_model_dir, out, calib, "--method", method) == 0
    assert f"effir prune ({method} 2:4)" in capsys.readouterr().out
    n = exactly_two_of_four(out / "model")
    summary = json.loads((out / "prune.json").read_text())
    assert summary["projections"] == n and summary["zeros"] * 2 == summary["weights"]
    meta = read_effir_json(out / "model")
    assert meta["sparsity"]["pattern"] == "2:4" and meta["sparsity"]["method"] == method
    assert meta["history"][-1]["stage"] == "prune" and meta["history"][-1]["calibration"]["samples"] == 4
    # only the projections changed: embeddings, norms and heads are the source's
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    enc = effir.load(out / "model", device="cpu")
    pruned = {f"{name}.weight" for name in projections(enc.model, enc.adapter)}
    assert all(torch.equal(before[k], after[k]) for k in before if k not in pruned)

    tuned = tmp_path / "tuned"
    assert finetune(out / "model", train_dir, tuned) == 0
    assert exactly_two_of_four(tuned / "model") == n
    meta = read_effir_json(tuned / "model")
    assert meta["sparsity"]["pattern"] == "2:4"  # the record survives the stage, for the next one
    step = meta["history"][-1]
    assert step["stage"] == "finetune" and step["kept_sparsity"] == "2:4"
    assert step["rezeroed"] > 0  # the merged LoRA deltas did land on the zeros: putting them back was needed
    assert [h["stage"] for h in meta["history"]] == ["prune", "finetune"]


def test_full_finetuning_never_moves_a_zero(tiny_llama_dir, train_dir, calib, tmp_path):
    assert prune(tiny_llama_dir, tmp_path / "p", calib, "--method", "wanda") == 0
    assert finetune(tmp_path / "p" / "model", train_dir, tmp_path / "full", "--full", "--lr", "1e-3") == 0
    assert exactly_two_of_four(tmp_path / "full" / "model") == 28
    step = read_effir_json(tmp_path / "full" / "model")["history"][-1]
    assert step["kept_sparsity"] == "2:4" and step["rezeroed"] == 0  # held at zero through training
    before = load_file(tmp_path / "p" / "model" / "model.safetensors")
    after = load_file(tmp_path / "full" / "model" / "model.safetensors")
    assert not torch.equal(before["layers.0.mlp.down_proj.weight"], after["layers.0.mlp.down_proj.weight"])


def test_distill_keeps_the_zeros_drop_keeps_the_record_slim_breaks_it(tiny_llama_dir, calib, tmp_path, capsys):
    pruned = tmp_path / "p" / "model"
    assert prune(tiny_llama_dir, tmp_path / "p", calib, "--method", "sparsegpt") == 0
    assert main(["distill", str(pruned), "--teacher", str(tiny_llama_dir), "--texts", str(calib), "--output",
                 str(tmp_path / "d"), "--device", "cpu", "--no-progress", "--max-steps", "2", "--batch-size", "2",
                 "--lr", "1e-2"]) == 0
    assert exactly_two_of_four(tmp_path / "d" / "model") == 28
    assert read_effir_json(tmp_path / "d" / "model")["history"][-1]["kept_sparsity"] == "2:4"
    assert main(["drop", str(pruned), "--strategy", "last", "--mlp", "1", "--output", str(tmp_path / "dr"),
                 "--device", "cpu"]) == 0
    assert exactly_two_of_four(tmp_path / "dr" / "model") == 25  # the MLP of layer 3 (3 matrices) is gone
    assert read_effir_json(tmp_path / "dr" / "model")["sparsity"]["pattern"] == "2:4"
    capsys.readouterr()
    assert main(["slim", str(pruned), "--method", "magnitude", "--ratio", "0.25", "--width-multiple", "4",
                 "--output", str(tmp_path / "sl"), "--device", "cpu", "--no-progress"]) == 0
    assert "no longer has the 2:4 pattern of `effir prune`" in capsys.readouterr().err
    assert "sparsity" not in read_effir_json(tmp_path / "sl" / "model")


def test_a_finished_run_is_kept_unless_overwrite(tiny_llama_dir, calib, tmp_path, capsys):
    out = tmp_path / "p"
    assert prune(tiny_llama_dir, out, calib, "--method", "wanda") == 0
    capsys.readouterr()
    assert prune(tiny_llama_dir, out, calib, "--method", "sparsegpt") == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert prune(tiny_llama_dir, out, calib, "--method", "sparsegpt", "--overwrite") == 0
    assert read_effir_json(out / "model")["sparsity"]["method"] == "sparsegpt"


@pytest.mark.parametrize("extra, words", [
    (["--method", "wanda", "--pattern", "4:2"], "--pattern '4:2' is not N:M with 0 < N < M"),
    (["--method", "wanda", "--pattern", "half"], "--pattern 'half' is not N:M"),
    (["--method", "sparsegpt", "--pattern", "2:5"], "takes 32 inputs, not a multiple of 5"),
    (["--method", "magnitude"], "argument --method: invalid choice: 'magnitude'"),
    (["--method", "sparsegpt", "--block-size", "6"], "--block-size 6 must be a positive multiple of M = 4"),
    (["--method", "wanda", "--calibration-samples", "0"], "--calibration-samples must be at least 1"),
    (["--method", "wanda", "--dampening", "nan"], "--dampening"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_llama_dir, calib, tmp_path, capsys, extra, words):
    out = tmp_path / "p"
    try:
        code = prune(tiny_llama_dir, out, calib, *extra)
    except SystemExit as e:  # usage errors leave argparse as the shell would see them
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("effir prune: error: "), err
    assert words in lines[0], lines[0]
    assert not out.exists()
