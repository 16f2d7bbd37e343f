"""Options declared once: the training verbs' shared option groups (effir.options), the resume keys derived from
the options, the choices taken from their constants, and analyze's --calibration-samples (alias --samples)."""

import inspect

import pytest
import yaml

from effir import options
from effir.config import RunConfig, stage_argv
from effir.encoder import POOLINGS
from effir.stages import RaisingParser, stage_module, verb_parser
from effir.stages.run import CONFIGS, check_stage_options
from effir.train_data import NEGATIVES
from effir.utils import PRECISIONS, SCHEDULES, EffirError

TRAINING_VERBS = ("finetune", "distill", "slim")

CHANGE_TRAINING = {"finetune": {"model", "save_dtype", "precision", "device", "seed"},
                   "distill": {"model", "teacher", "texts", "save_dtype", "teacher_dtype", "device", "hidden_weight",
                               "hidden_loss"},
                   "slim": {"model", "dtype", "width_multiple", "super_neuron_factor", "device"}}
"""Options that change what trains; width_multiple, super_neuron_factor and dtype (slim) and save_dtype (LoRA's base
dtype) were in no hand-kept key list."""

OWN_DECLARATIONS = {
    "model": "each verb says what model it takes",
    "output": "each verb lists what its run folder receives",
    "teacher": "finetune: an optional KL teacher; distill: the required parent",
    "temperature": "distill's is the similarity KL's (default 0.05), not InfoNCE's",
    "kl_weight": "finetune's weighs the teacher KL, distill's the in-batch similarity KL",
    "encode_batch_size": "finetune mines and scores teachers with it, distill embeds the parent (other defaults)",
    "device": "slim's also takes cuda:N where it does not train",
}
"""Options several training verbs have that each declares itself, with why: they mean different things."""


def _dests(verb: str) -> list[str]:
    return [a.dest for a in verb_parser(verb).options if a.dest != "help"]


@pytest.mark.parametrize("verb", TRAINING_VERBS)
def test_every_option_is_a_resume_key_or_named_as_not_one(verb):
    dests, keys = _dests(verb), stage_module(verb).RUN_KEYS
    excluded = [d for d in dests if d in options.NOT_RUN_KEYS]
    assert sorted(keys + tuple(excluded)) == sorted(dests)  # each option once, in exactly one of the two
    assert not set(keys) & set(options.NOT_RUN_KEYS)
    assert CHANGE_TRAINING[verb] <= set(keys)
    assert {"output", "overwrite", "no_progress", "save_every"} <= set(excluded)


def test_each_exclusion_is_an_option_with_a_reason():
    declared = {d for verb in TRAINING_VERBS for d in _dests(verb)}
    assert set(options.NOT_RUN_KEYS) <= declared  # no stale entry
    assert all(len(reason) > 10 for reason in options.NOT_RUN_KEYS.values())


def test_shared_options_are_declared_only_in_the_option_groups():
    seen: dict[str, set[str]] = {}
    for verb in TRAINING_VERBS:
        for action in verb_parser(verb).options:
            seen.setdefault(action.dest, set()).add(verb)
    shared = {d for d, verbs in seen.items() if len(verbs) > 1 and d != "help"} - set(OWN_DECLARATIONS)
    assert {"lr", "lora_r", "batch_size", "precision", "negatives", "save_dtype", "query_max_length"} <= shared
    for verb in TRAINING_VERBS:
        source = inspect.getsource(stage_module(verb))
        again = [d for d in shared if f'add_argument("--{d.replace("_", "-")}"' in source]
        assert not again, f"effir {verb} declares {again} itself; add them through effir.options"


@pytest.mark.parametrize("verb", TRAINING_VERBS)
def test_choices_come_from_their_constants(verb):
    constants = {"schedule": SCHEDULES, "pooling": POOLINGS, "precision": PRECISIONS}
    for action in verb_parser(verb).options:
        if action.dest in constants:
            assert tuple(action.choices) == constants[action.dest], action.dest
        if action.dest == "negatives":
            assert set(action.choices) <= set(NEGATIVES) and {"data", "bm25", "random"} <= set(action.choices)
    assert "dense" not in next(a for a in verb_parser("slim").options if a.dest == "negatives").choices  # no miner


@pytest.mark.parametrize("verb", [*TRAINING_VERBS, "analyze"])
def test_help_explains_every_option(verb):
    assert all(a.help for a in verb_parser(verb).options), [a.dest for a in verb_parser(verb).options if not a.help]


@pytest.mark.parametrize("flag", ["--calibration-samples", "--samples"])
def test_analyze_takes_calibration_samples_and_the_old_name(flag):
    args = verb_parser("analyze").parse_args(["MODEL", "--output", "OUT", flag, "3"])
    assert args.calibration_samples == 3
    assert "--calibration-samples" in verb_parser("analyze").format_help()


@pytest.mark.parametrize("key", ["calibration_samples", "samples"])
def test_an_analyze_section_takes_either_name(key):
    cfg = RunConfig.from_dict({"model": "m", "output": "o", "stages": ["analyze"], "analyze": {key: 3}})
    check_stage_options(cfg)  # raises on an unknown option
    args = verb_parser("analyze", RaisingParser).parse_args(["M", "--output", "O", *stage_argv({key: 3})])
    assert args.calibration_samples == 3
    bad = RunConfig.from_dict({"model": "m", "output": "o", "stages": ["analyze"], "analyze": {"sample": 3}})
    with pytest.raises(EffirError, match="unknown option 'analyze.sample'"):
        check_stage_options(bad)


def test_shipped_configs_use_the_new_name():
    for path in CONFIGS.glob("*.yaml"):
        assert "samples" not in (yaml.safe_load(path.read_text()).get("analyze") or {}), path.name


def test_typed_options_take_their_fields_from_the_parsed_options():
    args = verb_parser("finetune").parse_args(["M", "--train", "D", "--output", "O", "--lr", "3e-4", "--full"])
    opt = options.typed(options.Optimisation, args)
    assert opt.lr == 3e-4 and opt.full and opt.schedule == "linear" and opt.lora_r == 32
