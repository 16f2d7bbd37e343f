"""The compressed-model format: save -> reload three ways (effir.load, plain transformers, verify) is exact."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build_tiny_tokenizer

import effir
from effir.arch import ADAPTERS
from effir.checkpoint import EFFIR_JSON, fingerprint, read_effir_json, save
from effir.model_files import REMOTE_FILE, weight_keys
from effir.surgery import count_parameters, drop_sublayers, dropped_prefixes, slice_mlp, structure_of
from effir.utils import EffirError

TEXTS = ["what is the capital of france", "fish", "the river in the city is blue water and a fish is in it"]


def _compress(enc, attention=(1,), mlp=(0, 2), narrow=True):
    drop_sublayers(enc.model, enc.adapter, attention, mlp)
    if narrow:  # a hand-made width change, as width pruning will make: layer 3 keeps 20 of 64 neurons
        slice_mlp(enc.model, enc.adapter, 3, list(range(0, 60, 3)))
    enc.meta["structure"] = structure_of(enc.model, enc.adapter)
    return enc


def _embeddings(enc):
    return torch.cat([enc.encode(TEXTS, "query"), enc.encode(TEXTS, "document")])


def test_save_reload_with_effir_is_exact(tiny_model_dir, tmp_path):
    enc = _compress(effir.load(tiny_model_dir, device="cpu", dtype="fp32"))
    before, fp = _embeddings(enc), fingerprint(enc)
    out = save(enc, tmp_path / "out", {"stage": "drop", "model": str(tiny_model_dir)})
    again = effir.load(out, device="cpu", dtype="fp32")
    torch.testing.assert_close(_embeddings(again), before, atol=1e-5, rtol=0)
    assert fingerprint(again) == fp  # same config, structure, settings and weights
    assert fingerprint(effir.load(out, device="cpu", dtype="bf16")) == fp  # analyze on GPU (bf16), drop on CPU
    with torch.no_grad():
        next(p for p in again.model.parameters() if p.dim() == 2)[0, 0] += 1.0
    assert fingerprint(again) != fp
    assert again.meta["structure"] == {"num_layers": 4, "dropped_attention": [1], "dropped_mlp": [0, 2],
                                       "mlp_widths": [None, 64, None, 20]}
    meta = read_effir_json(out)
    assert meta["structure"] == again.meta["structure"]
    assert meta["parameters"] == count_parameters(enc.model, enc.adapter) == count_parameters(again.model)
    assert meta["history"] == [{"stage": "drop", "model": str(tiny_model_dir)}]
    # the dropped weights are not in the file, and the file holds exactly the model's tensors
    keys = set(weight_keys(out))
    assert keys == set(again.model.state_dict())
    prefixes = tuple(dropped_prefixes(enc.adapter, meta["structure"]))
    assert prefixes and not any(k.startswith(prefixes) for k in keys)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "modeling_effir.EffirConfig",
                                  "AutoModel": "modeling_effir.EffirModel"}
    assert (config["model_type"], config["effir_base_model_type"]) == ("effir", enc.model.config.model_type)
    assert config["effir_structure"]["dropped_mlp"] == [0, 2]
    # in memory the config is the base one
    assert type(again.model.config) is type(enc.model.config)
    assert not hasattr(again.model.config, "effir_structure") and not hasattr(again.model.config, "auto_map")


def test_drop_composes_across_saves(tiny_llama_dir, tmp_path):
    enc = _compress(effir.load(tiny_llama_dir, device="cpu", dtype="fp32"), attention=(), mlp=(1,), narrow=False)
    first = save(enc, tmp_path / "a", {"stage": "drop", "n": 1})
    enc = effir.load(first, device="cpu", dtype="fp32")
    drop_sublayers(enc.model, enc.adapter, attention=[3], mlp=[2])
    second = save(enc, tmp_path / "b", {"stage": "drop", "n": 2})
    meta = read_effir_json(second)
    assert meta["structure"]["dropped_mlp"] == [1, 2] and meta["structure"]["dropped_attention"] == [3]
    assert [h["n"] for h in meta["history"]] == [1, 2]
    ref = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    drop_sublayers(ref.model, ref.adapter, attention=[3], mlp=[1, 2])
    torch.testing.assert_close(_embeddings(effir.load(second, device="cpu", dtype="fp32")), _embeddings(ref),
                               atol=1e-5, rtol=0)


def test_uncompressed_save_is_a_plain_folder(tiny_llama_dir, tmp_path):
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    out = save(enc, tmp_path / "plain")
    assert "structure" not in read_effir_json(out) and not (out / REMOTE_FILE).exists()
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    torch.testing.assert_close(_embeddings(effir.load(out, device="cpu", dtype="fp32")), _embeddings(enc))


def test_save_refuses_a_non_empty_output_without_overwrite(tiny_llama_dir, tmp_path):
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(EffirError, match="--overwrite"):
        save(enc, out)
    assert (out / "keep.txt").exists()
    save(enc, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / EFFIR_JSON).exists()
    assert not list(tmp_path.glob("out.tmp*"))  # no temporary folder left behind


@pytest.fixture
def compressed_llama(tiny_llama_dir, tmp_path):
    enc = _compress(effir.load(tiny_llama_dir, device="cpu", dtype="fp32"))
    return save(enc, tmp_path / "c")


def test_corrupted_effir_json_is_one_clear_error(compressed_llama):
    (compressed_llama / EFFIR_JSON).write_text('{"format": 1, "structure": ')
    with pytest.raises(EffirError, match="corrupted"):
        effir.load(compressed_llama, device="cpu")


def test_bad_structure_is_one_clear_error(compressed_llama):
    meta = json.loads((compressed_llama / EFFIR_JSON).read_text())
    meta["structure"]["num_layers"] = 7
    (compressed_llama / EFFIR_JSON).write_text(json.dumps(meta))
    with pytest.raises(EffirError, match="num_layers 7"):
        effir.load(compressed_llama, device="cpu")


def test_weights_that_do_not_fit_the_structure_are_refused(compressed_llama):
    meta = json.loads((compressed_llama / EFFIR_JSON).read_text())
    meta["structure"]["dropped_mlp"] = [0]  # the file has no weights for MLP 2 but the structure now wants them
    meta["structure"]["mlp_widths"][2] = 64
    (compressed_llama / EFFIR_JSON).write_text(json.dumps(meta))
    with pytest.raises(EffirError, match="do not match the structure.*missing"):
        effir.load(compressed_llama, device="cpu")


REMOTE_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["effir"] = None  # effir is pip-installed (editable) in this venv: make any import of it fail
    import json, torch
    from transformers import AutoModel
    jobs = json.load(open(sys.argv[1]))
    for job in jobs:
        model = AutoModel.from_pretrained(job["dir"], trust_remote_code=True, dtype=torch.float32)
        batch = torch.load(job["inputs"])
        with torch.no_grad():
            torch.save(model(**batch).last_hidden_state, job["output"])
    try:
        import effir  # noqa: F401
    except ImportError:
        print("effir-not-importable")
    loaded = [m for m, mod in sys.modules.items() if (m == "effir" or m.startswith("effir.")) and mod is not None]
    print("effir-modules-loaded:", loaded)
""")


def test_plain_transformers_reload_without_effir(_tiny_models, tmp_path):
    """Every architecture, compressed (drops + a width change), reloads through the folder's own modeling file in
    a subprocess where effir cannot be imported, and gives the same hidden states as the in-memory model."""
    jobs, expected = [], {}
    batch = {"input_ids": torch.randint(4, 128, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    for mt in sorted(ADAPTERS):
        src = tmp_path / f"src-{mt}"
        _tiny_models[mt].save_pretrained(src)
        build_tiny_tokenizer().save_pretrained(src)
        enc = _compress(effir.load(src, device="cpu", dtype="fp32"))
        out = save(enc, tmp_path / f"c-{mt}")
        assert not re.search(r"^\s*(from|import)\s+effir", (out / REMOTE_FILE).read_text(), re.M)
        with torch.no_grad():
            expected[mt] = enc.model(**batch).last_hidden_state
        torch.save(batch, tmp_path / "inputs.pt")
        jobs.append({"dir": str(out), "inputs": str(tmp_path / "inputs.pt"), "output": str(tmp_path / f"{mt}.pt")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "run.py").write_text(REMOTE_SCRIPT)
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
           "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "run.py"), str(tmp_path / "jobs.json")], cwd=work,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "effir-not-importable" in proc.stdout
    assert "effir-modules-loaded: []" in proc.stdout
    for mt in expected:
        torch.testing.assert_close(torch.load(tmp_path / f"{mt}.pt"), expected[mt], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["dropped", "slimmed"])
def test_compressed_folders_refuse_to_load_without_remote_code(tiny_model_dir, tmp_path, kind):
    """Without trust_remote_code, plain transformers refuses a compressed folder (model_type "effir") instead of
    building the full architecture with random MLPs (dropped) or failing on shapes (slimmed); effir still reads it
    as the base architecture, fingerprint and all."""
    from transformers import AutoConfig, AutoModel

    enc = effir.load(tiny_model_dir, device="cpu", dtype="fp32")
    _compress(enc, attention=(), mlp=(1,) if kind == "dropped" else (), narrow=kind == "slimmed")
    fp = fingerprint(enc)
    out = save(enc, tmp_path / kind)
    for load in (AutoConfig.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(ValueError, match="contains custom code"):
            load(str(out), trust_remote_code=False)
    again = effir.load(out, device="cpu", dtype="fp32")
    assert type(again.model.config) is type(enc.model.config) and fingerprint(again) == fp


def test_task_alone_keeps_the_saved_prompt(tiny_llama_dir, tmp_path):
    """--task refills the task of the prompt the model was saved with (e5 stays e5); a prompt without a task slot is
    one clear error rather than silently replaced by the effir preset."""
    e5 = save(effir.load(tiny_llama_dir, device="cpu", dtype="fp32", query_prompt="e5", task="Find cats."),
              tmp_path / "e5")
    enc = effir.load(e5, device="cpu", dtype="fp32", task="Find dogs.")
    assert enc.format(["x"], "query") == ["Instruct: Find dogs.\nQuery: x"]
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32", task="Find dogs.")  # default preset: effir
    assert enc.format(["x"], "query") == ["<instruct>Find dogs.\n<query>x"]
    custom = save(effir.load(tiny_llama_dir, device="cpu", dtype="fp32", query_prompt="search: {text}"),
                  tmp_path / "custom")
    with pytest.raises(EffirError, match="no task to replace"):
        effir.load(custom, device="cpu", dtype="fp32", task="Find dogs.")
