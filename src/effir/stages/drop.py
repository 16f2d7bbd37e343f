"""Depth reduction: drop whole attention / MLP sub-layers (or whole blocks) and save a compressed model folder.

    effir drop MODEL --scores scores.json --mlp 16 [--attention K] [--blocks K] --output DIR
    effir drop MODEL --strategy last --blocks 8 --output DIR          # the paper's Drop-Last-kB baseline

The compressed model is DIR/model, as every verb that writes a model writes it (`effir slim DIR/model` next).

With --strategy importance (default), attention and MLP sub-layers are ranked as two separate groups by the
scores that `effir analyze` wrote (low = redundant) and the K lowest of each group go; --blocks K first drops the K
whole blocks (attention + MLP of one layer) with the lowest block score. With --strategy last, the last K blocks /
MLPs / attention sub-layers go, no scores needed. A dropped sub-layer takes its norm(s) with it and the residual
stream passes through unchanged.

A dropped MLP is then replaced by what reproduces it best for its cost, fitted on --calibration text with no
training (effir.compensation), layer by layer through the layers already replaced: --compensate lstsq (default) a
linear map of the MLP's normalised input plus a bias, by ridge least squares, of rank --compensate-rank (default: the
hidden size; a hidden x hidden map has hidden^2 parameters, against 3 x hidden x MLP width for a gated MLP, and costs as
much compute); --compensate bias: the MLP's mean output as a bias (no compute); --compensate none: nothing.
Attention sub-layers and the MLPs of whole blocks (--blocks) are dropped without a replacement.

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

from ..calibration import block_batches, calibration_blocks, load_texts
from ..checkpoint import fingerprint, load, save
from ..compensation import COMPENSATE_SAMPLES, METHODS, replace_and_fit
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
    p.add_argument("--compensate", choices=METHODS, default="lstsq",
                   help="what replaces each dropped MLP, fitted on --calibration text: lstsq (default): a linear map "
                        "of its normalised input plus a bias; bias: its mean output; none: nothing")
    p.add_argument("--compensate-rank", type=int, default=None, metavar="R",
                   help="rank of the --compensate lstsq map (default: the hidden size, a full map; a lower rank "
                        "costs 2 x hidden x R parameters and FLOPs per token instead of hidden^2)")
    p.add_argument("--calibration", default="wiki", metavar="SOURCE",
                   help="text the replacements are fitted on: wiki (built-in prose), FILE.txt, FILE.jsonl or "
                        "beir:DIR (default: wiki)")
    p.add_argument("--compensate-samples", type=int, default=COMPENSATE_SAMPLES,
                   help=f"blocks of --seq-len tokens of --calibration text to fit on (default: {COMPENSATE_SAMPLES})")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration block (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    # before the model: a bad calibration source fails in a second
    texts = load_texts(args.calibration).documents if args.compensate != "none" else None
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
    stage = {"stage": "drop", "model": _reference(args.model), "fingerprint": fp,
             "strategy": args.strategy, "scores": str(Path(args.scores).resolve()) if report else None,
             "side": args.side or (report or {}).get("side"), "blocks": new["block"],
             "dropped_attention": new["attention"], "dropped_mlp": new["mlp"], "compensate": args.compensate}
    replaced = [i for i in new["mlp"] if i not in new["block"]] if args.compensate != "none" else []
    # the rest first, so that the replacements are fitted on the inputs they will see
    drop_sublayers(encoder.model, adapter, attention=new["attention"], mlp=set(new["mlp"]) - set(replaced))
    if replaced:
        stage.update(_replace(args, encoder, replaced, texts))
    encoder.meta["structure"] = after = structure_of(encoder.model, adapter)
    params_after = count_parameters(encoder.model, adapter)
    t1 = time.perf_counter()
    out = save(encoder, Path(args.output) / "model", stage, overwrite=args.overwrite)
    save_s = time.perf_counter() - t1
    _print_summary(params_before, params_after, after, new, out, load_s, save_s)
    return 0


def _replace(args, encoder, layers: list[int], texts: list[str]) -> dict:
    """Drop the MLPs of ``layers`` and put fitted maps (or biases) in their place; returns what goes into the
    history."""
    hidden = encoder.model.config.hidden_size
    rank = 0 if args.compensate == "bias" else min(args.compensate_rank or hidden, hidden)
    blocks = calibration_blocks(encoder, texts, args.compensate_samples, args.seq_len, seed=args.seed,
                                source=args.calibration, verb="drop")
    what = "its mean output" if rank == 0 else f"a rank-{rank} linear map of its input"
    print(f"effir drop: replacing each dropped MLP by {what}, fitted on {len(blocks)} block(s) of up to "
          f"{args.seq_len} tokens of {args.calibration}")
    stats = replace_and_fit(encoder.model, encoder.adapter, dict.fromkeys(layers, rank),
                            block_batches(blocks, 4, encoder.pad_id), progress=not args.no_progress)
    error = sum(stats["error_refit"]) / len(stats["error_refit"])
    print(f"  output error of the dropped MLPs (relative, on that text): 1 -> {error:.4f} ({stats['seconds']:.1f} s)")
    return {"compensate_rank": rank, "calibration": args.calibration, "compensate_samples": args.compensate_samples,
            "seq_len": args.seq_len, "seed": args.seed, "compensation": stats}


def _check_args(args, counts: dict) -> None:
    for group, k in counts.items():
        if k < 0:
            raise EffirError(f"--{'blocks' if group == 'block' else group} must be >= 0, got {k}")
    if args.compensate != "none" and (args.compensate_samples < 1 or args.seq_len < 2):
        raise EffirError("--compensate-samples must be >= 1 and --seq-len >= 2")
    if args.compensate_rank is not None and args.compensate_rank < 1:
        raise EffirError(f"--compensate-rank must be >= 1, got {args.compensate_rank} (--compensate bias for rank 0)")
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
