"""The ``effir`` shell: every verb is listed, and bad input is one line on stderr with exit code 2."""

import os
import subprocess
import sys

import pytest
from conftest import write_beir
from test_checkpoint_refs import gpt2_dir

from effir.cli import COMMANDS, main


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as info:
        main(["-h"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    squashed = "".join(out.split())  # argparse wraps long help lines
    for verb, (_, help_text) in COMMANDS.items():
        assert f"  {verb} " in out and "".join(help_text.split()) in squashed, verb


def test_each_verb_has_help(capsys):
    for verb in COMMANDS:
        with pytest.raises(SystemExit) as info:
            main([verb, "-h"])
        assert info.value.code == 0 and f"effir {verb}" in capsys.readouterr().out


def test_no_verb_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "VERB" in capsys.readouterr().out


def _assert_one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("effir eval: error: ") and "\n" not in err, err
    assert match in err, err
    assert "Traceback" not in err


def _eval_args(model, data, tmp_path, *extra):
    return ["eval", str(model), "--data", str(data), "--output", str(tmp_path / "out"), "--device", "cpu", *extra]


def test_bad_model_references(capsys, tmp_path, tiny_beir):
    _assert_one_line_error(capsys, _eval_args(tmp_path / "no-model", tiny_beir, tmp_path), "not found")
    _assert_one_line_error(capsys, _eval_args(gpt2_dir(tmp_path), tiny_beir, tmp_path),
                           "unsupported architecture model_type='gpt2'")
    assert not (tmp_path / "out" / "results.json").exists()


def test_bad_data(capsys, tmp_path, tiny_llama_dir, tiny_beir):
    (tiny_beir / "corpus.jsonl").write_text('{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": \n')
    _assert_one_line_error(capsys, _eval_args(tiny_llama_dir, tiny_beir, tmp_path), "corpus.jsonl:2: not valid JSON")
    good = write_beir(tmp_path / "good")
    _assert_one_line_error(capsys, _eval_args(tiny_llama_dir, good, tmp_path, "--split", "dev"),
                           "split 'dev' not found")
    _assert_one_line_error(capsys, _eval_args(tiny_llama_dir, tmp_path / "nowhere", tmp_path), "not found")
    _assert_one_line_error(capsys, _eval_args(tiny_llama_dir, good, tmp_path, "--top-k", "99"), "--top-k")
    _assert_one_line_error(capsys, _eval_args(tiny_llama_dir, good, tmp_path, "--device", "gpu"), "not a device")
    assert not (tmp_path / "out").exists()


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "minilm-l6", "--output", "x"])  # --data missing
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and "--data" in err
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_real_process_exit_code(tmp_path, tiny_beir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "effir", *_eval_args(tmp_path / "missing", tiny_beir, tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("effir eval: error: model ") and "not found" in lines[0]
    assert proc.stdout == ""


def test_every_float_option_refuses_non_finite_values():
    """One shared argparse type for every float option of every verb: nan / inf never reach a stage."""
    import argparse

    from effir.stages import verb_parser
    from effir.utils import finite_float

    floats = [(verb, a) for verb in COMMANDS for a in verb_parser(verb).options if a.type in (float, finite_float)]
    assert {verb for verb, _ in floats} >= {"slim", "finetune", "bench", "verify"}
    for verb, action in floats:
        assert action.type is finite_float, f"effir {verb} {action.option_strings[0]} takes a bare float"
        for bad in ("nan", "inf", "-inf", "1e999"):
            with pytest.raises(argparse.ArgumentTypeError):
                action.type(bad)
