"""Compress a retriever you own to a budget, in one command: plan, cut, distil from itself, verify, bench.

    effir compress RETRIEVER --keep 0.5 --texts wiki beir:DIR --output OUT
    effir compress RETRIEVER --keep 0.5 --texts beir:DIR --query-side --output OUT   # queries only; index stays valid

--keep F is the fraction of the parent's parameters without embeddings the result keeps (--budget flops: of its
forward FLOPs on one --flops-length-token sequence). The command

1. plans: each candidate drops the k least important MLPs (1 - cos on calibration text, effir.redundancy; massive-
   activation sources never), k in --mlp-drops (default: 0, 1/8, 1/4 and 3/8 of the layers), each replaced by a
   full-rank linear map fitted by least squares (counted in the budget), then cuts the remaining MLP neurons,
   ranked globally by their contribution to the residual stream (super neurons kept, widths in multiples of
   --width-multiple), to the most the budget allows, and refits the down projections (effir.compensation). No
   training: each candidate is scored by the mean cosine between its embeddings and the parent's on a held-out
   slice of the texts (64 of the --holdout texts of each side; queries only with --query-side), and the best one
   is kept;
2. distils it from the parent on the rest of the texts (effir distill: full fine-tuning for --steps steps;
   --query-side trains the query encoder alone and writes a query-side folder whose documents the parent embeds);
3. verifies the folder (effir verify, without the reference check) and times it against the parent (effir bench,
   a short grid; --no-bench skips it);
4. writes OUT/model (the retriever, loadable as any effir model folder, by transformers and by sentence-
   transformers, with the parent's prompts, pooling and normalisation), OUT/compress.json (plan, every candidate,
   retention before and after distillation, top-10 overlap with the parent on the held-out texts, speed-up, wall
   times) and OUT/report.md.

A rerun of the same command after a kill continues: the search's result (OUT/plan.json, OUT/student/model) is kept,
and distillation resumes from its checkpoints (OUT/distill). A budget no candidate reaches is refused before anything
is written.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from .. import planning
from ..asymmetric import load as load_any
from ..calibration import SOURCE_HELP, block_batches, calibration_blocks, sample_texts
from ..checkpoint import load, save
from ..distillation import Texts, read_texts
from ..files import write_json, write_text
from ..probes import SUPER_NEURON_FACTOR, super_neurons
from ..redundancy import sublayer_importance
from ..refs import check_refs
from ..report import compress_headline, compress_report
from ..surgery import structure_of
from ..utils import DTYPE_CHOICES, EffirError, check_device, check_output_dir, finite_float, seed_everything
from . import main_verb
from .verify import SKIPPABLE

WRITES = ("plan.json", "student", "texts", "distill", "model", "bench", "verify.txt", "compress.json", "report.md")
"""What the command writes into OUT (and --overwrite removes)."""
NOT_KEYS = {"output", "overwrite", "no_progress", "no_bench", "skip_check", "verb"}
"""Options that do not change the result: every other one must match for a rerun to continue an earlier one."""
ENCODE_BATCH = 32
PROXY_TEXTS = 64
"""Held-out texts a side that score each candidate; the chosen one's retention is then measured on all of them."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the retriever to compress: built-in name (minilm-l6, ...), model folder "
                                 "(sentence-transformers folders included), .gguf or hub id")
    p.add_argument("--keep", type=finite_float, required=True,
                   help="fraction of the parent's parameters without embeddings (or FLOPs) to keep, in (0, 1)")
    p.add_argument("--texts", required=True, nargs="+", metavar="SOURCE",
                   help=f"unlabelled text to plan and distil on, one or more sources: {SOURCE_HELP}")
    p.add_argument("--output", required=True, help="run folder: model/, compress.json, report.md and the phases")
    p.add_argument("--query-side", action="store_true",
                   help="compress the query encoder only: a query-side folder whose documents the parent embeds")
    g = p.add_argument_group("plan")
    g.add_argument("--budget", choices=planning.BUDGETS, default="params",
                   help="what --keep counts: params (without embeddings, default) or forward flops")
    g.add_argument("--flops-length", type=int, default=256, help="tokens of the sequence --budget flops counts "
                                                                 "(default: 256)")
    g.add_argument("--mlp-drops", default=None, metavar="K,K,...",
                   help="MLPs dropped by each candidate plan (default: 0, 1/8, 1/4, 3/8 of the layers)")
    g.add_argument("--width-multiple", type=int, default=32,
                   help="round every kept MLP width to a multiple of this (default: 32, as effir slim)")
    g.add_argument("--super-neuron-factor", type=finite_float, default=SUPER_NEURON_FACTOR,
                   help=f"keep the massive-activation neurons, as effir slim (default {SUPER_NEURON_FACTOR:g}; 0: off)")
    g.add_argument("--calibration-samples", type=int, default=32,
                   help="blocks of --seq-len tokens of the texts that rank and fit the cuts (default: 32)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per calibration block (default: 256)")
    g.add_argument("--holdout", type=int, default=256,
                   help="texts a side held out of distillation, to score the candidates and the result (default: 256)")
    g = p.add_argument_group("distillation")
    g.add_argument("--steps", type=int, default=150, help="distillation steps (default: 150)")
    g.add_argument("--batch-size", type=int, default=16, help="texts a side per step (default: 16)")
    g.add_argument("--lr", type=finite_float, default=1e-4, help="AdamW lr (default: 1e-4)")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    g.add_argument("--max-length", type=int, default=128, help="tokens per text while distilling (default: 128)")
    g.add_argument("--max-texts", type=int, default=None,
                   help="distillation texts a side, a seeded sample (default: --steps x --batch-size, what the steps "
                        "see once; the parent embeds each of them first)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of the held-out slice, calibration and training")
    g.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    g.add_argument("--dtype", default="source", choices=DTYPE_CHOICES,
                   help="dtype to load, cut and save in (default: source, the dtype the model is stored in)")
    g.add_argument("--no-bench", action="store_true", help="skip the speed comparison with the parent")
    g.add_argument("--skip-check", action="append", default=[], choices=[c for c in SKIPPABLE if c != "reference"],
                   metavar="CHECK", help="leave out one of effir verify's reload checks (transformers, "
                                         "sentence-transformers); repeatable")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--overwrite", action="store_true",
                   help="start again, replacing what an earlier run with other options left in --output")


def run(args: argparse.Namespace) -> int:
    drops = _check_args(args)
    t0 = time.perf_counter()
    texts = read_texts([s for a in args.texts for s in a.split(",") if s], 200, None, args.seed)
    held, train = _split(texts, args.holdout, args.max_texts or args.steps * args.batch_size, args.seed)
    out = _prepare(args)
    seed_everything(args.seed)
    parent = load(args.model, device=args.device, dtype=args.dtype)
    ref = _embed(parent, held)
    times = {}
    plan_file = out / "plan.json"
    if plan_file.exists():
        plan = json.loads(plan_file.read_text())
        print(f"effir compress: plan found in {plan_file} (k = {plan['chosen']['k']}), search skipped")
    else:
        plan = _search(args, parent, train, held, ref, drops, out)
        _write_texts(out / "texts", train)
        write_json(plan_file, plan)  # last: the search is done
    del parent  # distillation loads what it needs; the parent's held-out embeddings stay in ``ref``
    gc.collect()
    times["search_s"] = plan["seconds"]
    t1 = time.perf_counter()
    _distill(args, out)
    times["distill_s"] = round(time.perf_counter() - t1, 1)
    final = load_any(out / "model", device=args.device, dtype=args.dtype)
    after = _retention(final, held, ref, args.query_side)
    verified = _verify(out, args.query_side, args.skip_check)
    bench = None if args.no_bench else _bench(args, out)
    times["total_s"] = round(time.perf_counter() - t0, 1)
    summary = _summary(args, plan, plan["chosen"]["retention"], after, verified, bench, times)
    write_text(out / "report.md", compress_report(summary))
    write_json(out / "compress.json", summary)  # last: the run is complete
    print(f"effir compress: {compress_headline(summary)}; {out / 'model'} (report: {out / 'report.md'})")
    return 0 if verified else 1


def _check_args(args) -> list[int] | None:
    if not 0.0 < args.keep < 1.0:
        raise EffirError(f"--keep must be in (0, 1) (a fraction of the parent's size), got {args.keep}")
    for name in ("steps", "batch_size", "holdout", "calibration_samples", "width_multiple", "max_length",
                 "flops_length"):
        if getattr(args, name) < 1:
            raise EffirError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_texts is not None and args.max_texts < 2:
        raise EffirError(f"--max-texts must be >= 2, got {args.max_texts}")
    if args.seq_len < 2 or args.lr <= 0:
        raise EffirError("--seq-len must be >= 2 and --lr > 0")
    check_device(args.device)
    check_output_dir(args.output, siblings=True)
    check_refs({"MODEL": args.model})
    if args.mlp_drops is None:
        return None
    try:
        drops = sorted({int(k) for k in args.mlp_drops.split(",") if k.strip()})
    except ValueError:
        raise EffirError(f"--mlp-drops takes comma-separated counts, got {args.mlp_drops!r}") from None
    if not drops or drops[0] < 0:
        raise EffirError(f"--mlp-drops takes counts >= 0, got {args.mlp_drops!r}")
    return drops


def _split(texts: Texts, holdout: int, max_texts: int, seed: int) -> tuple[Texts, Texts]:
    """A held-out slice of each side (at most half of it) and, of the rest, at most ``max_texts`` for distillation
    and calibration."""
    parts = {}
    for side, items in (("query", texts.queries), ("document", texts.documents)):
        n = min(holdout, len(items) // 2)
        held = set(random.Random(seed).sample(range(len(items)), n))
        rest = [t for i, t in enumerate(items) if i not in held]
        parts[side] = ([items[i] for i in sorted(held)], sample_texts(rest, max_texts, seed))
    return (Texts(parts["query"][0], parts["document"][0]), Texts(parts["query"][1], parts["document"][1]))


def _prepare(args) -> Path:
    """The run folder: emptied of an earlier run's files under --overwrite; refused when it holds another run."""
    out = Path(args.output)
    key = _key(args)
    if args.overwrite:
        for name in WRITES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    plan = out / "plan.json"
    if plan.exists():
        old = json.loads(plan.read_text()).get("key")
        if old != key:
            changed = sorted(k for k in key if (old or {}).get(k) != key[k])
            raise EffirError(f"{out} holds a compress run with other options ({', '.join(changed)}); rerun it "
                             "with the same options to continue, or pass --overwrite to start again")
        if (out / "compress.json").exists():
            raise EffirError(f"{out} already holds a finished run ({out / 'compress.json'}); pass --overwrite to "
                             "run again or choose another --output")
    elif (out / "model").exists():
        raise EffirError(f"{out / 'model'} exists and was not written by effir compress; pass --overwrite or "
                         "choose another --output")
    return out


def _key(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_KEYS}


def _embed(encoder, texts: Texts) -> dict[str, torch.Tensor]:
    """``{"query": (Nq, H), "document": (Nd, H)}`` embeddings of ``texts``."""
    return {"query": encoder.encode(texts.queries, "query", ENCODE_BATCH),
            "document": encoder.encode(texts.documents, "document", ENCODE_BATCH)}


# -- 1. the plan ----------------------------------------------------------------------------------------------------
def _search(args, parent, train: Texts, held: Texts, ref: dict, drops: list[int] | None, out: Path) -> dict:
    """Build every candidate, score it, save the best as OUT/student/model; the plan (not yet written)."""
    t0 = time.perf_counter()
    adapter = parent.adapter
    cal = train.queries if args.query_side else train.documents + train.queries
    blocks = calibration_blocks(parent, cal, args.calibration_samples, args.seq_len, seed=args.seed,
                                source=" ".join(args.texts), verb="compress")
    batches = list(block_batches(blocks, 4, parent.pad_id))
    order, massive = planning.mlp_drop_order(sublayer_importance(parent.model, adapter, batches))
    layers = [i for i, w in enumerate(structure_of(parent.model, adapter)["mlp_widths"]) if w is not None]
    protect = dict(zip(layers, super_neurons(parent.model, adapter, layers, batches[:2], args.super_neuron_factor),
                       strict=True))
    before = planning.cost(parent.model, adapter, args.budget, args.flops_length)
    target = int(args.keep * before)
    ks = drops or planning.drop_counts(len(structure_of(parent.model, adapter)["mlp_widths"]), len(order))
    if ks[-1] > len(order):
        raise EffirError(f"--mlp-drops {ks[-1]}: only {len(order)} MLPs can be dropped "
                         f"({len(massive)} kept as massive-activation sources)")
    print(f"effir compress: {args.budget} {before:,} -> at most {target:,} ({args.keep:g}); candidates drop "
          f"{', '.join(map(str, ks))} MLP(s) (least important first: {order[:max(ks)]}; never {massive})")
    best, candidates = None, []
    sample = Texts(held.queries[:PROXY_TEXTS], held.documents[:PROXY_TEXTS])  # the held-out slice is in random order
    for k in ks:
        student, info = _candidate(args, parent, order[:k], batches, target, protect, sample,
                                   {side: e[:PROXY_TEXTS] for side, e in ref.items()})
        candidates.append(info)
        if student is not None and (best is None or info["proxy"] > best[1]["proxy"]):
            best = (student, info)
    if best is None:
        raise EffirError(f"no plan reaches --keep {args.keep:g} of the {args.budget}: even dropping {ks[-1]} MLP(s) "
                         f"and cutting every MLP to its super neurons and --width-multiple {args.width_multiple} "
                         "keeps more; raise --keep, or lower --width-multiple")
    student, chosen = best
    chosen["retention"] = _retention(student, held, ref, args.query_side)  # on all of it, as after distillation
    save(student, out / "student" / "model", stage={"stage": "compress", **{k: chosen[k] for k in (
        "k", "dropped_mlp", "ratio")}, "keep": args.keep, "budget": args.budget, "target": target}, overwrite=True)
    return {"key": _key(args), "budget": args.budget, "keep": args.keep, "parent_cost": before, "target": target,
            "massive_mlp": massive, "mlp_order": order, "candidates": candidates, "chosen": chosen,
            "seconds": round(time.perf_counter() - t0, 1)}


def _candidate(args, parent, drops: list[int], batches, target: int, protect, held: Texts, ref: dict):
    """One candidate plan: the cut student (None when unreachable) and what it did and scored."""
    t0 = time.perf_counter()
    student = copy.copy(parent)
    student.model, student.meta = copy.deepcopy(parent.model), copy.deepcopy(parent.meta)
    did = planning.compress_to_budget(student.model, student.adapter, drops, batches, target=target,
                                      budget=args.budget, length=args.flops_length, multiple=args.width_multiple,
                                      protect=protect, progress=not args.no_progress)
    info = {"k": len(drops), "dropped_mlp": sorted(drops)}
    if did is None:
        print(f"  k={len(drops)}: unreachable")
        return None, {**info, "reachable": False, "seconds": round(time.perf_counter() - t0, 1)}
    student.meta["structure"] = structure_of(student.model, student.adapter)
    score = _retention(student, held, ref, args.query_side)
    info.update(reachable=True, ratio=did["ratio"], widths=did["widths"], cost=did["cost"],
                parameters=did["parameters"],
                proxy=score["mean_cosine"], retention=score, seconds=round(time.perf_counter() - t0, 1))
    print(f"  k={info['k']} {info['dropped_mlp']}: MLP neurons cut {did['ratio']:.1%}, {args.budget} "
          f"{did['cost']:,}; mean cosine to the parent {info['proxy']:.4f} ({info['seconds']:.0f}s)")
    return student, info


def _retention(encoder, held: Texts, ref: dict, query_side: bool) -> dict:
    """Mean cosine to the parent's embeddings of the held-out texts (per side and their mean; queries only with
    ``query_side``, whose documents are the parent's), and the overlap of each held-out query's top-10 held-out
    documents with the parent's."""
    mine = {"query": encoder.encode(held.queries, "query", ENCODE_BATCH)}
    mine["document"] = ref["document"] if query_side else encoder.encode(held.documents, "document", ENCODE_BATCH)
    by_side = {s: round(planning.mean_cosine(mine[s], ref[s]), 4) for s in (("query",) if query_side else mine)}
    return {"mean_cosine": round(sum(by_side.values()) / len(by_side), 4), "by_side": by_side,
            "texts": {"query": len(held.queries), "document": len(held.documents)},
            "top10_overlap": round(planning.top_k_overlap(mine["query"], mine["document"], ref["query"],
                                                          ref["document"]), 4)}


def _write_texts(folder: Path, texts: Texts) -> None:
    """The distillation texts as a BEIR folder (corpus and queries), which effir distill reads as they are."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"corpus.jsonl": [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(texts.documents)],
            "queries.jsonl": [{"_id": f"q{i}", "text": t} for i, t in enumerate(texts.queries)]}
    for name, items in rows.items():
        write_text(folder / name, "".join(json.dumps(r) + "\n" for r in items))


# -- 2. distillation, 3. checks -------------------------------------------------------------------------------------
def _distill(args, out: Path) -> None:
    """effir distill of OUT/student/model from the parent into OUT/distill (resuming its checkpoints), its model
    then renamed to OUT/model; skipped when OUT/model is there."""
    run_dir = out / "distill"
    if (out / "model").exists():
        print(f"effir compress: {out / 'model'} found, distillation skipped")
        return
    if not (run_dir / "distill.json").exists() or not (run_dir / "model").exists():
        argv = [str(out / "student" / "model"), "--teacher", args.model, "--texts", f"beir:{out / 'texts'}",
                "--output", str(run_dir), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                "--lr", str(args.lr), "--query-max-length", str(args.max_length), "--document-max-length",
                str(args.max_length), "--seed", str(args.seed), "--save-every", str(max(10, args.steps // 5)),
                *([] if args.lora else ["--full"]), *(["--query-side"] if args.query_side else []),
                *(["--no-progress"] if args.no_progress else []), *(["--device", args.device] if args.device else [])]
        print(f"effir compress: distilling the student from {args.model} ({args.steps} steps)", flush=True)
        if main_verb("distill", argv) != 0:
            raise EffirError(f"distillation failed (see above); rerun the same command to continue from "
                             f"{run_dir}")
    os.replace(run_dir / "model", out / "model")  # one rename: OUT/model is whole or absent


def _verify(out: Path, query_side: bool, skip: list[str]) -> bool:
    """effir verify on OUT/model (the query route of a query-side folder), without the reference check (the weights
    were trained); its lines go to OUT/verify.txt too."""
    folder = out / "model" / "query" if query_side else out / "model"
    lines = io.StringIO()
    with contextlib.redirect_stdout(lines):
        rc = main_verb("verify", [str(folder), *(a for check in ["reference", *skip] for a in ("--skip", check))])
    print(lines.getvalue(), end="")
    write_text(out / "verify.txt", lines.getvalue())
    return rc == 0


def _bench(args, out: Path) -> dict | None:
    """effir bench of OUT/model against the parent on a short grid, in a process of its own (as effir run runs it:
    what this process holds must not enter the timings); the per-side speed-ups, or None when it failed."""
    cmd = [sys.executable, "-m", "effir", "bench", str(out / "model"), "--baseline", args.model,
           "--output", str(out / "bench"), "--sides", "query" if args.query_side else "query,document",
           "--query-batch-sizes", "8", "--doc-lengths", "256", "--doc-batch-sizes", "4", "--repeats", "3",
           "--max-repeats", "20", "--min-time", "0.5", *(["--device", args.device] if args.device else [])]
    print("effir compress: timing against the parent: " + " ".join(cmd[1:]), flush=True)
    if subprocess.call(cmd) != 0:
        print("effir compress: warning: the speed comparison failed (see above); the model is complete",
              file=sys.stderr)
        return None
    result = json.loads((out / "bench" / "bench.json").read_text())
    return {side: round(v["speedup"], 3) for side, v in result.get("summary", {}).items()}


# -- 4. the summary -------------------------------------------------------------------------------------------------
def _summary(args, plan: dict, before: dict, after: dict, verified: bool, bench: dict | None, times: dict) -> dict:
    chosen = plan["chosen"]
    return {"model": args.model, "output": str(Path(args.output) / "model"), "query_side": args.query_side,
            "budget": plan["budget"], "keep": plan["keep"], "parent_cost": plan["parent_cost"],
            "target": plan["target"], "cost": chosen["cost"], "kept_fraction": round(chosen["cost"] /
                                                                                      plan["parent_cost"], 4),
            "plan": {k: chosen[k] for k in ("k", "dropped_mlp", "ratio", "widths")},
            "candidates": plan["candidates"], "massive_mlp": plan["massive_mlp"],
            "retention": {"before_distillation": before, "after_distillation": after,
                          "held_out": f"{after['texts']['query']} query-side and {after['texts']['document']} "
                                      "document-side texts left out of distillation (query-side texts: the queries "
                                      "of BEIR sources, one sentence of each passage of the others)"},
            "speedup": bench, "verified": verified, "steps": args.steps, "wall_s": times}
