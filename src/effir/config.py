"""The ``effir run`` configuration: one YAML file for the whole pipeline. Imports no torch, so validation is instant.

Top-level keys are the fields of :class:`RunConfig`. Each stage section (``analyze``, ``drop``, ``slim``,
``finetune``, ``distill``, ``eval``, ``bench``, ``prune``, ``export``) holds that stage's command-line options with
``_`` or ``-`` (``gate_steps: 50`` is ``--gate-steps 50``; ``true`` is a bare flag); the stage's own parser checks the
names, so a misspelled key is an error that names it. Options the pipeline wires itself (model, output, data, scores,
baseline) are not allowed there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path

from .stage_specs import SPECS
from .utils import EffirError

STAGES = ("analyze", "drop", "slim", "finetune", "distill", "eval", "bench")
SECTIONS = (*STAGES, "prune", "export")
"""Stage sections of the config: the pipeline's stages, ``prune`` (options of `effir prune` for the 2:4
baselines) and ``export`` (options of `effir export` for the ``onnx-int8`` / ``openvino-int8`` quantisations)."""
WIRED = set().union(*(SPECS[s].wired_keys() for s in STAGES))
"""Keys no pipeline section may set: what ``effir run`` wires into any of its stages (the run's top-level keys, such
as ``train`` and ``teacher``, set them); the ``prune`` and ``export`` sections also refuse their own wired options."""
PARENTS = ("original", "full")
PRUNE_BASELINES = {"wanda_2_4": ("wanda", "2:4"), "sparsegpt_2_4": ("sparsegpt", "2:4")}
"""The semi-structured baselines: ``baselines`` key -> (``effir prune --method``, ``--pattern``)."""
DROP_BASELINES = {"drop_mlp": ("--mlp", "importance"), "drop_blocks": ("--blocks", "importance"),
                  "drop_last": ("--blocks", "last"), "drop_attention": ("--attention", "importance")}
"""The layer-dropping baselines: ``baselines`` key -> (``effir drop`` flag taking K, ``--strategy``)."""
BASELINES = ("original", "full", *DROP_BASELINES, *PRUNE_BASELINES)
FLAG_BASELINES = ("original", "full", *PRUNE_BASELINES)
"""Baselines switched on with ``true``; the others take a number of sub-layers or blocks."""
QUANTIZED = ("int8", "nf4", "onnx-int8", "openvino-int8")
"""Entries of ``quantize``: ``[BACKEND-]QUANTISATION`` as `effir eval --backend --quantize` takes them (torch when no
backend is named)."""
DEMO_KEYS = {"train_queries": int, "test_queries": int, "passage_words": int, "max_passages": int,
             "test_fraction": float, "seed": int}
"""The ``demo`` section: the keyword arguments of :func:`effir.synthetic.build_ict_beir` and their types."""
_TEXT, _OPTIONAL_TEXT, _TEXTS = "a string", "a string or null", "a list of strings"
FIELD_TYPES = {"model": _TEXT, "output": _TEXT, "train": _OPTIONAL_TEXT, "datasets": _TEXTS, "split": _TEXT,
               "stages": _TEXTS, "slim_after_finetune": "true or false", "teacher": _OPTIONAL_TEXT,
               "baselines": "a mapping", "launcher": _OPTIONAL_TEXT, "demo": "a mapping", "parent": _TEXT,
               "query_side": "true or false", "quantize": _TEXTS,
               **{s: "a mapping of option: value" for s in SECTIONS}}
"""What each top-level key must hold (checked before anything else reads the config)."""


@dataclass
class RunConfig:
    """Everything ``effir run`` needs. Stage sections map option names to values."""

    model: str
    """The model to compress: built-in name, folder, .gguf or hub id."""
    output: str
    """Run folder; every stage writes into its own subfolder."""
    train: str | None = None
    """Training data for slim and finetune (BEIR folder, Tevatron / FlagEmbedding jsonl); ``demo`` = built-in ICT."""
    datasets: list[str] = field(default_factory=lambda: ["demo"])
    """BEIR folders (or official names, or ``demo``) to evaluate on."""
    split: str = "test"
    """qrels split evaluated."""
    stages: list[str] = field(default_factory=lambda: [s for s in STAGES if s != "distill"])
    """Stages to run, in pipeline order (``distill`` recovers the compressed model instead of ``finetune``)."""
    slim_after_finetune: bool = False
    """Slim the fine-tuned retriever (drop -> finetune -> slim) instead of the raw LLM (drop -> slim -> finetune, the
    paper's order); see docs/results/smollm2-slim-order-cpu.md for why."""
    teacher: str | None = None
    """KL teacher for finetune: ``parent`` (the uncompressed model), a model reference, ``data``, or none."""
    parent: str = "original"
    """The retriever that stage ``distill`` and the query-side variant learn from, and whose document index the
    query-side variant keeps: ``original`` (``model``, when it already is a retriever) or ``full`` (the fine-tuned
    full model of ``baselines.full``, when ``model`` is a base LLM). With stage ``distill``, EffiR compresses the
    parent itself (analyze, drop and slim start from it) and distils the result from it; ``demo`` among
    ``distill.texts`` is the built-in data set."""
    query_side: bool = False
    """Also build the query-side variant: the compressed model (after drop / slim) distilled on the parent's query
    embeddings, queries through it and documents through the parent (``effir distill --query-side``)."""
    quantize: list[str] = field(default_factory=list)
    """Also evaluate every variant quantised, beside its 16-bit evaluation (the paper's Table 6: size and nDCG@10):
    ``int8`` / ``nf4`` quantise the torch model's weights (torchao; bitsandbytes NF4 with double quantisation, CUDA
    only), ``onnx-int8`` / ``openvino-int8`` export the model (`effir export --int8`) and evaluate the int8 graph.
    A quantisation this machine cannot run is refused before the first stage."""
    baselines: dict = field(default_factory=dict)
    """Baselines trained and evaluated the same way: ``full: true`` (the uncompressed model fine-tuned),
    ``drop_blocks: K|auto`` (Drop-kB by importance), ``drop_last: K|auto`` (Drop-LastkB), ``drop_attention: K``
    (Drop-kA); ``auto`` = as many blocks as match the EffiR model's parameter count. ``original: true`` also
    evaluates the untouched model (no training). ``wanda_2_4: true`` / ``sparsegpt_2_4: true``: the paper's
    semi-structured baselines (Table 4) in both orders, the original pruned then fine-tuned like EffiR and the
    fine-tuned full model pruned (needs ``full: true``); their zeros are stored densely, so they keep the full
    model's memory and, without sparse kernels, its speed."""
    launcher: str | None = None
    """Command prefix for the training and evaluation stages, e.g. ``accelerate launch --num_processes 8`` or
    ``torchrun --nproc_per_node 8`` (default: one process)."""
    demo: dict = field(default_factory=dict)
    """Size of the built-in ICT data set: ``train_queries``, ``test_queries``, ``passage_words``, ``max_passages``."""
    analyze: dict = field(default_factory=dict)
    drop: dict = field(default_factory=dict)
    slim: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)
    distill: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    bench: dict = field(default_factory=dict)
    prune: dict = field(default_factory=dict)
    """Options of `effir prune` for the 2:4 baselines (calibration, calibration_samples, seq_len, ...)."""
    export: dict = field(default_factory=dict)
    """Options of `effir export` for the ``onnx-int8`` / ``openvino-int8`` quantisations (calibration, ...)."""

    def __post_init__(self):
        for name, kind in FIELD_TYPES.items():
            value = getattr(self, name)
            if not _is(value, kind):
                raise EffirError(f"'{name}' must be {kind}, not {_shown(value)}; fix it in the config")
        _check_sections(self)
        pipeline = self.pipeline()
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise EffirError(f"unknown stage(s) {unknown} in 'stages'; the pipeline is {' -> '.join(pipeline)}")
        # slim and finetune may be listed either way round: slim_after_finetune decides which runs first
        rank = [STAGES.index("slim") if s == "finetune" else STAGES.index(s) for s in self.stages]
        _check_recovery(self)
        _check_pruned(self)
        _check_ranked(self)
        _check_quantize(self)
        if rank != sorted(rank) or len(set(self.stages)) != len(self.stages):
            raise EffirError(f"stages {self.stages} are out of order; they run as {' -> '.join(pipeline)}")
        if "drop" in self.stages and "analyze" not in self.stages and self.drop.get("strategy", "importance") == \
                "importance":
            raise EffirError("stage 'drop' ranks by importance scores, so 'analyze' must run before it (or set "
                             "drop.strategy: last)")
        if self.slim_after_finetune and not {"slim", "finetune"} <= set(self.stages):
            raise EffirError("slim_after_finetune: true needs both stages 'finetune' and 'slim'")
        slim_trains = "slim" in self.stages and (self.slim.get("method", "learned") == "learned"
                                                 or bool(self.slim.get("recover_steps")))
        if not self.train and ("finetune" in self.stages or slim_trains):
            raise EffirError("stages slim/finetune need training data: set 'train' (a BEIR folder, a jsonl, or demo)")
        if "eval" in self.stages and not self.datasets:
            raise EffirError("stage 'eval' needs at least one entry in 'datasets'")
        for name in SECTIONS:
            section = getattr(self, name)
            wired = sorted((WIRED | SPECS[name].wired_keys()) & {k.replace("-", "_") for k in section})
            if wired:
                raise EffirError(f"'{name}.{wired[0]}' is set by the pipeline itself; remove it from the config")

    def pipeline(self) -> list[str]:
        """The stage order: STAGES, with finetune before slim under ``slim_after_finetune``."""
        if not self.slim_after_finetune:
            return list(STAGES)
        return ["finetune" if s == "slim" else "slim" if s == "finetune" else s for s in STAGES]

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        if not isinstance(data, dict):
            raise EffirError("the config must be a YAML mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EffirError(f"unknown config key '{unknown[0]}'; known keys: {', '.join(sorted(known))}")
        missing = [k for k in ("model", "output") if k not in data]
        if missing:
            raise EffirError(f"the config needs '{missing[0]}'")
        if isinstance(data.get("datasets"), str):
            data = {**data, "datasets": [data["datasets"]]}
        return cls(**copy.deepcopy(data))

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}


def _check_recovery(cfg: RunConfig) -> None:
    """Stage ``distill``, ``parent`` and ``query_side`` fit together."""
    if {"finetune", "distill"} <= set(cfg.stages):
        raise EffirError("stages 'finetune' and 'distill' both recover the compressed model; list one of them")
    if cfg.slim_after_finetune and "distill" in cfg.stages:
        raise EffirError("slim_after_finetune: true slims the fine-tuned model; with stage 'distill' the slimmed "
                         "model is distilled instead: remove one of them")
    if cfg.parent not in PARENTS:
        raise EffirError(f"'parent' must be one of {', '.join(PARENTS)}, not {cfg.parent!r}; fix it in the config")
    learns = "distill" in cfg.stages or cfg.query_side
    if learns and not cfg.distill.get("texts"):
        raise EffirError("stage 'distill' and query_side: true learn from unlabelled text: set distill.texts (e.g. "
                         "[wiki] or [beir:DIR]) in the config")
    if learns and cfg.parent == "full" and not cfg.baselines.get("full"):
        raise EffirError("parent: full learns from the fine-tuned full model: set baselines.full: true (and 'train')")
    if cfg.baselines.get("full") and "distill" in cfg.stages and not cfg.train:
        raise EffirError("baselines.full fine-tunes the full model and needs training data: set 'train'")


def _check_ranked(cfg: RunConfig) -> None:
    """Baselines that drop by importance read the scores of stage ``analyze``."""
    planned = {name: any(v if isinstance(v, list) else [v]) for name, v in cfg.baselines.items()}  # K = 0: none
    ranked = [name for name, (_, strategy) in DROP_BASELINES.items() if strategy == "importance" and planned.get(name)]
    if ranked and "analyze" not in cfg.stages:
        raise EffirError(f"baseline {ranked[0]} ranks by importance and needs stage 'analyze'")


def _check_pruned(cfg: RunConfig) -> None:
    """The 2:4 baselines prune the fine-tuned full model too, so that model must be planned."""
    pruned = [name for name in PRUNE_BASELINES if cfg.baselines.get(name)]
    if pruned and not (cfg.baselines.get("full") and {"finetune", "distill"} & set(cfg.stages)):
        raise EffirError(f"baselines.{pruned[0]} compares pruning before and after fine-tuning, and the second order "
                         "prunes the fine-tuned full model: set baselines.full: true with stage finetune (or distill); "
                         "fix the config")


def quantized_variant(entry: str) -> tuple[str, str]:
    """A ``quantize`` entry as (backend, quantisation): ``"onnx-int8"`` -> ``("onnx", "int8")``, ``"nf4"`` ->
    ``("torch", "nf4")``."""
    backend, _, quantize = entry.rpartition("-")
    return backend or "torch", quantize


def _check_quantize(cfg: RunConfig) -> None:
    """``quantize`` entries are known, evaluated, and not also asked for in the ``eval`` section."""
    unknown = [q for q in cfg.quantize if q not in QUANTIZED]
    if unknown:
        raise EffirError(f"unknown quantisation {unknown[0]!r} in 'quantize'; known: {', '.join(QUANTIZED)}")
    if cfg.quantize and "eval" not in cfg.stages:
        raise EffirError("'quantize' adds quantised evaluations: add stage 'eval' (and 'datasets')")
    clash = sorted({"backend", "quantize"} & {k.replace("-", "_") for k in cfg.eval})
    if clash:
        raise EffirError(f"'eval.{clash[0]}' would evaluate every variant one way only: list the quantisations in the "
                         "top-level 'quantize' instead (each is evaluated beside the 16-bit model)")


def _is(value, kind: str) -> bool:
    if kind == _TEXT:
        return isinstance(value, str) and bool(value.strip())
    if kind == _OPTIONAL_TEXT:
        return value is None or _is(value, _TEXT)
    if kind == _TEXTS:
        return isinstance(value, list) and all(_is(v, _TEXT) for v in value)
    if kind == "true or false":
        return isinstance(value, bool)
    return isinstance(value, dict)


def _shown(value) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def _check_sections(cfg: RunConfig) -> None:
    """Values inside the mappings: stage options are scalars (their stage's parser checks them further), baselines
    and demo hold what their code expects."""
    for name in SECTIONS:
        for key, value in getattr(cfg, name).items():
            scalars = value if isinstance(value, list) else [value]
            if not all(v is None or isinstance(v, (str, int, float, bool)) for v in scalars):
                raise EffirError(f"'{name}.{key}' must be a value or a list of values, not {_shown(value)}; fix it in "
                                 "the config")
    for key, value in cfg.baselines.items():
        if key not in BASELINES:
            raise EffirError(f"unknown baseline '{key}'; known: {', '.join(BASELINES)}; fix it in the config")
        if key in FLAG_BASELINES and not isinstance(value, bool):
            raise EffirError(f"'baselines.{key}' must be true or false, not {_shown(value)}; fix it in the config")
        counts = value if isinstance(value, list) else [value]
        if key not in FLAG_BASELINES and value not in (None, False) and not all(
                v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in counts):
            raise EffirError(f"'baselines.{key}' must be a number of sub-layers or blocks K >= 0, 'auto', or a list "
                             f"of those, not {_shown(value)}; fix it in the config")
    for key, value in cfg.demo.items():
        if key not in DEMO_KEYS:
            raise EffirError(f"unknown key 'demo.{key}'; known: {', '.join(DEMO_KEYS)}; fix it in the config")
        wanted = DEMO_KEYS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float) if wanted is float else int) or value < 0:
            raise EffirError(f"'demo.{key}' must be a non-negative {wanted.__name__}, not {_shown(value)}; fix it in "
                             "the config")


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config and apply ``key=value`` / ``section.key=value`` overrides (values parsed as YAML)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EffirError(f"config {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise EffirError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EffirError(f"override {item!r} is not KEY=VALUE (e.g. slim.ratio=0.5)")
        set_key(data, key, yaml.safe_load(value))
    return RunConfig.from_dict(data)


def set_key(data: dict, dotted: str, value) -> None:
    head, _, rest = dotted.partition(".")
    if not rest:
        data[head] = value
        return
    section = data.setdefault(head, {})
    if not isinstance(section, dict):
        raise EffirError(f"cannot set {dotted}: '{head}' is not a section")
    set_key(section, rest, value)


def stage_argv(section: dict) -> list[str]:
    """``{"gate_steps": 50, "no_progress": True}`` -> ``["--gate-steps", "50", "--no-progress"]``."""
    argv = []
    for key, value in section.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv
