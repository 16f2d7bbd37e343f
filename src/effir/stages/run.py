"""The whole pipeline from one YAML file: analyze -> drop -> slim -> finetune -> eval -> bench, then a report
(``slim_after_finetune: true`` swaps slim and finetune: the fine-tuned retriever is slimmed).

    effir run CONFIG.yaml [--set slim.ratio=0.5 ...] [--from STAGE]
    effir run demo            # a shipped config by name: demo, smollm2-scifact, mistral-7b-effir
    effir demo                # = effir run demo: the whole pipeline on smollm2-135m and built-in Wikipedia data

Each stage runs as its own process (``python -m effir VERB ...``, or under the config's ``launcher``) and writes into
its own subfolder of the run folder, with a completion marker written last. Rerunning the same command skips the
finished stages and resumes an interrupted one (slim and finetune continue from their checkpoints); a changed
option re-runs that stage and everything after it; ``--from STAGE`` redoes STAGE and what follows. The resolved
config is saved as RUN/config.yaml. The report is RUN/report.md + RUN/report.json with plots beside them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import STAGES, RunConfig, load_config, stage_argv
from ..files import write_json, write_text
from ..utils import EffirError, check_device, check_output_dir
from . import VERBS, RaisingParser, main_verb, verb_parser

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MARKER = ".effir-done.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help=f"YAML config, or a shipped one by name ({', '.join(shipped_configs())})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set slim.ratio=0.5 --set output=runs/x (repeatable)")
    p.add_argument("--from", dest="from_stage", choices=STAGES, default=None,
                   help="redo this stage and every stage after it")
    p.add_argument("--output", default=None, help="run folder (overrides the config's 'output')")
    p.add_argument("--dry-run", action="store_true", help="validate and print the stage commands; run nothing")


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def run(args: argparse.Namespace) -> int:
    ref = args.config or ("demo" if args.verb == "demo" else None)
    if ref is None:
        raise EffirError("give a config file or one of the shipped configs: " + ", ".join(shipped_configs()))
    overrides = list(args.set) + ([f"output={args.output}"] if args.output else [])
    cfg = load_config(resolve_config(ref), overrides)
    check_stage_options(cfg)
    check_parent(cfg)
    out = check_output_dir(cfg.output, "'output'")
    t0 = time.perf_counter()
    # the parent comes first when it is the fine-tuned full model: distillation learns from it
    first = plan_full_baseline(cfg, out) if cfg.parent == "full" else []
    tuned = [s for s in first if s.stage == "finetune"]
    parent = (str(tuned[0].folder / "model"), tuned) if tuned else (cfg.model, [])
    if args.dry_run:
        for step in first + main_steps(cfg, out, parent):
            print(" ".join(shlex.quote(a) for a in step.command(cfg)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    _save_config(cfg, out / "config.yaml")
    prepare_data(cfg, out)
    rerun: set[int] = set()
    execute(first, cfg, args.from_stage, rerun)
    steps = main_steps(cfg, out, parent)
    execute(steps, cfg, args.from_stage, rerun)
    baseline_steps = plan_baselines(cfg, out, bool(first), parent)  # after EffiR: 'auto' sizes follow it
    execute(baseline_steps, cfg, args.from_stage, rerun)
    from ..report import write_report

    report = write_report(cfg, out, first + steps + baseline_steps)
    print(f"effir {args.verb}: finished in {time.perf_counter() - t0:.0f}s; report: {report}")
    return 0


def resolve_config(ref: str) -> Path:
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    shipped = CONFIGS / f"{ref}.yaml"
    if not shipped.exists():
        raise EffirError(f"config {ref!r} not found: not a file and not a shipped config "
                         f"({', '.join(shipped_configs())})")
    return shipped


def check_stage_options(cfg: RunConfig) -> None:
    """Every option in a stage section must be a real option of that stage (misspellings name the key), with a value
    its parser accepts: checked for every stage before the first one runs, not when the bad one is reached."""
    for stage in STAGES:
        if stage == "distill" and not ("distill" in cfg.stages or cfg.query_side or cfg.distill):
            continue  # its required --texts come from a section no one wrote
        parser = verb_parser(stage, RaisingParser)
        known = parser.flags()
        for key in getattr(cfg, stage):
            if "--" + key.replace("_", "-") not in known:
                raise EffirError(f"unknown option '{stage}.{key}' for `effir {stage}` ({VERBS[stage][1]}); "
                                 f"see effir {stage} -h")
        try:  # the options the pipeline wires itself get placeholders; only the config's values are at stake
            options = parser.parse_args([*WIRED_ARGS[stage], *stage_argv(getattr(cfg, stage))])
            check_device(options.device, "--device")
        except EffirError as e:
            raise EffirError(f"section '{stage}' of the config: {e}; fix the value") from None


WIRED_ARGS = {"analyze": ["MODEL", "--output", "OUT"], "drop": ["MODEL", "--output", "OUT"],
              "slim": ["MODEL", "--output", "OUT"], "finetune": ["MODEL", "--train", "DATA", "--output", "OUT"],
              "distill": ["MODEL", "--teacher", "PARENT", "--output", "OUT"],
              "eval": ["MODEL", "--data", "DATA", "--output", "OUT"], "bench": ["MODEL", "--output", "OUT"]}
"""Placeholders for the arguments each stage requires and ``effir run`` supplies."""


def check_parent(cfg: RunConfig) -> None:
    """Distillation and the query-side variant need a retriever to learn from: with ``parent: original``, the model
    must be one (a sentence-transformers folder, or an effir folder that was fine-tuned or distilled)."""
    if cfg.parent != "original" or not ("distill" in cfg.stages or cfg.query_side):
        return
    from ..checkpoint import read_effir_json
    from ..refs import resolve

    kind, where = resolve(cfg.model)
    if kind == "hub":  # cannot be read offline; the user named it as the parent
        return
    history = read_effir_json(where).get("history", []) if kind == "dir" else []
    trained = any(h.get("stage") in ("finetune", "distill") for h in history)
    if kind == "gguf" or not ((Path(where) / "modules.json").is_file() or trained):
        raise EffirError(f"stage 'distill' and query_side learn from the parent retriever, and {cfg.model} is not one "
                         "(no sentence-transformers files, never fine-tuned by effir): set parent: full with "
                         "baselines.full: true to use the fine-tuned full model as the parent")


def _save_config(cfg: RunConfig, path: Path) -> None:
    import yaml

    write_text(path, "# resolved config of this run (effir run)\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# -- data -----------------------------------------------------------------------------------------------------------
def prepare_data(cfg: RunConfig, out: Path) -> None:
    """Build the built-in ICT data set once if the config names ``demo`` (train or datasets)."""
    if "demo" not in [cfg.train, *cfg.datasets]:
        return
    folder = demo_folder(out)
    marker = folder.parent / MARKER
    key = _key(["demo-data", json.dumps(cfg.demo, sort_keys=True)], "")
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        return
    from ..calibration import wiki_articles
    from ..synthetic import build_ict_beir

    print("effir: building the demo data set (inverse cloze over the built-in Wikipedia excerpt)")
    build_ict_beir(wiki_articles(), folder, **cfg.demo)
    write_json(marker, {"key": key})


def demo_folder(out: Path) -> Path:
    return out / "data" / "demo"


def _data_ref(ref: str, out: Path) -> str:
    return str(demo_folder(out)) if ref == "demo" else ref


def _dataset_name(ref: str) -> str:
    return Path(ref.rstrip("/")).stem or ref


# -- steps ----------------------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One stage invocation: ``effir VERB ARGV`` writing into ``folder`` (the marker goes there, last)."""

    name: str
    stage: str
    argv: list[str]
    folder: Path
    variant: str = "effir"
    upstream: list[Step] = field(default_factory=list)
    done_file: str | None = None
    """The stage's own completion file (slim.json / finetune.json), for stages that resume by themselves."""

    @property
    def key(self) -> str:
        return _key(self.argv, "".join(u.key for u in self.upstream))

    def command(self, cfg: RunConfig, argv: list[str] | None = None) -> list[str]:
        """The process to start: ``python -m effir STAGE ARGV``, under the config's launcher where it applies."""
        launch = shlex.split(cfg.launcher) if cfg.launcher and self.stage in ("slim", "finetune", "eval") else None
        prefix = [*launch, "-m", "effir"] if launch else [sys.executable, "-m", "effir"]
        return [*prefix, self.stage, *(self.argv if argv is None else argv)]


def _key(argv: list[str], upstream: str) -> str:
    return hashlib.sha256(json.dumps([argv, upstream]).encode()).hexdigest()[:16]


def main_steps(cfg: RunConfig, out: Path, parent: tuple[str, list[Step]] | None = None) -> list[Step]:
    """The EffiR pipeline as configured: each stage consumes the previous stage's model; then the query-side
    variant when asked for. ``parent``: the retriever distillation learns from, and the steps that make it."""
    parent = parent or (cfg.model, [])
    steps: list[Step] = []
    model, prev = cfg.model, []
    if "analyze" in cfg.stages:
        steps.append(Step("analyze", "analyze", [cfg.model, "--output", str(out / "analyze"),
                                                 *stage_argv(cfg.analyze)], out / "analyze"))
        prev = [steps[-1]]
    if "drop" in cfg.stages:
        scores = ["--scores", str(out / "analyze" / "scores.json")] if "analyze" in cfg.stages else []
        steps.append(Step("drop", "drop", [model, *scores, "--output", str(out / "drop" / "model"),
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
    argv = [model, "--teacher", parent[0], "--query-side", "--output", str(base / "distill"), *stage_argv(cfg.distill)]
    steps = [Step("distill", "distill", argv, base / "distill", "query_side", compressed[-1:] + parent[1],
                  "distill.json")]
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
                                               *stage_argv(cfg.slim)], base / "slim", variant, prev, "slim.json"))
            model, prev = str(base / "slim" / "model"), [steps[-1]]
        elif stage == "finetune" and variant != "original" and (
                "finetune" in cfg.stages or (variant == "full" and "distill" in cfg.stages)):
            teacher = cfg.model if cfg.teacher == "parent" else cfg.teacher
            teacher_args = ["--teacher", teacher] if teacher else []
            steps.append(Step("finetune", "finetune", [model, "--train", train, "--output", str(base / "finetune"),
                                                       *teacher_args, *stage_argv(cfg.finetune)],
                              base / "finetune", variant, prev, "finetune.json"))
            model, prev = str(base / "finetune" / "model"), [steps[-1]]
    if "distill" in cfg.stages and variant not in ("original", "full"):  # the full baseline is fine-tuned
        teacher, made_by = parent or (cfg.model, [])
        steps.append(Step("distill", "distill", [model, "--teacher", teacher, "--output", str(base / "distill"),
                                                 *stage_argv(cfg.distill)], base / "distill", variant,
                          prev + made_by, "distill.json"))
        model, prev = str(base / "distill" / "model"), [steps[-1]]
    return steps + _evaluate_and_time(cfg, out, model, prev, variant, base, baseline=variant != "original")


def _evaluate_and_time(cfg: RunConfig, out: Path, model: str, prev: list[Step], variant: str, base: Path,
                       baseline: bool) -> list[Step]:
    """eval on every data set, then bench (against the original model with ``baseline``, else its own default)."""
    steps = []
    if "eval" in cfg.stages:
        for ref in cfg.datasets:
            folder = base / "eval" / _dataset_name(ref)
            steps.append(Step(f"eval:{_dataset_name(ref)}", "eval",
                              [model, "--data", _data_ref(ref, out), "--split", cfg.split, "--output", str(folder),
                               *stage_argv(cfg.eval)], folder, variant, prev))
    if "bench" in cfg.stages and variant != "original":
        against = ["--baseline", cfg.model] if baseline else []
        steps.append(Step("bench", "bench", [model, *against, "--output", str(base / "bench"),
                                             *stage_argv(cfg.bench)], base / "bench", variant, prev))
    return steps


def plan_full_baseline(cfg: RunConfig, out: Path) -> list[Step]:
    """The uncompressed model fine-tuned, evaluated and timed like the EffiR model (its fine-tuning step last but
    the evaluations: ``[finetune, eval..., bench]``)."""
    return _train_eval_bench(cfg, out, cfg.model, [], "full", out / "baselines" / "full", slim=False)


def plan_baselines(cfg: RunConfig, out: Path, skip_full: bool = False,
                   parent: tuple[str, list[Step]] | None = None) -> list[Step]:
    """Baselines trained, evaluated and timed exactly like the EffiR model (no slimming); ``skip_full``: the full
    model's steps are planned elsewhere (it is the parent); ``parent``: what stage distill learns from."""
    steps: list[Step] = []
    b = cfg.baselines
    if b.get("original"):
        steps += _train_eval_bench(cfg, out, cfg.model, [], "original", out / "baselines" / "original", slim=False)
    if b.get("full") and not skip_full:
        steps += plan_full_baseline(cfg, out)
    for name, flag, strategy in (("drop_mlp", "--mlp", "importance"), ("drop_blocks", "--blocks", "importance"),
                                 ("drop_last", "--blocks", "last"), ("drop_attention", "--attention", "importance")):
        for k in b.get(name) if isinstance(b.get(name), list) else [b.get(name)]:
            if k:
                steps += _drop_baseline(cfg, out, name, flag, strategy, k, parent)
    return steps


def _drop_baseline(cfg: RunConfig, out: Path, name: str, flag: str, strategy: str, k, parent=None) -> list[Step]:
    """Drop K sub-layers or blocks from the original model, then fine-tune, evaluate and time it like EffiR."""
    k = _auto_blocks(cfg, out) if k == "auto" else int(k)
    variant = f"{name}{k}"
    base = out / "baselines" / variant
    scores = ["--scores", str(out / "analyze" / "scores.json")] if strategy == "importance" else []
    if strategy == "importance" and "analyze" not in cfg.stages:
        raise EffirError(f"baseline {name} ranks by importance and needs stage 'analyze'")
    shared = stage_argv({key: v for key, v in cfg.drop.items()
                         if key.replace("-", "_") in ("device", "dtype", "side", "force", "drop_massive")})
    drop = Step("drop", "drop", [cfg.model, *scores, flag, str(k), "--strategy", strategy, "--output",
                                 str(base / "drop" / "model"), *shared], base / "drop", variant)
    return [drop, *_train_eval_bench(cfg, out, str(base / "drop" / "model"), [drop], variant, base, False, parent)]


def _auto_blocks(cfg: RunConfig, out: Path) -> int:
    """Blocks to drop so a Drop-kB model has about the EffiR model's parameter count (without embeddings)."""
    import effir
    from effir.surgery import count_parameters

    final = next((p for p in (out / "slim" / "model", out / "finetune" / "model", out / "drop" / "model")
                  if (p / "config.json").exists()), None)
    if final is None:
        raise EffirError("baseline K 'auto' needs the EffiR model; run its stages first or give K as a number")
    full = effir.load(cfg.model, device="cpu", dtype="fp32")
    n_full = count_parameters(full.model, full.adapter)["without_embeddings"]
    layers = full.model.config.num_hidden_layers
    small = effir.load(final, device="cpu", dtype="fp32")
    n_small = count_parameters(small.model, small.adapter)["without_embeddings"]
    return max(1, min(layers - 1, round((n_full - n_small) / (n_full / layers))))


# -- execution ------------------------------------------------------------------------------------------------------
OVERWRITE = {"analyze", "drop", "slim", "finetune", "eval"}  # stages that refuse an existing output without it


def _in_process(argv: list[str]) -> int:
    """Run one stage in this process (no launcher): same CLI, no interpreter start-up per stage."""
    import gc

    try:
        return main_verb(argv[0], argv[1:])
    finally:
        gc.collect()


def execute(steps: list[Step], cfg: RunConfig, from_stage: str | None, rerun: set[int] | None = None) -> None:
    """Run the steps that are not done (or whose options or upstream changed). ``rerun`` collects the steps run now,
    shared between calls: whatever consumes their output runs again too, in either stage order."""
    order = cfg.pipeline()
    redo = set(order[order.index(from_stage):]) if from_stage else set()
    rerun = set() if rerun is None else rerun
    for step in steps:
        marker = step.folder / MARKER
        done = json.loads(marker.read_text()) if marker.exists() else None
        forced = step.stage in redo or any(id(u) in rerun for u in step.upstream)
        if done and done.get("key") == step.key and not forced:
            print(f"effir run: [{step.variant}] {step.name}: done, skipped")
            continue
        rerun.add(id(step))
        stale = done is not None or forced
        if step.done_file and not stale and (step.folder / step.done_file).exists():
            write_json(marker, {"key": step.key, "finished": time.time()})  # finished just before a kill
            continue
        marker.unlink(missing_ok=True)
        argv = list(step.argv)
        if (stale or step.done_file is None) and step.stage in OVERWRITE:
            argv.append("--overwrite")  # stages that resume by themselves keep their checkpoints otherwise
        print(f"effir run: [{step.variant}] {step.name}: effir {step.stage} " + " ".join(map(shlex.quote, argv)),
              flush=True)
        # bench times in a process of its own: what earlier stages left behind in this one must not enter its timings
        alone = cfg.launcher or step.stage == "bench"
        rc = subprocess.call(step.command(cfg, argv)) if alone else _in_process([step.stage, *argv])
        if rc != 0:
            raise EffirError(f"stage {step.name} of {step.variant} failed (exit {rc}); fix what it printed above "
                             "and rerun the same command to continue from there")
        step.folder.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"key": step.key, "finished": time.time()})  # last: the stage is complete
