"""Retrieval fine-tuning (EffiR step 4): InfoNCE over 1 positive + N hard negatives + in-batch negatives, plus KL
distillation towards a teacher, with LoRA (merged at the end) or full fine-tuning.

    effir finetune MODEL --train DATA --output DIR [--teacher REF|data] [--save-every N]

DATA is a BEIR folder (split ``--split``, hard negatives mined by BM25 or a dense model), a Tevatron jsonl or a
FlagEmbedding jsonl. DIR receives, in order: ``train_data.jsonl`` (the prepared data, FlagEmbedding format, reusable
as --train), ``checkpoints/step-N/`` every --save-every steps, ``train_log.jsonl`` (one line per step), the merged
model in ``model/`` (load it with ``effir.load("DIR/model")``), and last ``finetune.json``.
Re-running the same command after a kill resumes from the newest checkpoint and continues exactly; a checkpoint of
another run (other arguments, data, model or process count) is refused. Multi-GPU / multi-node: launch the same
command with ``torchrun`` or ``accelerate launch`` (docs/distributed.md); in-batch negatives are gathered across
processes, so N processes with --batch-size b train like one process with --batch-size N*b.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from .. import options, sparsity, train_checkpoints, training
from ..checkpoint import fingerprint, load, save
from ..encoder import Encoder
from ..files import write_json
from ..refs import check_refs
from ..train_data import (
    TrainExample,
    check_negatives,
    cross_encoder_scores,
    dense_teacher_scores,
    load_training_data,
    parse_rank_range,
    prepare_negatives,
    write_flag_jsonl,
)
from ..utils import (
    EffirError,
    check_device,
    check_output_dir,
    check_schedule,
    finite_float,
    seed_everything,
)

COLLAPSE_COS = 0.99
"""Mean cosine between the different documents of a batch above which the embeddings count as collapsed: every
text maps to nearly the same vector and InfoNCE sits at ln(#candidates). Runs can pass close to it early on; a run
that learns moves away (measured values: docs/results/figures-behind-defaults.md)."""
COLLAPSE_STEPS = 5
"""Consecutive collapsed steps before the warning: a run may pass through a collapse and recover from it."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name, model folder (compressed or not), .gguf file or hub id")
    options.add_train_data(p, required=True)
    p.add_argument("--output", required=True, help="run folder: data, checkpoints, log, model/ and finetune.json")
    g = p.add_argument_group("negatives and teacher")
    options.add_contrastive(g, negatives="auto", num_negatives=7, miner=True)
    g.add_argument("--mine-model", default=None, help="dense model for --negatives dense (default: MODEL itself)")
    g.add_argument("--teacher", default=None,
                   help="'data' (scores in the jsonl), a cross-encoder folder, or a dense model (e.g. the "
                        "uncompressed parent) for the KL term")
    g.add_argument("--teacher-kind", default="auto", choices=["auto", "dense", "cross-encoder"],
                   help="auto: cross-encoder when the folder's config.json names a *ForSequenceClassification")
    g.add_argument("--kl-weight", type=finite_float, default=None, help="KL weight (default: 1 with a teacher, else 0)")
    g.add_argument("--kl-teacher-temperature", type=finite_float, default=None,
                   help="teacher softmax temperature (default: --temperature for a dense teacher, else 1)")
    g.add_argument("--prepare-only", action="store_true", help="stop after writing DIR/train_data.jsonl")
    g = p.add_argument_group("model and loss")
    options.add_lora(g)
    g.add_argument("--no-in-batch", action="store_true", help="score each query against its own candidates only")
    g.add_argument("--no-gather", action="store_true",
                   help="in-batch negatives from this process only (default: gathered from every process)")
    options.add_lengths(g)
    g = p.add_argument_group("optimisation")
    options.add_steps(g, lr_help="AdamW lr", batch_size=8, batch_help="queries per process per micro-batch")
    options.add_schedule(g, epochs_help="passes over the training queries")
    g = p.add_argument_group("run")
    options.add_run(g, save_every=0)
    g.add_argument("--resume", default=None, help="checkpoint folder to resume from (default: newest in DIR)")
    g.add_argument("--encode-batch-size", type=int, default=32, help="batch for mining / teacher scoring")
    options.add_training_device(g)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    return training.run_with_accelerator(args.device, args.precision, lambda acc: _run(args, acc))


def _run(args, acc) -> int:
    out = Path(args.output)
    training.prepare_output(out, "finetune.json", args.overwrite, acc)
    t0 = time.perf_counter()
    seed_everything(args.seed)
    encoder, saved_settings, save_dtype = training.load_for_training(
        args.model, acc.device, full=args.full, save_dtype=args.save_dtype, pooling=args.pooling,
        query_max_length=args.query_max_length, document_max_length=args.document_max_length)
    model_fp = fingerprint(encoder)
    examples, teacher_t = _training_data(args, encoder, acc, out)
    if args.prepare_only:
        return 0
    per_epoch = training.steps_per_epoch(len(examples), args.batch_size, acc.num_processes, args.grad_accum)
    total = args.max_steps or max(1, int(round(args.epochs * per_epoch)))
    seed_everything(args.seed)
    zeros = sparsity.zero_masks(encoder)  # an N:M-pruned model keeps its zeros (before LoRA wraps the model)
    optimizer, scheduler = training.optimizer_and_schedule(encoder, options.typed(options.Optimisation, args), total)
    if args.full:
        sparsity.hold_zeros(encoder.model, encoder.adapter, zeros)
    key = _run_key(args, acc.num_processes, model_fp, out / "train_data.jsonl", total)
    start = train_checkpoints.resume(out / "checkpoints", acc, encoder.model, optimizer, scheduler, key,
                                     log_path=out / "train_log.jsonl",
                                     explicit=Path(args.resume) if args.resume else None,
                                     restart_on_mismatch=args.overwrite)
    model, optimizer = acc.prepare(encoder.model, optimizer)
    encoder.model = model
    stats = _train(args, acc, encoder, optimizer, scheduler, examples, teacher_t, start, total, per_epoch, out, key)
    encoder.model = acc.unwrap_model(model)
    if acc.is_main_process:
        _finish(args, encoder, save_dtype, saved_settings, out, stats, total, time.perf_counter() - t0, zeros)
    return 0


def _check_args(args) -> None:
    for name in ("num_negatives", "batch_size", "grad_accum", "lora_r", "lora_alpha", "encode_batch_size"):
        if getattr(args, name) < 1:
            raise EffirError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature <= 0 or args.lr <= 0:
        raise EffirError("--temperature and --lr must be > 0")
    check_schedule(args.warmup_ratio, args.schedule)
    if args.max_steps is not None and args.max_steps < 1:
        raise EffirError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.teacher is None and args.kl_weight:
        raise EffirError("--kl-weight needs a --teacher (data, a cross-encoder or a dense model)")
    parse_rank_range(args.mine_range)
    check_device(args.device)  # accelerate would otherwise train on the CPU when --device cuda finds no GPU
    check_output_dir(args.output)
    train_checkpoints.check_resume(args.resume)
    check_refs({"MODEL": args.model, "--mine-model": args.mine_model,
                "--teacher": None if args.teacher == "data" else args.teacher})


# -- data -----------------------------------------------------------------------------------------------------------
def _training_data(args, encoder: Encoder, acc, out: Path) -> tuple[list[TrainExample], float]:
    """Main process prepares (mines, scores) and writes DIR/train_data.jsonl; every process then reads that file."""
    path, meta_path = out / "train_data.jsonl", out / "train_data.meta.json"
    prep = {k: getattr(args, k) for k in ("train", "split", "negatives", "num_negatives", "mine_range", "mine_model",
                                           "teacher", "teacher_kind", "seed")}
    prep["model"] = str(args.model)
    prep.update(document_max_length=encoder.settings.document_max_length, pooling=encoder.settings.pooling,
                query_max_length=encoder.settings.query_max_length)
    kind = _teacher_kind(args)
    if acc.is_main_process:
        fresh = not (path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == prep)
        if fresh:
            examples = _prepare_examples(args, encoder, kind)
            write_flag_jsonl(examples, path)
            write_json(meta_path, prep)
    acc.wait_for_everyone()
    examples, _ = load_training_data(path)
    check_negatives(examples, args.num_negatives)
    if kind and any(ex.pos_scores is None for ex in examples):
        raise EffirError("--teacher data: the training data has no pos_scores/neg_scores for some queries; score "
                         "them with --teacher MODEL or drop --teacher")
    teacher_t = args.kl_teacher_temperature or (args.temperature if kind == "dense" else 1.0)
    return examples, teacher_t


def _teacher_kind(args) -> str | None:
    if args.teacher is None:
        return None
    if args.teacher == "data":
        return "data"
    if args.teacher_kind != "auto":
        return args.teacher_kind
    cfg = Path(args.teacher) / "config.json"
    archs = json.loads(cfg.read_text()).get("architectures") or [] if cfg.exists() else []
    return "cross-encoder" if any(a.endswith("ForSequenceClassification") for a in archs) else "dense"


def _prepare_examples(args, encoder: Encoder, kind: str | None) -> list[TrainExample]:
    teacher = None
    if kind == "dense":  # checked before any mining, which can take long
        # scored in the dtype the student computes in, so a teacher equal to the student scores exactly as it does
        compute = {"bf16": "bf16", "fp16": "fp16"}.get(training.mixed_precision(args.precision, args.device), "fp32")
        teacher = load(args.teacher, device=str(encoder.device), dtype=compute)
        if teacher.tokenizer.get_vocab() != encoder.tokenizer.get_vocab():
            raise EffirError(f"teacher {args.teacher} uses another tokenizer than {args.model}; a dense teacher must "
                             "be the student's uncompressed parent (same tokenizer); for any other model pass a "
                             "cross-encoder with --teacher-kind cross-encoder")
        teacher.settings = encoder.settings
    examples, corpus = load_training_data(args.train, args.split)
    show = not args.no_progress
    miner = None
    if args.negatives == "dense":
        miner = encoder if args.mine_model is None else load(args.mine_model, device=str(encoder.device))
    prepare_negatives(examples, corpus, args.negatives, args.num_negatives, parse_rank_range(args.mine_range),
                      args.seed, miner, args.encode_batch_size, show)
    if teacher is not None:
        dense_teacher_scores(examples, teacher, args.encode_batch_size, show)
    elif kind == "cross-encoder":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.teacher)
        ce = AutoModelForSequenceClassification.from_pretrained(args.teacher).to(encoder.device)
        cross_encoder_scores(examples, ce, tok, args.encode_batch_size, show_progress=show)
    return examples


# -- run key --------------------------------------------------------------------------------------------------------
RUN_KEYS = options.run_keys(add_arguments)
"""What a checkpoint must share with this run to be resumed: every option but effir.options.NOT_RUN_KEYS."""


def _run_key(args, world: int, model_fp: str, data_path: Path, total: int) -> dict:
    """What makes a checkpoint this run's: a checkpoint with another key is refused (or replaced under --overwrite)."""
    key = {k: getattr(args, k) for k in RUN_KEYS}
    key.update(model_fingerprint=model_fp, processes=world, total_steps=total,
               data_sha256=hashlib.sha256(data_path.read_bytes()).hexdigest()[:16])
    return key


# -- training loop --------------------------------------------------------------------------------------------------
def _train(args, acc, encoder, optimizer, scheduler, examples, teacher_t, start, total, per_epoch, out, key) -> dict:
    weight = args.kl_weight if args.kl_weight is not None else (1.0 if args.teacher else 0.0)
    spec = training.Contrastive(args.num_negatives, args.temperature, args.seed, in_batch=not args.no_in_batch,
                                gather=not args.no_gather, kl_weight=weight, teacher_temperature=teacher_t)
    micro_batch = training.contrastive_micro_batches(acc, encoder, examples, spec, batch_size=args.batch_size,
                                                     grad_accum=args.grad_accum, per_epoch=per_epoch)

    def save(step: int) -> None:
        train_checkpoints.save_checkpoint(out / "checkpoints", acc, encoder.model, optimizer, scheduler, step, key,
                                          args.keep_checkpoints)

    collapse = {"collapsed_steps": 0, "collapse_warned": False}
    stats = training.train_steps(acc, encoder.model, optimizer, scheduler, micro_batch, start=start, total=total,
                                 grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm,
                                 log_path=out / "train_log.jsonl", save=save, save_every=args.save_every,
                                 on_record=lambda r: _watch_collapse(collapse, r, args, acc.is_main_process),
                                 desc="finetune", progress=not args.no_progress)
    return {**stats, **collapse}


def _watch_collapse(stats: dict, record: dict, args, main: bool) -> None:
    """Count consecutive collapsed steps; warn once, with what to try, when a run stays collapsed."""
    stats["collapsed_steps"] = stats["collapsed_steps"] + 1 if record["doc_cos"] >= COLLAPSE_COS else 0
    stats["final_doc_cos"] = record["doc_cos"]
    if stats["collapsed_steps"] < COLLAPSE_STEPS or stats["collapse_warned"] or not main:
        return
    stats["collapse_warned"] = True
    print(f"\neffir finetune: warning: the embeddings have collapsed since step {record['step'] - COLLAPSE_STEPS + 1} "
          f"(mean cosine between different documents {record['doc_cos']:.4f}; InfoNCE {record['info_nce']:.3f}, "
          "about ln(#candidates)): the model maps every text to nearly the same vector. Runs can recover (training "
          "goes on), but one that stays here learns nothing. Seen when compression removed the model's massive-"
          "activation source (compress with scores from this effir version: `effir analyze` flags it, `effir drop` "
          f"keeps it); else try compressing less, a --teacher, or another --lr (now {args.lr:g}).",
          file=sys.stderr, flush=True)


def _finish(args, encoder: Encoder, save_dtype: torch.dtype, settings, out: Path, stats, total: int,
            wall: float, zeros: dict | None) -> None:
    encoder.model = training.finished_model(encoder.model, lora=not args.full,
                                            gradient_checkpointing=args.gradient_checkpointing, dtype=save_dtype)
    encoder.settings = settings
    stage = {"stage": "finetune", "train": str(args.train), "steps": total,
             "method": "full" if args.full else f"lora(r={args.lora_r},alpha={args.lora_alpha})", "lr": args.lr,
             "teacher": args.teacher, "negatives": args.negatives, "num_negatives": args.num_negatives,
             **sparsity.kept(encoder, zeros)}
    save(encoder, out / "model", stage=stage, overwrite=True)
    summary = {**stage, "model": str(args.model), "output": str(out / "model"), "wall_s": round(wall, 1),
               "train_s": round(stats["train_s"], 1), "tokens": int(stats["tokens"]),
               "tokens_per_s": round(stats["tokens"] / max(stats["train_s"], 1e-9), 1),
               "final_loss": stats["last_loss"], "final_doc_cos": stats.get("final_doc_cos"),
               "collapsed": stats["collapsed_steps"] >= COLLAPSE_STEPS, "args": {k: getattr(args, k) for k in RUN_KEYS}}
    write_json(out / "finetune.json", summary)  # last: its presence means the run is complete
    print(f"effir finetune: {total} steps in {wall:.0f}s; model saved to {out / 'model'}")
