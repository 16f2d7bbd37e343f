"""Semi-structured N:M pruning (2:4): the paper's Wanda and SparseGPT baselines (its Table 4).

    effir prune MODEL --method wanda|sparsegpt [--pattern 2:4] --output DIR
    effir prune MODEL --method sparsegpt --calibration beir:DIR --calibration-samples 128 --seq-len 2048 --output DIR

Every Linear of every layer's attention and MLP (the roles of the architecture table; not the embeddings, norms or
heads) keeps N non-zero weights in every M consecutive inputs of each row, chosen by llmcompressor's kernels on
calibration text (the same sources as `effir analyze`: built-in prose, a .txt/.jsonl file, or a BEIR folder's
corpus), layer by layer: layer i is calibrated on the outputs of the already-pruned layers before it, as both
papers do. Wanda keeps the largest |W_ij| * ||X_j||_2 of each group and leaves them as they are; SparseGPT picks
them through the inverse Hessian of the layer's inputs and updates the kept weights to make up for the others.

Writes DIR/model (a normal model folder that drop, finetune, distill, eval, bench and export take; its effir.json
records the pattern, and fine-tuning keeps the zeros) and, last, DIR/prune.json. The zeros are stored: 2:4 saves
no memory, and no time without sparse kernels (NVIDIA's 2:4 sparse tensor cores); `effir bench` times the dense
matmuls, so it reads about 1.0x. That is the paper's point against it.
"""

from __future__ import annotations

import argparse
import time

from ..calibration import block_batches, calibration_blocks, load_texts
from ..checkpoint import load, save
from ..files import write_json
from ..pruning import METHODS, prune_layers
from ..sparsity import check_divisible, follows, parse_pattern, record
from ..utils import DTYPE_CHOICES, EffirError, check_device, check_output_dir, finite_float, seed_everything

SUMMARY = "prune.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name (smollm2-135m, ...), model folder (compressed or not), .gguf or hub id")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="wanda: keep the largest |weight| x input norm (no update); sparsegpt: choose and "
                        "compensate through the inverse Hessian of the inputs")
    p.add_argument("--pattern", default="2:4", metavar="N:M",
                   help="N non-zeros in every M consecutive input weights of each row (default: 2:4, the one "
                        "sparse tensor cores run)")
    p.add_argument("--output", required=True, help="run folder: model/ and prune.json")
    p.add_argument("--calibration", default="wiki", metavar="SOURCE",
                   help="text as for effir analyze: wiki (built-in prose, default), FILE.txt, FILE.jsonl or beir:DIR")
    p.add_argument("--calibration-samples", type=int, default=128,
                   help="blocks of --seq-len tokens (default: 128, as both papers)")
    p.add_argument("--seq-len", type=int, default=2048,
                   help="tokens per block, capped at the model's max_position_embeddings (default: 2048, as both "
                        "papers)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for the order of the calibration texts (default: 0)")
    p.add_argument("--block-size", type=int, default=None,
                   help="SparseGPT: columns updated together, a multiple of M (default: 128, or the largest multiple "
                        "of M below it)")
    p.add_argument("--dampening", type=finite_float, default=0.01,
                   help="SparseGPT: added to the Hessian's diagonal, as a fraction of its mean (default: 0.01)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", default="source", choices=DTYPE_CHOICES,
                   help="dtype to load, prune and save in (default: source, the dtype the model is stored in; the "
                        "kernels compute in fp32)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")


def run(args: argparse.Namespace) -> int:
    out, pattern = _check_args(args)
    texts = load_texts(args.calibration).documents  # before the model: a bad source fails in a second
    seed_everything(args.seed)
    t0 = time.perf_counter()
    encoder = load(args.model, device=args.device, dtype=args.dtype)
    check_divisible(encoder.model, encoder.adapter, pattern)
    blocks = calibration_blocks(encoder, texts, args.calibration_samples, args.seq_len, seed=args.seed,
                                source=args.calibration, verb="prune")
    (out / SUMMARY).unlink(missing_ok=True)  # --overwrite: the old run stops looking finished before any new work
    stats = prune_layers(encoder.model, encoder.adapter, block_batches(blocks, args.batch_size, encoder.pad_id),
                         args.method, pattern, block_size=args.block_size, dampening=args.dampening,
                         progress=not args.no_progress)
    broken = follows(encoder.model, encoder.adapter, pattern)
    if broken is not None:  # the kernels' contract; never seen
        raise RuntimeError(f"{broken} does not follow {pattern} after pruning")
    calibration = {"source": args.calibration, "samples": len(blocks), "seq_len": max(len(b) for b in blocks),
                   "tokens": sum(len(b) for b in blocks), "seed": args.seed}
    encoder.meta["sparsity"] = record(pattern, args.method, calibration)
    options = {"block_size": args.block_size, "dampening": args.dampening} if args.method == "sparsegpt" else {}
    stage = {"stage": "prune", "model": str(args.model), "method": args.method, "pattern": str(pattern),
             "calibration": calibration, **options}
    save(encoder, out / "model", stage=stage, overwrite=True)
    summary = {**stage, "output": str(out / "model"), "projections": stats["projections"],
               "weights": stats["weights"], "zeros": stats["zeros"], "zero_fraction": stats["zeros"] / stats["weights"],
               "layer_seconds": stats["seconds"], "layer_error": stats["error"],
               "wall_s": round(time.perf_counter() - t0, 1),
               "note": "the zeros are stored densely: no memory saved, and no speed-up without sparse kernels"}
    write_json(out / SUMMARY, summary)  # last: its presence marks a finished run
    print(f"effir prune ({args.method} {pattern}): {stats['projections']} projections, {stats['zeros']:,} of "
          f"{stats['weights']:,} weights zero ({summary['zero_fraction']:.1%}) in {summary['wall_s']:.0f}s; saved "
          f"{out / 'model'} (dense storage: the same size and speed without sparse kernels)")
    return 0


def _check_args(args):
    pattern = parse_pattern(args.pattern)
    for name, low in (("calibration_samples", 1), ("seq_len", 2), ("batch_size", 1)):
        if getattr(args, name) < low:
            raise EffirError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if args.block_size is None:
        args.block_size = max(pattern.group, 128 // pattern.group * pattern.group)
    if args.block_size < pattern.group or args.block_size % pattern.group:
        raise EffirError(f"--block-size {args.block_size} must be a positive multiple of M = {pattern.group}")
    if args.dampening < 0:
        raise EffirError(f"--dampening must be >= 0, got {args.dampening:g}")
    check_device(args.device)
    out = check_output_dir(args.output)
    if (out / SUMMARY).exists() and not args.overwrite:
        raise EffirError(f"{out} already holds a finished run ({out / SUMMARY}); pass --overwrite or choose "
                         "another --output")
    return out, pattern
