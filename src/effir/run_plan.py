"""What ``effir run`` runs: the stage invocations (:class:`Step`) of the EffiR pipeline and of every baseline, each
writing into its own folder of the run, with the steps it consumes. :mod:`effir.stages.run` executes them.

Folders: the EffiR pipeline writes RUN/<stage>, the baselines RUN/baselines/<variant>/<stage>; ``variant`` labels
every step in the report. The baselines are fine-tuned, evaluated and timed exactly like the EffiR model: ``original``
(evaluated only), ``full``, the layer-dropping ones (Drop-kM/kB/LastkB/kA), and the paper's 2:4 semi-structured ones
(Table 4) in its two orders (:func:`_prune_baselines`).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import DROP_BASELINES, PRUNE_BASELINES, RunConfig, quantized_variant, stage_argv
from .stage_specs import SPECS
from .utils import EffirError

PRUNE_ORDERS = ("prune_ft", "ft_prune")
"""Variant suffixes: the original pruned then fine-tuned, and the fine-tuned full model pruned."""


def demo_folder(out: Path) -> Path:
    return out / "data" / "demo"


def _data_ref(ref: str, out: Path) -> str:
    return str(demo_folder(out)) if ref == "demo" else ref


def _distill_options(cfg, out: Path) -> list[str]:
    """Stage distill's options; ``demo`` among its texts is the built-in data set's corpus and queries."""
    texts = [f"beir:{_data_ref(t, out)}" if t == "demo" else t for t in cfg.distill.get("texts") or []]
    return stage_argv({**cfg.distill, **({"texts": texts} if texts else {})})


def _dataset_name(ref: str) -> str:
    return Path(ref.rstrip("/")).stem or ref


# -- steps ----------------------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One stage invocation: ``effir VERB ARGV`` writing into ``folder`` (the marker goes there, last). The fields
    after ``upstream`` say what the step is for the report, which reads them rather than the names."""

    name: str
    stage: str
    argv: list[str]
    folder: Path
    variant: str = "effir"
    upstream: list[Step] = field(default_factory=list)
    dataset: str | None = None
    """The data set an ``eval`` step evaluates on (its name, the folder's)."""
    quantized: str | None = None
    """The ``quantize`` entry an ``eval`` step evaluates the variant under (None: the 16-bit model)."""
    family: str | None = None
    """The baseline the step belongs to, a key of ``config.BASELINES`` (None: EffiR or the query-side variant)."""
    count: int | None = None
    """K, the sub-layers or blocks a layer-dropping baseline drops."""
    order: str | None = None
    """A 2:4 baseline's order, one of :data:`PRUNE_ORDERS`."""

    @property
    def done_file(self) -> str | None:
        """The stage's own completion file, for stages that resume by themselves (``StageSpec.done_file``)."""
        return SPECS[self.stage].done_file

    @property
    def key(self) -> str:
        return step_key(self.argv, "".join(u.key for u in self.upstream))

    def command(self, cfg: RunConfig, argv: list[str] | None = None) -> list[str]:
        """The process to start: ``python -m effir STAGE ARGV``, under the config's launcher where it applies."""
        launch = shlex.split(cfg.launcher) if cfg.launcher and SPECS[self.stage].launched else None
        prefix = [*launch, "-m", "effir"] if launch else [sys.executable, "-m", "effir"]
        return [*prefix, self.stage, *(self.argv if argv is None else argv)]


def _of_baseline(steps: list[Step], family: str, count: int | None = None, order: str | None = None) -> list[Step]:
    """Mark ``steps`` as the baseline ``family``'s (with its K or its order): the report labels them by it."""
    for step in steps:
        step.family, step.count, step.order = family, count, order
    return steps


def step_key(argv: list[str], upstream: str) -> str:
    return hashlib.sha256(json.dumps([argv, upstream]).encode()).hexdigest()[:16]


def main_steps(cfg: RunConfig, out: Path, parent: tuple[str, list[Step]] | None = None) -> list[Step]:
    """The EffiR pipeline as configured: each stage consumes the previous stage's model; then the query-side
    variant when asked for. ``parent``: the retriever distillation learns from, and the steps that make it."""
    parent = parent or (cfg.model, [])
    steps: list[Step] = []
    # with a parent to distil from, EffiR compresses that retriever itself (the fine-tuned full model under
    # parent: full), not the base LLM: the student starts where its teacher is
    model, prev = parent if "distill" in cfg.stages else (cfg.model, [])
    if "analyze" in cfg.stages:
        steps.append(Step("analyze", "analyze", [model, "--output", str(out / "analyze"),
                                                 *stage_argv(cfg.analyze)], out / "analyze", upstream=prev))
        prev = [steps[-1]]
    if "drop" in cfg.stages:
        scores = ["--scores", str(out / "analyze" / "scores.json")] if "analyze" in cfg.stages else []
        steps.append(Step("drop", "drop", [model, *scores, "--output", str(out / "drop"),
                                           *stage_argv(cfg.drop)], out / "drop", upstream=prev))
        model, prev = str(out / "drop" / "model"), [steps[-1]]
    steps += _train_eval_bench(cfg, out, model, prev, "effir", out, parent=parent)
    if cfg.query_side:
        steps += _query_side_steps(cfg, out, steps, parent)
    return steps


def _query_side_steps(cfg: RunConfig, out: Path, effir_steps: list[Step], parent) -> list[Step]:
    """The compressed model (the last drop / slim output) distilled as a query encoder in front of the parent."""
    compressed = [s for s in effir_steps if s.stage in ("drop", "slim")]
    model = str(compressed[-1].folder / "model") if compressed else cfg.model
    base = out / "query-side"
    argv = [model, "--teacher", parent[0], "--query-side", "--output", str(base / "distill"), *_distill_options(cfg, out)]
    steps = [Step("distill", "distill", argv, base / "distill", "query_side", compressed[-1:] + parent[1])]
    steps += _evaluate_and_time(cfg, out, str(base / "distill" / "model"), steps[-1:], "query_side", base,
                                baseline=False)
    return steps


def _train_eval_bench(cfg: RunConfig, out: Path, model: str, prev: list[Step], variant: str, base: Path,
                      slim: bool = True, parent: tuple[str, list[Step]] | None = None) -> list[Step]:
    steps = []
    train = _data_ref(cfg.train, out) if cfg.train else None
    order = ("finetune", "slim") if cfg.slim_after_finetune else ("slim", "finetune")
    for stage in order:
        if stage == "slim" and slim and "slim" in cfg.stages:
            train_args = ["--train", train] if train else []
            steps.append(Step("slim", "slim", [model, *train_args, "--output", str(base / "slim"),
                                               *stage_argv(cfg.slim)], base / "slim", variant, prev))
            model, prev = str(base / "slim" / "model"), [steps[-1]]
        elif stage == "finetune" and variant != "original" and (
                "finetune" in cfg.stages or (variant == "full" and "distill" in cfg.stages)):
            teacher = cfg.model if cfg.teacher == "parent" else cfg.teacher
            teacher_args = ["--teacher", teacher] if teacher else []
            steps.append(Step("finetune", "finetune", [model, "--train", train, "--output", str(base / "finetune"),
                                                       *teacher_args, *stage_argv(cfg.finetune)],
                              base / "finetune", variant, prev))
            model, prev = str(base / "finetune" / "model"), [steps[-1]]
    if "distill" in cfg.stages and variant not in ("original", "full"):  # the full baseline is fine-tuned
        teacher, made_by = parent or (cfg.model, [])
        steps.append(Step("distill", "distill", [model, "--teacher", teacher, "--output", str(base / "distill"),
                                                 *_distill_options(cfg, out)], base / "distill", variant,
                          prev + made_by))
        model, prev = str(base / "distill" / "model"), [steps[-1]]
    return steps + _evaluate_and_time(cfg, out, model, prev, variant, base, baseline=variant != "original")


def _evaluate_and_time(cfg: RunConfig, out: Path, model: str, prev: list[Step], variant: str, base: Path,
                       baseline: bool) -> list[Step]:
    """eval on every data set, then bench (against the original model with ``baseline``, else its own default)."""
    steps = []
    if "eval" in cfg.stages:
        steps += _eval_steps(cfg, out, model, prev, variant, base, None, [], cfg.eval)
        if variant != "query_side":  # two models behind one encoder: neither export nor weight quantisation takes it
            for entry in cfg.quantize:
                steps += _quantized_evals(cfg, out, model, prev, variant, base, entry)
    if "bench" in cfg.stages and variant != "original":
        against = ["--baseline", cfg.model] if baseline else []
        steps.append(Step("bench", "bench", [model, *against, "--output", str(base / "bench"),
                                             *stage_argv(cfg.bench)], base / "bench", variant, prev))
    return steps


def _quantized_evals(cfg: RunConfig, out: Path, model: str, prev: list[Step], variant: str, base: Path,
                     entry: str) -> list[Step]:
    """The model evaluated quantised (``entry`` of ``quantize``), into ``BASE/eval-ENTRY/DATASET``: the torch model
    with its weights quantised, or the int8 graph of an export step (``BASE/export-BACKEND``)."""
    backend, quantize = quantized_variant(entry)
    steps: list[Step] = []
    options = dict(cfg.eval)
    if backend != "torch":  # the graph runs on the CPU in fp32 / int8, whatever the torch model computes in
        options = {k: v for k, v in options.items() if k.replace("-", "_") not in ("device", "dtype")}
        folder = base / f"export-{backend}"
        steps.append(Step(f"export:{backend}", "export", [model, "--format", backend, "--int8", "--output",
                                                          str(folder / "model"), *stage_argv(cfg.export)],
                          folder, variant, prev))
        model, prev = str(folder / "model"), steps[-1:]
    return steps + _eval_steps(cfg, out, model, prev, variant, base, entry,
                               ["--backend", backend, "--quantize", quantize], options)


def _eval_steps(cfg: RunConfig, out: Path, model: str, prev: list[Step], variant: str, base: Path,
                quantized: str | None, served: list[str], options: dict) -> list[Step]:
    """``effir eval`` of ``model`` on every data set, into ``BASE/KIND/DATASET``, named ``KIND:DATASET``: KIND is
    ``eval``, or ``eval-ENTRY`` for the evaluation under the ``quantize`` entry ``quantized``."""
    kind = f"eval-{quantized}" if quantized else "eval"
    steps = []
    for ref in cfg.datasets:
        dataset = _dataset_name(ref)
        folder = base / kind / dataset
        steps.append(Step(f"{kind}:{dataset}", "eval",
                          [model, "--data", _data_ref(ref, out), "--split", cfg.split, "--output", str(folder),
                           *served, *stage_argv(options)], folder, variant, prev, dataset, quantized))
    return steps


def plan_full_baseline(cfg: RunConfig, out: Path) -> list[Step]:
    """The uncompressed model fine-tuned, evaluated and timed like the EffiR model (its fine-tuning step last but
    the evaluations: ``[finetune, eval..., bench]``)."""
    return _of_baseline(_train_eval_bench(cfg, out, cfg.model, [], "full", out / "baselines" / "full", slim=False),
                        "full")


def plan_baselines(cfg: RunConfig, out: Path, skip_full: bool = False,
                   parent: tuple[str, list[Step]] | None = None) -> list[Step]:
    """Baselines trained, evaluated and timed exactly like the EffiR model (no slimming); ``skip_full``: the full
    model's steps are planned elsewhere (it is the parent); ``parent``: what stage distill learns from."""
    steps: list[Step] = []
    b = cfg.baselines
    if b.get("original"):
        steps += _of_baseline(_train_eval_bench(cfg, out, cfg.model, [], "original", out / "baselines" / "original",
                                                slim=False), "original")
    full = plan_full_baseline(cfg, out) if b.get("full") and not skip_full else []
    steps += full
    for name, (flag, strategy) in DROP_BASELINES.items():
        for k in b.get(name) if isinstance(b.get(name), list) else [b.get(name)]:
            if k:
                steps += _drop_baseline(cfg, out, name, flag, strategy, k, parent)
    tuned = [s for s in (parent[1] if skip_full and parent else full) if s.stage == "finetune"]
    for name in PRUNE_BASELINES:
        if b.get(name):
            steps += _prune_baselines(cfg, out, name, tuned, parent)
    return steps


def _drop_baseline(cfg: RunConfig, out: Path, name: str, flag: str, strategy: str, k, parent=None) -> list[Step]:
    """Drop K sub-layers or blocks from the original model, then fine-tune, evaluate and time it like EffiR."""
    k = _auto_blocks(cfg, out) if k == "auto" else int(k)
    variant = f"{name}{k}"
    base = out / "baselines" / variant
    scores = ["--scores", str(out / "analyze" / "scores.json")] if strategy == "importance" else []
    shared = stage_argv({key: v for key, v in cfg.drop.items()
                         if key.replace("-", "_") in ("device", "dtype", "side", "force", "drop_massive")})
    drop = Step("drop", "drop", [cfg.model, *scores, flag, str(k), "--strategy", strategy, "--output",
                                 str(base / "drop"), *shared], base / "drop", variant)
    after = _train_eval_bench(cfg, out, str(base / "drop" / "model"), [drop], variant, base, False, parent)
    return _of_baseline([drop, *after], name, count=k)


def _prune_baselines(cfg: RunConfig, out: Path, name: str, tuned: list[Step], parent=None) -> list[Step]:
    """The paper's Table 4 orders for one 2:4 method: the original model pruned, then fine-tuned (or distilled) like
    EffiR (variant ``NAME-prune_ft``), and the fine-tuned full model pruned (``NAME-ft_prune``); both evaluated and
    timed against the original like every baseline. ``tuned``: the full model's fine-tuning step."""
    if not tuned:
        raise EffirError(f"baseline {name} also prunes the fine-tuned full model: set baselines.full: true and "
                         "stage finetune; fix the config")
    method, pattern = PRUNE_BASELINES[name]
    steps: list[Step] = []
    for order, model, prev in zip(PRUNE_ORDERS, (cfg.model, str(tuned[-1].folder / "model")), ([], tuned[-1:]),
                                  strict=True):
        variant = f"{name}-{order}"
        base = out / "baselines" / variant
        prune = Step("prune", "prune", [model, "--method", method, "--pattern", pattern, "--output", str(base / "prune"),
                                        *stage_argv(cfg.prune)], base / "prune", variant, prev)
        pruned = str(base / "prune" / "model")
        after = (_train_eval_bench(cfg, out, pruned, [prune], variant, base, False, parent) if order == "prune_ft"
                 else _evaluate_and_time(cfg, out, pruned, [prune], variant, base, baseline=True))
        steps += _of_baseline([prune, *after], name, order=order)
    return steps


def _auto_blocks(cfg: RunConfig, out: Path) -> int:
    """Blocks to drop so a Drop-kB model has about the EffiR model's parameter count (without embeddings)."""
    from .checkpoint import load
    from .surgery import count_parameters

    final = next((p for p in (out / "slim" / "model", out / "finetune" / "model", out / "drop" / "model")
                  if (p / "config.json").exists()), None)
    if final is None:
        raise EffirError("baseline K 'auto' needs the EffiR model; run its stages first or give K as a number")
    full = load(cfg.model, device="cpu", dtype="fp32")
    n_full = count_parameters(full.model, full.adapter)["without_embeddings"]
    layers = full.model.config.num_hidden_layers
    small = load(final, device="cpu", dtype="fp32")
    n_small = count_parameters(small.model, small.adapter)["without_embeddings"]
    return max(1, min(layers - 1, round((n_full - n_small) / (n_full / layers))))
