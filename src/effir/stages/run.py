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
import json
import shlex
import subprocess
import time
from pathlib import Path

from ..config import SECTIONS, STAGES, RunConfig, load_config, quantized_variant, stage_argv
from ..files import write_json, write_text
from ..run_plan import Step, demo_folder, main_steps, plan_baselines, plan_full_baseline, step_key
from ..stage_specs import SPECS
from ..utils import EffirError, check_device, check_output_dir
from . import VERBS, RaisingParser, main_verb, takes_overwrite, verb_parser

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
    check_quantize(cfg)
    out = check_output_dir(cfg.output, "'output'")
    t0 = time.perf_counter()
    # the parent comes first when it is the fine-tuned full model: distillation learns from it
    first = plan_full_baseline(cfg, out) if cfg.parent == "full" else []
    tuned = [s for s in first if s.stage == "finetune"]
    parent = (str(tuned[0].folder / "model"), tuned) if tuned else (cfg.model, [])
    if args.dry_run:
        _print_plan(cfg, out, first, parent)
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


def _print_plan(cfg: RunConfig, out: Path, first: list[Step], parent) -> None:
    """The stage commands, baselines included (those sized 'auto' need the EffiR model: named, not planned)."""
    steps = first + main_steps(cfg, out, parent)
    try:
        steps += plan_baselines(cfg, out, bool(first), parent)
    except EffirError as e:
        print(f"# baselines: planned once the EffiR model exists ({e})")
    for step in steps:
        print(" ".join(shlex.quote(a) for a in step.command(cfg)))


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
    for stage in SECTIONS:
        if stage == "distill" and not ("distill" in cfg.stages or cfg.query_side or cfg.distill):
            continue  # its required --texts come from a section no one wrote
        parser = verb_parser(stage, RaisingParser)
        known = parser.flags()
        for key in getattr(cfg, stage):
            if "--" + key.replace("_", "-") not in known:
                raise EffirError(f"unknown option '{stage}.{key}' for `effir {stage}` ({VERBS[stage][1]}); "
                                 f"see effir {stage} -h")
        try:  # the options the pipeline wires itself get placeholders; only the config's values are at stake
            options = parser.parse_args([*SPECS[stage].placeholder_argv(), *stage_argv(getattr(cfg, stage))])
            check_device(getattr(options, "device", None), "--device")
        except EffirError as e:
            raise EffirError(f"section '{stage}' of the config: {e}; fix the value") from None


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


def check_quantize(cfg: RunConfig) -> None:
    """Refuse, before the first stage, a quantisation this machine cannot run (NF4 without CUDA, missing packages)."""
    if not cfg.quantize:
        return
    from .. import serving

    for entry in cfg.quantize:
        backend, quantize = quantized_variant(entry)
        try:
            serving.check_variant(backend, quantize, cfg.eval.get("device") if backend == "torch" else None, None)
        except EffirError as e:
            raise EffirError(f"quantize: {entry}: {e}") from None


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
    key = step_key(["demo-data", json.dumps(cfg.demo, sort_keys=True)], "")
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        return
    from ..calibration import wiki_articles
    from ..synthetic import build_ict_beir

    print("effir: building the demo data set (inverse cloze over the built-in Wikipedia excerpt)")
    build_ict_beir(wiki_articles(), folder, **cfg.demo)
    write_json(marker, {"key": key})



# -- execution ------------------------------------------------------------------------------------------------------
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
        if (stale or step.done_file is None) and takes_overwrite(step.stage):
            argv.append("--overwrite")  # stages that resume by themselves keep their checkpoints otherwise
        print(f"effir run: [{step.variant}] {step.name}: effir {step.stage} " + " ".join(map(shlex.quote, argv)),
              flush=True)
        alone = cfg.launcher or SPECS[step.stage].alone
        rc = subprocess.call(step.command(cfg, argv)) if alone else _in_process([step.stage, *argv])
        if rc != 0:
            raise EffirError(f"stage {step.name} of {step.variant} failed (exit {rc}); fix what it printed above "
                             "and rerun the same command to continue from there")
        step.folder.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"key": step.key, "finished": time.time()})  # last: the stage is complete
