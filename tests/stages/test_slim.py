import json

import pytest
import torch
from conftest import write_beir

import effir
from effir.cli import main
from effir.surgery import count_parameters, structure_of

CORPUS = [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate([
    "paris is the capital of france", "the river in the city is blue water", "a fish is in the water of the river",
    "the sun is a star and the moon is not", "a cell protein and a gene in cancer", "the vaccine trial in patient",
    "the cat and the dog", "a bird in a green tree", "red leaf of a blue tree", "the planet and the star",
])]
QUERIES = [{"_id": f"q{i}", "text": CORPUS[i]["text"].split(" ", 2)[-1]} for i in range(10)]
QRELS = [(f"q{i}", f"d{i}", 1) for i in range(10)]


@pytest.fixture
def train_beir(tmp_path):
    return write_beir(tmp_path / "train-beir", CORPUS, QUERIES, QRELS, split="train")


def _args(model, out, *extra):
    return ["slim", str(model), "--output", str(out), "--width-multiple", "8", "--device", "cpu", "--no-progress",
            *extra]


def test_learned_slim_end_to_end(tiny_model_dir, train_beir, tmp_path):
    out = tmp_path / "slim"
    rc = main(_args(tiny_model_dir, out, "--train", str(train_beir), "--gate-steps", "3", "--batch-size", "4",
                    "--num-negatives", "2", "--ratio", "0.3"))
    assert rc == 0
    summary = json.loads((out / "slim.json").read_text())
    assert all(w % 8 == 0 and 0 < w <= 64 for w in summary["widths_after"])
    assert abs(summary["removed_fraction"] - 0.3) <= 8 * 4 / 256 + 1e-9  # up to rounding to multiples of 8
    assert (out / "widths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "checkpoint.pt").exists()
    enc = effir.load(out / "model", device="cpu", dtype="fp32")
    assert structure_of(enc.model, enc.adapter)["mlp_widths"] == summary["widths_after"]
    assert count_parameters(enc.model, enc.adapter) == summary["parameters_after"]
    assert summary["parameters_after"]["total"] < summary["parameters_before"]["total"]
    assert torch.isfinite(enc.encode_queries(["what is the capital of france"])).all()
    # a finished run is not overwritten silently
    assert main(_args(tiny_model_dir, out, "--method", "magnitude")) == 2


def test_magnitude_baseline_cuts_every_layer_equally(tiny_model_dir, tmp_path):
    out = tmp_path / "mag"
    assert main(_args(tiny_model_dir, out, "--method", "magnitude", "--ratio", "0.25")) == 0
    summary = json.loads((out / "slim.json").read_text())
    assert summary["widths_after"] == [48, 48, 48, 48]


def test_resume_after_interruption_gives_the_same_gates(tiny_llama_dir, train_beir, tmp_path):
    common = ["--train", str(train_beir), "--batch-size", "4", "--num-negatives", "2", "--save-every", "2"]
    full = tmp_path / "full"
    assert main(_args(tiny_llama_dir, full, *common, "--gate-steps", "4")) == 0
    part = tmp_path / "part"
    # an interrupted run is a checkpoint at step 2 with no slim.json: make one by running the first 2 steps only
    assert main(_args(tiny_llama_dir, part, *common, "--gate-steps", "4")) == 0
    ckpt_run = tmp_path / "resumed"
    from effir.stages import slim

    calls = {"n": 0}
    real = slim.info_nce

    def crash_after_two(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    slim.info_nce = crash_after_two
    try:
        assert main(_args(tiny_llama_dir, ckpt_run, *common, "--gate-steps", "4")) == 130
    finally:
        slim.info_nce = real
    assert (ckpt_run / "checkpoint.pt").exists() and not (ckpt_run / "slim.json").exists()
    assert main(_args(tiny_llama_dir, ckpt_run, *common, "--gate-steps", "4")) == 0
    a = json.loads((full / "slim.json").read_text())
    b = json.loads((ckpt_run / "slim.json").read_text())
    assert a["widths_after"] == b["widths_after"] and a["gate_stats"] == b["gate_stats"]
    log = lambda p: [json.loads(x)["loss"] for x in (p / "slim_log.jsonl").read_text().splitlines()]  # noqa: E731
    assert log(full) == pytest.approx(log(ckpt_run), rel=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--ratio", "0"], "--ratio must be in (0, 1)"),
    (["--ratio", "1.2"], "--ratio must be in (0, 1)"),
    (["--method", "magnitude", "--ratio", "0.99", "--width-multiple", "64"], "empty"),
    ([], "needs --train"),
])
def test_bad_input_is_one_line_exit_2(tiny_llama_dir, tmp_path, capsys, extra, message):
    args = ["slim", str(tiny_llama_dir), "--output", str(tmp_path / "o"), "--device", "cpu", "--no-progress", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_model_with_no_mlp_left_is_an_error(tiny_llama_dir, tmp_path, capsys):
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    from effir.checkpoint import save
    from effir.surgery import drop_sublayers

    drop_sublayers(enc.model, enc.adapter, mlp=[0, 1, 2, 3])
    enc.meta["structure"] = structure_of(enc.model, enc.adapter)
    save(enc, tmp_path / "nomlp")
    assert main(["slim", str(tmp_path / "nomlp"), "--output", str(tmp_path / "o"), "--method", "magnitude"]) == 2
    assert "no MLP left" in capsys.readouterr().err
