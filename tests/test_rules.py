"""Layout rules from STYLE.md that code review alone would not keep true."""

import re
from pathlib import Path

import effir.arch as arch

SRC = Path(arch.__file__).parent
# Names only the architecture table may spell out. (The self-contained modeling file written into model folders
# cannot import effir, so it reads the names from config.json, written from this table.)
HF_NAMES = ["self_attn", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm", "gate_proj", "up_proj", "down_proj", "gate_up_proj", "encoder.layer",
            "intermediate.dense", "output.dense"]


def _sources():
    return [p for p in SRC.rglob("*.py") if p.name != "arch.py" and "remote" not in p.parts]


def test_only_arch_names_hf_submodules():
    offenders = []
    for path in _sources():
        text = path.read_text()
        for name in HF_NAMES:
            if re.search(rf"(?<!adapter)['\".]{re.escape(name)}\b", text):  # adapter.<role> is a role, not a name
                offenders.append(f"{path.relative_to(SRC)}: {name}")
    assert not offenders, "HF module names outside arch.py: " + ", ".join(offenders)


def test_no_branching_on_model_type_outside_arch():
    offenders = [str(p.relative_to(SRC)) for p in _sources() if re.search(r"model_type\s*(==|!=|in)\s", p.read_text())]
    assert not offenders, f"branching on model_type outside arch.py: {offenders}"


def test_components_do_not_import_stages_or_cli():
    offenders = []
    for path in _sources():
        if path.parent.name == "stages" or path.name in ("cli.py", "__main__.py"):
            continue
        if re.search(r"^\s*(from|import)\s+(effir\.|\.)*(stages|cli)\b", path.read_text(), re.M):
            offenders.append(str(path.relative_to(SRC)))
    assert not offenders, f"components importing stages/cli: {offenders}"


def test_stages_do_not_import_each_other():
    offenders = []
    for path in (SRC / "stages").glob("*.py"):
        if re.search(r"^\s*from\s+(\.|effir\.stages)\w*\s+import|^\s*from\s+\.\w+\s+import", path.read_text(), re.M):
            offenders.append(path.name)
    assert not offenders, f"stages importing other stages: {offenders}"
