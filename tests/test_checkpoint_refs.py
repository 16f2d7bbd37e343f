"""Model references that cannot be loaded: each is one EffirError line that says what is wrong."""

import json

import pytest

import effir
from effir.utils import EffirError


def _one_line_error(ref, match):
    with pytest.raises(EffirError, match=match) as info:
        effir.load(ref, device="cpu", dtype="fp32")
    assert "\n" not in str(info.value)
    return str(info.value)


def gpt2_dir(tmp_path):
    """A tiny, valid gpt2 folder: a real architecture that effir's table does not support."""
    from transformers import AutoConfig

    d = tmp_path / "tiny-gpt2"
    AutoConfig.for_model("gpt2", n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32,
                        bos_token_id=1, eos_token_id=2).save_pretrained(d)
    return d


def test_nonexistent_path(tmp_path):
    _one_line_error(tmp_path / "nope", r"not found: no such file or directory, and not a built-in name")
    _one_line_error("./nope", "not found")


def test_file_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    _one_line_error(tmp_path / "weights.bin", r"is a file but not a .gguf model")
    (tmp_path / "fake.gguf").write_text("not gguf at all")
    _one_line_error(tmp_path / "fake.gguf", r"fake.gguf is not a GGUF file \(it does not start with the bytes 'GGUF'\)")
    assert "converting" not in capsys.readouterr().err  # refused before any work is announced
    (tmp_path / "truncated.gguf").write_bytes(b"GGUF" + b"\3\0\0\0" + b"\0" * 8)
    _one_line_error(tmp_path / "truncated.gguf", r"could not be read as a GGUF model")
    assert not list((tmp_path / "cache").glob("models/*"))  # nothing that looks like a converted model


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", "is a directory without config.json")


def test_unsupported_model_type(tmp_path):
    msg = _one_line_error(gpt2_dir(tmp_path), r"unsupported architecture model_type='gpt2'; supported: bert, ")
    assert "effir/arch.py" in msg


def test_unknown_model_type_in_config(tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    _one_line_error(d, "no-such-arch")


def test_hub_id_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error("some-org/some-model-that-is-not-cached", r"could not load 'some-org/.*no network")
