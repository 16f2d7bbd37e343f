"""Depth reduction: drop whole attention / MLP sub-layers (or whole blocks) and save a compressed model folder.

    effir drop MODEL --scores scores.json --mlp 16 [--attention K] [--blocks K] --output DIR
    effir drop MODEL --strategy last --blocks 8 --output DIR          # the paper's Drop-Last-kB baseline

The compressed model is DIR/model, as every verb that writes a model writes it (`effir slim DIR/model` next).

With --strategy importance (default), attention and MLP sub-layers are ranked as two separate groups by the
scores that `effir analyze` wrote (low = redundant) and the K lowest of each group go; --blocks K first drops the K
whole blocks (attention + MLP of one layer) with the lowest block score. With --strategy last, the last K blocks /
MLPs / attention sub-layers go, no scores needed. A dropped sub-layer takes its norm(s) with it and the residual
stream passes through unchanged.

Dropping from an already-compressed model composes: indices are the original layer indices, K counts the
sub-layers this run drops, and sub-layers dropped before are never picked again. The scores must come from the
same model (same fingerprint, which also needs the same --dtype as `effir analyze` used); --force overrides this.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ..checkpoint import fingerprint, load, save
from ..redundancy import GROUPS, drop_order, with_blocks
from ..surgery import count_parameters, drop_sublayers, structure_of
from ..utils import DTYPE_CHOICES, EffirError, check_device, check_output_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name (smollm2-135m, ...), model folder (compressed or not), .gguf or hub id")
    p.add_argument("--scores", default=None, help="scores.json from `effir analyze` (required by --strategy importance)")
    p.add_argument("--mlp", type=int, default=0, metavar="K", help="MLP sub-layers to drop (default: 0)")
    p.add_argument("--attention", type=int, default=0, metavar="K", help="attention sub-layers to drop (default: 0)")
    p.add_argument("--blocks", type=int, default=0, metavar="K", help="whole blocks to drop (default: 0)")
    p.add_argument("--strategy", choices=("importance", "last"), default="importance",
                   help="importance: lowest scores first (default); last: the last layers, no scores")
    p.add_argument("--side", choices=("query", "document"), default=None,
                   help="rank by one side's scores from a two-sided scores.json (default: the combined scores)")
    p.add_argument("--drop-massive", action="store_true",
                   help="also drop sub-layers that create a massive activation (attention sink); by default "
                        "--strategy importance keeps them, because dropping one breaks every attention after it")
    p.add_argument("--output", required=True, help="run folder: the compressed model goes into DIR/model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model in --output")
    p.add_argument("--force", action="store_true", help="use scores computed on a different model (fingerprint)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available, as `effir analyze`)")
    p.add_argument("--dtype", default="source", choices=DTYPE_CHOICES,
                   help="dtype to load, edit and save in (default: source, the dtype the model is stored in; "
                        "auto: bf16 where the hardware runs it natively)")


def run(args: argparse.Namespace) -> int:
    counts = {"attention": args.attention, "mlp": args.mlp, "block": args.blocks}
    _check_args(args, counts)
    report = _read_scores(Path(args.scores)) if args.strategy == "importance" else None
    if args.scores and not report:
        print(f"effir drop: note: --strategy last ignores --scores {args.scores}", file=sys.stderr)
    t0 = time.perf_counter()
    encoder = load(args.model, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    adapter = encoder.adapter
    before = structure_of(encoder.model, adapter)
    n = before["num_layers"]
    fp = fingerprint(encoder) if report else None
    scores = _pick_scores(report, args, n, fp) if report else None
    keep = {} if args.drop_massive or not report else _massive(report)
    new = choose_drops(before, counts, scores, keep)
    params_before = count_parameters(encoder.model, adapter)
    drop_sublayers(encoder.model, adapter, attention=new["attention"], mlp=new["mlp"])
    encoder.meta["structure"] = after = structure_of(encoder.model, adapter)
    params_after = count_parameters(encoder.model, adapter)
    stage = {"stage": "drop", "model": _reference(args.model), "fingerprint": fp,
             "strategy": args.strategy, "scores": str(Path(args.scores).resolve()) if report else None,
             "side": args.side or (report or {}).get("side"), "blocks": new["block"],
             "dropped_attention": new["attention"], "dropped_mlp": new["mlp"]}
    t1 = time.perf_counter()
    out = save(encoder, Path(args.output) / "model", stage, overwrite=args.overwrite)
    save_s = time.perf_counter() - t1
    _print_summary(params_before, params_after, after, new, out, load_s, save_s)
    return 0


def _check_args(args, counts: dict) -> None:
    for group, k in counts.items():
        if k < 0:
            raise EffirError(f"--{'blocks' if group == 'block' else group} must be >= 0, got {k}")
    if not any(counts.values()):
        raise EffirError("nothing to drop: pass --mlp K, --attention K and/or --blocks K")
    if args.strategy == "importance" and not args.scores:
        raise EffirError("--strategy importance needs --scores scores.json (from `effir analyze`); "
                         "or use --strategy last")
    check_device(args.device)
    model = check_output_dir(args.output) / "model"  # written beside itself, then renamed into place
    if model.exists() and any(model.iterdir()) and not args.overwrite:
        raise EffirError(f"{model} already exists and is not empty; pass --overwrite or choose another --output")


def _read_scores(path: Path) -> dict:
    if not path.is_file():
        raise EffirError(f"scores file {path} not found; write one with `effir analyze MODEL --output DIR`")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EffirError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-run `effir analyze`") from None
    if not isinstance(report, dict) or report.get("format") != 1 or not isinstance(report.get("scores"), dict):
        raise EffirError(f"{path} is not an effir scores file (format 1 with a 'scores' table); "
                         "re-run `effir analyze`")
    return report


def _pick_scores(report: dict, args, n: int, fp: str) -> dict:
    """The score table to rank by, after checking it belongs to this model."""
    path = args.scores
    if report.get("fingerprint") != fp and not args.force:
        raise EffirError(f"{path} was computed on a different model ({report.get('model')!r}, fingerprint "
                         f"{report.get('fingerprint')}) than {args.model!r} (fingerprint {fp}); re-run `effir "
                         "analyze` on this model (same --dtype), or pass --force to use these scores anyway")
    if report.get("num_layers") != n:
        raise EffirError(f"{path} scores {report.get('num_layers')} layers but {args.model!r} has {n}; "
                         "re-run `effir analyze` on this model")
    tables = {"scores": report["scores"]}
    if args.side:
        if not isinstance(report.get("by_side"), dict) or args.side not in report["by_side"]:
            raise EffirError(f"{path} has no {args.side}-side scores (side {report.get('side')!r}); "
                             "drop --side or re-run `effir analyze --side both`")
        tables[f"by_side.{args.side}"] = report["by_side"][args.side]
    for name, table in tables.items():
        for group in GROUPS:
            vals = table.get(group) if isinstance(table, dict) else None
            if not isinstance(vals, list) or len(vals) != n or not all(
                    v is None or (isinstance(v, (int, float)) and math.isfinite(v)) for v in vals):
                raise EffirError(f"{path}: {name}.{group} must be {n} finite numbers (null for dropped "
                                 "sub-layers); re-run `effir analyze`")
    return tables[f"by_side.{args.side}" if args.side else "scores"]


def _massive(report: dict) -> dict[str, list[int]]:
    """Sub-layers the scores flag as massive-activation sources (none for scores written before effir 0.1.0 had
    the flag); a block holding one is kept too. Says which it keeps."""
    keep = with_blocks(report.get("massive") or {})
    named = [f"{g} {i}" for g in ("attention", "mlp") for i in keep[g]]
    if named:
        print(f"effir drop: keeping {', '.join(named)}: massive-activation source (attention sink) in the scores; "
              "--drop-massive to allow dropping", file=sys.stderr)
    return keep


def choose_drops(structure: dict, counts: dict, scores: dict | None, keep: dict | None = None) -> dict:
    """Layer indices to drop now: ``{"block": [...], "attention": [...], "mlp": [...]}`` (attention/mlp include
    the blocks' sub-layers). ``scores`` None means the ``last`` strategy. Sub-layers dropped before, and those in
    ``keep`` (``{group: layer indices}``, importance strategy only), are never picked."""
    n = structure["num_layers"]
    keep = keep or {}
    gone = {"attention": set(structure["dropped_attention"]), "mlp": set(structure["dropped_mlp"])}
    new = {"block": [], "attention": set(), "mlp": set()}
    if counts["block"]:
        candidates = [i for i in range(n) if not (i in gone["attention"] and i in gone["mlp"])
                      and i not in keep.get("block", ())]
        new["block"] = sorted(_pick(candidates, counts["block"], scores and scores["block"], "blocks", n,
                                     len(keep.get("block", ()))))
        for group in ("attention", "mlp"):
            new[group] |= set(new["block"]) - gone[group]
            gone[group] |= set(new["block"])
    for group in ("attention", "mlp"):
        if counts[group]:
            candidates = [i for i in range(n) if i not in gone[group] and i not in keep.get(group, ())]
            new[group] |= set(_pick(candidates, counts[group], scores and scores[group], group, n,
                                         len(keep.get(group, ()))))
    return {g: sorted(v) for g, v in new.items()}


def _pick(candidates: list[int], k: int, scores: list | None, what: str, n: int, kept: int = 0) -> list[int]:
    if k > len(candidates):
        why = f" ({kept} kept as massive-activation sources; --drop-massive allows them)" if kept else ""
        raise EffirError(f"cannot drop {k} {what}: the model has {n} layers and only {len(candidates)} "
                         f"{what} left to drop{why}; use a smaller K")
    if scores is None:  # strategy "last"
        return candidates[len(candidates) - k:]
    unscored = [i for i in candidates if scores[i] is None]
    if unscored:
        raise EffirError(f"the scores have no value for {what} {unscored[0]}, which is still in the model; "
                         "re-run `effir analyze` on this model")
    allowed = set(candidates)
    return [i for i in drop_order(scores) if i in allowed][:k]


def _reference(ref: str) -> str:
    """How the history names the source model: an absolute path for local paths, else the name as given."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else str(ref)


def _print_summary(before: dict, after: dict, s_after: dict, new: dict, out: Path, load_s: float,
                   save_s: float) -> None:
    def pct(a, b):
        return f"{100 * (1 - a / b):.1f}% fewer" if b else "n/a"

    print(f"parameters before: {before['total']:,} total, {before['without_embeddings']:,} without embeddings")
    print(f"parameters after:  {after['total']:,} total ({pct(after['total'], before['total'])}), "
          f"{after['without_embeddings']:,} without embeddings "
          f"({pct(after['without_embeddings'], before['without_embeddings'])})")
    if new["block"]:
        print(f"dropped blocks now: {new['block']}")
    for group, label in (("attention", "attention"), ("mlp", "MLP")):
        total = s_after[f"dropped_{group}"]
        print(f"dropped {label} now: {new[group]}; all dropped {label} ({len(total)} of {s_after['num_layers']}): "
              f"{total}")
    print(f"saved {out} (load {load_s:.1f}s, save {save_s:.1f}s)")
