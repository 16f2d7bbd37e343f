"""Every shipped config loads, validates against the stage parsers, and opens with its launch command."""

from pathlib import Path

import pytest

from effir.config import RunConfig, load_config, stage_argv
from effir.stages.run import CONFIGS, check_stage_options
from effir.utils import EffirError

SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def test_the_three_configs_ship():
    assert {p.stem for p in SHIPPED} >= {"demo", "smollm2-scifact", "mistral-7b-effir"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_is_valid_and_documented(path: Path):
    cfg = load_config(path)
    check_stage_options(cfg)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# effir "), f"{path.name} must open with its launch command"


def test_mistral_config_is_the_papers_recipe():
    cfg = load_config(CONFIGS / "mistral-7b-effir.yaml")
    assert cfg.drop["mlp"] == 16 and cfg.slim["ratio"] == 0.3
    assert cfg.finetune["lora_r"] == 32 and cfg.finetune["lora_alpha"] == 64
    assert cfg.finetune["temperature"] == 0.02 and cfg.finetune["num_negatives"] == 7
    assert "num_processes 8" in cfg.launcher
    assert cfg.quantize == ["nf4"]  # Table 6


def test_overrides_and_unknown_keys(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml", ["slim.ratio=0.5", "output=x", "datasets=[a, b]"])
    assert cfg.slim["ratio"] == 0.5 and cfg.output == "x" and cfg.datasets == ["a", "b"]
    with pytest.raises(EffirError, match="unknown config key 'modle'"):
        RunConfig.from_dict({"modle": "x", "model": "y", "output": "o"})
    cfg = load_config(CONFIGS / "demo.yaml", ["slim.rato=0.5"])
    with pytest.raises(EffirError, match=r"unknown option 'slim.rato'"):
        check_stage_options(cfg)


@pytest.mark.parametrize("data, message", [
    ({"stages": ["drop", "analyze"]}, "out of order"),
    ({"stages": ["compress"]}, "unknown stage"),
    ({"stages": ["drop"]}, "'analyze' must run before it"),
    ({"stages": ["finetune"], "train": None}, "need training data"),
    ({"stages": ["slim"], "train": None}, "need training data"),  # learned gates, the default method
    ({"stages": ["slim"], "train": None, "slim": {"method": "activation", "recover_steps": 5}}, "need training data"),
    ({"drop": {"output": "x"}}, "set by the pipeline"),
    ({"baselines": {"drop_everything": 3}}, "unknown baseline"),
    ({"baselines": {"wanda_2_4": True}}, "set baselines.full: true with stage finetune"),
    ({"baselines": {"full": True, "sparsegpt_2_4": True}, "stages": ["eval"]}, "with stage finetune"),
    ({"baselines": {"full": True, "wanda_2_4": "yes"}}, "'baselines.wanda_2_4' must be true or false"),
    ({"prune": {"method": "sparsegpt"}}, "'prune.method' is set by the pipeline"),
    ({"stages": ["finetune", "eval"], "baselines": {"drop_mlp": [0, 4]}}, "drop_mlp ranks by importance and needs"),
    ({"stages": ["finetune", "eval"], "baselines": {"drop_attention": "auto"}}, "drop_attention ranks by importance"),
])
def test_bad_configs(data, message):
    base = {"model": "m", "output": "o", "train": "demo"}
    with pytest.raises(EffirError, match=message):
        RunConfig.from_dict({**base, **data})


def test_the_2_4_baselines_take_effir_prune_options():
    cfg = RunConfig.from_dict({"model": "m", "output": "o", "train": "demo", "prune": {"calibration_samples": 64},
                               "baselines": {"full": True, "wanda_2_4": True, "sparsegpt_2_4": False}})
    check_stage_options(cfg)
    cfg.prune["calibration_sample"] = 3
    with pytest.raises(EffirError, match="unknown option 'prune.calibration_sample' for `effir prune`"):
        check_stage_options(cfg)


def test_baselines_that_drop_nothing_or_drop_the_last_blocks_need_no_scores():
    for baselines in ({"drop_mlp": 0, "drop_blocks": [0]}, {"drop_last": 2}):
        RunConfig.from_dict({"model": "m", "output": "o", "train": "demo", "stages": ["finetune", "eval"],
                             "baselines": baselines})


def test_activation_slim_alone_needs_no_training_data():
    cfg = RunConfig.from_dict({"model": "m", "output": "o", "stages": ["slim"], "slim": {"method": "activation"}})
    assert cfg.train is None


def test_stage_argv():
    assert stage_argv({"gate_steps": 5, "compile": True, "no_cache": False, "doc_lengths": [128, 256]}) == [
        "--gate-steps", "5", "--compile", "--doc-lengths", "128,256"]


def test_demo_keys_are_the_data_builders_arguments():
    """The config checks ``demo`` against DEMO_KEYS; a renamed argument of build_ict_beir must not slip past."""
    import inspect

    from effir.config import DEMO_KEYS
    from effir.synthetic import build_ict_beir

    params = inspect.signature(build_ict_beir).parameters
    assert set(DEMO_KEYS) == set(params) - {"articles", "out"}
    assert all(type(params[k].default) is t for k, t in DEMO_KEYS.items())
