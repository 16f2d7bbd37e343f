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
import os
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import fingerprint, load, save
from ..encoder import POOLINGS, Encoder
from ..losses import gather_with_grad, group_scores, info_nce, kl_distill
from ..train_data import (
    TrainExample,
    cross_encoder_scores,
    dense_teacher_scores,
    load_training_data,
    mine_bm25,
    mine_dense,
    parse_rank_range,
    random_negatives,
    write_flag_jsonl,
)
from ..utils import EffirError, cpu_supports_bf16, lr_schedule, seed_everything, write_json

KILL_ENV = "EFFIR_TEST_KILL_AT_STEP"  # tests: SIGKILL this process right after step k (a real, uncatchable kill)
COLLAPSE_COS = 0.99
"""Mean cosine between the different documents of a batch above which the embeddings count as collapsed: every
text maps to nearly the same vector and InfoNCE sits at ln(#candidates). Runs often pass close to it early on, and
a run that learns moves away (SmolLM2 on SciFact: 0.61 after 15 steps; its 15-MLP model peaks at 0.982, then
0.70-0.80); a stuck run reads 0.998 and up."""
COLLAPSE_STEPS = 5
"""Consecutive collapsed steps before the warning: a run may pass through a collapse and recover from it."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name, model folder (compressed or not), .gguf file or hub id")
    p.add_argument("--train", required=True, help="BEIR folder, Tevatron jsonl or FlagEmbedding jsonl")
    p.add_argument("--output", required=True, help="run folder: data, checkpoints, log, model/ and finetune.json")
    p.add_argument("--split", default="train", help="qrels split of a BEIR folder (default: train)")
    g = p.add_argument_group("negatives and teacher")
    g.add_argument("--negatives", default="auto", choices=["auto", "data", "bm25", "dense", "random"],
                   help="auto: the data's own negatives when it has them, else BM25 (default: auto)")
    g.add_argument("--num-negatives", type=int, default=7, help="hard negatives per query (paper: 7)")
    g.add_argument("--mine-range", default="10-100", help="ranks LO-HI (0-based, positives removed) to draw from")
    g.add_argument("--mine-model", default=None, help="dense model for --negatives dense (default: MODEL itself)")
    g.add_argument("--teacher", default=None,
                   help="'data' (scores in the jsonl), a cross-encoder folder, or a dense model (e.g. the "
                        "uncompressed parent) for the KL term")
    g.add_argument("--teacher-kind", default="auto", choices=["auto", "dense", "cross-encoder"],
                   help="auto: cross-encoder when the folder's config.json names a *ForSequenceClassification")
    g.add_argument("--kl-weight", type=float, default=None, help="KL weight (default: 1 with a teacher, else 0)")
    g.add_argument("--kl-teacher-temperature", type=float, default=None,
                   help="teacher softmax temperature (default: --temperature for a dense teacher, else 1)")
    g.add_argument("--prepare-only", action="store_true", help="stop after writing DIR/train_data.jsonl")
    g = p.add_argument_group("model and loss")
    g.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    g.add_argument("--lora-r", type=int, default=32)
    g.add_argument("--lora-alpha", type=int, default=64)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default="all",
                   help="comma-separated module names, default: all the architecture table names")
    g.add_argument("--temperature", type=float, default=0.02, help="InfoNCE temperature (paper: 0.02)")
    g.add_argument("--no-in-batch", action="store_true", help="score each query against its own candidates only")
    g.add_argument("--no-gather", action="store_true",
                   help="in-batch negatives from this process only (default: gathered from every process)")
    g.add_argument("--pooling", choices=POOLINGS, default=None, help="train (and save) with this pooling")
    g.add_argument("--query-max-length", type=int, default=None, help="training query length (default: model's)")
    g.add_argument("--document-max-length", type=int, default=None, help="training document length; the saved "
                   "model keeps its own (default: model's)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"])
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps with linear warm-up")
    g.add_argument("--batch-size", type=int, default=8, help="queries per process per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto = bf16 on CUDA (and CPUs with native bf16), else fp32")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("run")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--resume", default=None, help="checkpoint folder to resume from (default: newest in DIR)")
    g.add_argument("--encode-batch-size", type=int, default=32, help="batch for mining / teacher scoring")
    g.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="cpu forces CPU; default: accelerate gives each process its GPU (or the CPU)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a finished run, or checkpoints of other arguments, in DIR (a killed run with the "
                        "same arguments still resumes)")


def run(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    _check_args(args)
    # Without CUDA, accelerate must be told "cpu", or each launched process trains alone.
    acc = Accelerator(cpu=args.device == "cpu" or not torch.cuda.is_available(),
                      mixed_precision=_mixed_precision(args))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise EffirError(f"the launcher started {launched} processes but accelerate joined {acc.num_processes}; "
                         "check the launch command (docs/distributed.md)")
    try:
        rc = _run(args, acc)
        acc.wait_for_everyone()
        return rc
    finally:  # no barrier on errors: a failed process exits and the launcher stops the others
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(args, acc) -> int:
    out = Path(args.output)
    _prepare_output(args, out, acc)
    t0 = time.perf_counter()
    seed_everything(args.seed)
    # Full fine-tuning keeps fp32 master weights; under LoRA the frozen base may sit in bf16 on GPUs (peft keeps the
    # adapter in fp32), which halves memory for 7B backbones. On this kind of CPU "auto" is fp32 anyway.
    encoder = load(args.model, device=str(acc.device), dtype="fp32" if args.full else "auto", pooling=args.pooling)
    saved_settings = encoder.settings
    encoder.settings = replace(saved_settings,  # training lengths; the saved model keeps saved_settings
                               query_max_length=args.query_max_length or saved_settings.query_max_length,
                               document_max_length=args.document_max_length or saved_settings.document_max_length)
    model_fp = fingerprint(encoder)
    examples, teacher_t = _training_data(args, encoder, acc, out)
    if args.prepare_only:
        return 0
    steps_per_epoch, total = _schedule_lengths(args, len(examples), acc.num_processes)
    seed_everything(args.seed)
    trainable = _wrap_model(args, encoder)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(args.warmup_ratio, args.schedule, total))
    key = _run_key(args, acc.num_processes, model_fp, out / "train_data.jsonl", total)
    start = _resume(args, out, acc, encoder.model, optimizer, scheduler, key)
    model, optimizer = acc.prepare(encoder.model, optimizer)
    base = encoder.model
    encoder.model = model
    stats = _train(args, acc, encoder, optimizer, scheduler, examples, teacher_t, start, total, steps_per_epoch,
                   out, key)
    encoder.model = acc.unwrap_model(model)
    if acc.is_main_process:
        _finish(args, encoder, base, saved_settings, out, stats, total, time.perf_counter() - t0)
    return 0


def _check_args(args) -> None:
    for name in ("num_negatives", "batch_size", "grad_accum", "lora_r", "lora_alpha", "encode_batch_size"):
        if getattr(args, name) < (0 if name == "num_negatives" else 1):
            raise EffirError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature <= 0 or args.lr <= 0:
        raise EffirError("--temperature and --lr must be > 0")
    if args.max_steps is not None and args.max_steps < 1:
        raise EffirError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.teacher is None and args.kl_weight:
        raise EffirError("--kl-weight needs a --teacher (data, a cross-encoder or a dense model)")
    parse_rank_range(args.mine_range)


def _mixed_precision(args) -> str:
    if args.precision == "auto":
        if torch.cuda.is_available() and args.device != "cpu":
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        return "bf16" if cpu_supports_bf16() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[args.precision]


def _prepare_output(args, out: Path, acc) -> None:
    if acc.is_main_process:
        if out.exists() and not out.is_dir():
            raise EffirError(f"--output {out} exists and is not a folder")
        if args.overwrite and (out / "finetune.json").exists():
            shutil.rmtree(out)  # a finished run; an unfinished one is resumed, or replaced in _resume
        if (out / "finetune.json").exists():
            raise EffirError(f"{out} already holds a finished fine-tune ({out / 'model'}); pass --overwrite to "
                             "train again or choose another --output")
        out.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()


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
    short = sum(len(ex.neg) < args.num_negatives for ex in examples)
    if short:
        raise EffirError(f"{short} training queries have fewer than --num-negatives {args.num_negatives} negatives "
                         "(the corpus is too small); lower --num-negatives")
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
        teacher = load(args.teacher, device=str(encoder.device))
        if teacher.tokenizer.get_vocab() != encoder.tokenizer.get_vocab():
            raise EffirError(f"teacher {args.teacher} uses another tokenizer than {args.model}; a dense teacher must "
                             "be the student's uncompressed parent (same tokenizer); for any other model pass a "
                             "cross-encoder with --teacher-kind cross-encoder")
        teacher.settings = encoder.settings
    examples, corpus = load_training_data(args.train, args.split)
    lo_hi, n, show = parse_rank_range(args.mine_range), args.num_negatives, not args.no_progress
    how = args.negatives
    if how == "auto":
        how = "data" if all(len(ex.neg) >= n for ex in examples) else "bm25"
    if how == "bm25":
        mine_bm25(examples, corpus, lo_hi, n, seed=args.seed)
    elif how == "dense":
        miner = encoder if args.mine_model is None else load(args.mine_model, device=str(encoder.device))
        mine_dense(examples, corpus, miner, lo_hi, n, args.seed, args.encode_batch_size, show)
    random_negatives(examples, corpus, n, seed=args.seed)  # tops up short lists ("random": all of them)
    if teacher is not None:
        dense_teacher_scores(examples, teacher, args.encode_batch_size, show)
    elif kind == "cross-encoder":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.teacher)
        ce = AutoModelForSequenceClassification.from_pretrained(args.teacher).to(encoder.device)
        cross_encoder_scores(examples, ce, tok, args.encode_batch_size, show_progress=show)
    return examples


# -- model ----------------------------------------------------------------------------------------------------------
def _wrap_model(args, encoder: Encoder) -> list[torch.nn.Parameter]:
    model = encoder.model
    model.train()
    if args.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.full:
        for p in model.parameters():
            p.requires_grad_(True)
        return [p for p in model.parameters()]
    from peft import LoraConfig, get_peft_model

    targets = _lora_targets(args, encoder)
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, bias="none")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        encoder.model = get_peft_model(model, config)
    encoder.model.train()
    return [p for p in encoder.model.parameters() if p.requires_grad]


def _lora_targets(args, encoder: Encoder) -> list[str]:
    names = [n for n, _ in encoder.model.named_modules()]
    table = list(encoder.adapter.lora_targets)

    def present(t):
        return any(n == t or n.endswith("." + t) for n in names)

    if args.lora_targets == "all":
        targets = [t for t in table if present(t)]
        if not targets:
            raise EffirError(f"none of the LoRA targets {table} of the architecture table is in the model; use --full")
        return targets
    wanted = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    missing = [t for t in wanted if not present(t)]
    if missing or not wanted:
        raise EffirError(f"LoRA target(s) {missing or wanted} not in the model; the architecture table "
                         f"({encoder.adapter.family}) names: {','.join(table)}")
    return wanted


def _schedule_lengths(args, n: int, world: int) -> tuple[int, int]:
    per_step = args.batch_size * world * args.grad_accum
    steps_per_epoch = n // per_step
    if steps_per_epoch < 1:
        raise EffirError(f"{n} training queries are fewer than one step's {per_step} (--batch-size x processes x "
                         "--grad-accum); lower --batch-size or --grad-accum")
    total = args.max_steps or max(1, int(round(args.epochs * steps_per_epoch)))
    return steps_per_epoch, total


# -- checkpoints ----------------------------------------------------------------------------------------------------
RUN_KEYS = ("train", "split", "negatives", "num_negatives", "mine_range", "mine_model", "teacher", "teacher_kind",
            "kl_weight", "kl_teacher_temperature", "full", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
            "temperature", "no_in_batch", "no_gather", "pooling", "query_max_length", "document_max_length", "lr",
            "weight_decay", "schedule", "warmup_ratio", "batch_size", "grad_accum", "epochs", "max_steps",
            "max_grad_norm", "precision", "seed")


def _run_key(args, world: int, model_fp: str, data_path: Path, total: int) -> dict:
    key = {k: getattr(args, k) for k in RUN_KEYS}
    key.update(model=str(args.model), model_fingerprint=model_fp, processes=world, total_steps=total,
               data_sha256=hashlib.sha256(data_path.read_bytes()).hexdigest()[:16])
    return key


def _ckpt_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    done = [d for d in root.glob("step-*") if (d / "state.json").exists() and "tmp" not in d.name]
    return sorted(done, key=lambda d: int(d.name.split("-")[1]))


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _resume(args, out: Path, acc, model, optimizer, scheduler, key: dict) -> int:
    ckpt = Path(args.resume) if args.resume else (_ckpt_dirs(out) or [None])[-1]
    if ckpt is None:
        if acc.is_main_process:
            (out / "train_log.jsonl").unlink(missing_ok=True)  # a run that never checkpointed starts over
        return 0
    if not (ckpt / "state.json").exists():
        raise EffirError(f"--resume {ckpt} is not a finished effir checkpoint (no state.json)")
    state = json.loads((ckpt / "state.json").read_text())
    diff = [k for k in sorted(set(key) | set(state["key"])) if key.get(k) != state["key"].get(k)]
    if diff and args.overwrite and not args.resume:
        if acc.is_main_process:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            (out / "train_log.jsonl").unlink(missing_ok=True)
        acc.wait_for_everyone()
        return 0
    if diff:
        shown = ", ".join(f"{k}: {state['key'].get(k)!r} -> {key.get(k)!r}" for k in diff[:4])
        raise EffirError(f"checkpoint {ckpt} belongs to another run ({shown}); use the same arguments, or "
                         "--overwrite / another --output to start a new run")
    weights = torch.load(ckpt / "trainable.pt", map_location="cpu")
    missing = set(_trainable_state(model)) ^ set(weights)
    if missing:
        raise EffirError(f"checkpoint {ckpt} does not match the model's trainable parameters ({len(missing)} differ)")
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu"))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu"))
    if (ckpt / "scaler.pt").exists() and getattr(acc, "scaler", None) is not None:
        acc.scaler.load_state_dict(torch.load(ckpt / "scaler.pt"))
    rng = torch.load(ckpt / f"rng-{acc.process_index}.pt", map_location="cpu", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    step = int(state["step"])
    if acc.is_main_process:
        _truncate_log(out / "train_log.jsonl", step)
    return step


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint (a killed run may have logged steps it never checkpointed)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _save_checkpoint(out: Path, acc, model, optimizer, scheduler, step: int, key: dict, keep: int) -> None:
    """Atomically write DIR/checkpoints/step-N: trainable weights, optimizer, scheduler, every process's RNG."""
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, tmp / f"rng-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        torch.save(_trainable_state(acc.unwrap_model(model)), tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if getattr(acc, "scaler", None) is not None:  # fp16 loss scaling
            torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "key": key}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _ckpt_dirs(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


# -- training loop --------------------------------------------------------------------------------------------------
def _batch(examples, step, micro, args, acc, steps_per_epoch, perms: dict):
    """This process's examples for (step, micro): a seeded permutation per epoch, sliced by rank."""
    epoch, within = divmod(step, steps_per_epoch)
    if epoch not in perms:
        perms.clear()
        perms[epoch] = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed + epoch))
    b, world = args.batch_size, acc.num_processes
    start = ((within * args.grad_accum + micro) * world + acc.process_index) * b
    return epoch, perms[epoch][start:start + b].tolist()


def _group(ex: TrainExample, n: int, rng: random.Random) -> tuple[list[str], list[float] | None]:
    """1 positive + n negatives (positive first), chosen by a per-(seed, epoch, example) RNG, with their scores."""
    p = rng.randrange(len(ex.pos))
    negs = sorted(rng.sample(range(len(ex.neg)), n))
    texts = [ex.pos[p]] + [ex.neg[i] for i in negs]
    scores = None if ex.pos_scores is None else [ex.pos_scores[p]] + [ex.neg_scores[i] for i in negs]
    return texts, scores


def _micro_step(args, acc, encoder: Encoder, examples, idx, epoch, teacher_t) -> tuple[torch.Tensor, dict]:
    g = args.num_negatives + 1
    groups = [_group(examples[i], args.num_negatives, random.Random(f"{args.seed}-{epoch}-{i}")) for i in idx]
    q_batch = encoder.tokenize([examples[i].query for i in idx], "query")
    d_batch = encoder.tokenize([t for texts, _ in groups for t in texts], "document")
    q_batch = {k: v.to(acc.device) for k, v in q_batch.items()}
    d_batch = {k: v.to(acc.device) for k, v in d_batch.items()}
    with acc.autocast():
        q = encoder.embed(**q_batch)  # (b, H)
        d = encoder.embed(**d_batch)  # (b * G, H)
    if args.no_gather:
        d_all, offset = d.float(), 0  # (b * G, H)
    else:
        d_all = gather_with_grad(d.float().contiguous())  # (world * b * G, H)
        offset = acc.process_index * len(idx)
    nce = info_nce(q.float(), d_all, g, args.temperature, in_batch=not args.no_in_batch, query_offset=offset)
    loss, parts = nce, {"info_nce": nce.detach()}
    weight = args.kl_weight if args.kl_weight is not None else (1.0 if args.teacher else 0.0)
    if weight:
        teacher = torch.tensor([s for _, s in groups], device=q.device)  # (b, G)
        kl = kl_distill(group_scores(q.float(), d.float(), g), teacher, args.temperature, teacher_t)
        loss = loss + weight * kl
        parts["kl"] = kl.detach()
    tokens = int(q_batch["attention_mask"].sum() + d_batch["attention_mask"].sum())
    parts["doc_cos"] = mean_pairwise_cosine(d.detach())
    return loss, {**parts, "tokens": torch.tensor(float(tokens), device=acc.device)}


def mean_pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine over all pairs of different rows of ``x`` ``(N, H)``: 1 means every row points the same way."""
    n = x.shape[0]
    if n < 2:
        return torch.tensor(0.0, device=x.device)
    u = torch.nn.functional.normalize(x.float(), dim=-1)
    total = u.sum(0).pow(2).sum() - n  # sum over i != j of u_i . u_j, without the (N, N) matrix
    return total / (n * (n - 1))


def _train(args, acc, encoder, optimizer, scheduler, examples, teacher_t, start, total, steps_per_epoch, out, key):
    from tqdm.auto import tqdm

    model = encoder.model
    model.train()
    kill_at = int(os.environ.get(KILL_ENV, "0"))
    log_path = out / "train_log.jsonl"
    bar = tqdm(total=total, initial=start, desc="finetune", unit="step",
               disable=args.no_progress or not acc.is_main_process)
    perms: dict = {}
    stats = {"tokens": 0.0, "train_s": 0.0, "last_loss": None, "collapsed_steps": 0, "collapse_warned": False}
    for step in range(start, total):
        t = time.perf_counter()
        sums: dict[str, float] = {}
        for micro in range(args.grad_accum):
            epoch, idx = _batch(examples, step, micro, args, acc, steps_per_epoch, perms)
            sync = micro == args.grad_accum - 1
            with (acc.no_sync(model) if not sync and acc.num_processes > 1 else _null()):
                loss, parts = _micro_step(args, acc, encoder, examples, idx, epoch, teacher_t)
                acc.backward(loss / args.grad_accum)
            parts["loss"] = loss.detach()
            for name, value in parts.items():
                reduced = acc.reduce(value.float(), "sum" if name == "tokens" else "mean")
                sums[name] = sums.get(name, 0.0) + float(reduced) / (1 if name == "tokens" else args.grad_accum)
        if args.max_grad_norm:
            acc.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        stats["tokens"] += sums["tokens"]
        stats["train_s"] += dt
        stats["last_loss"] = sums["loss"]
        record = {"step": step + 1, "loss": sums["loss"], "info_nce": sums["info_nce"], "kl": sums.get("kl"),
                  "doc_cos": round(sums["doc_cos"], 5), "lr": lr, "tokens": int(sums["tokens"]),
                  "tokens_per_s": round(sums["tokens"] / dt, 1), "epoch": epoch}
        _watch_collapse(stats, record, args, acc.is_main_process)
        if acc.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{sums['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            _save_checkpoint(out, acc, model, optimizer, scheduler, step + 1, key, args.keep_checkpoints)
        if kill_at and step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    return stats


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


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _finish(args, encoder: Encoder, base, settings, out: Path, stats, total: int, wall: float) -> None:
    model = encoder.model
    if not args.full:
        model = model.merge_and_unload()
    if args.gradient_checkpointing:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    encoder.model, encoder.settings = model, settings
    stage = {"stage": "finetune", "train": str(args.train), "steps": total,
             "method": "full" if args.full else f"lora(r={args.lora_r},alpha={args.lora_alpha})", "lr": args.lr,
             "teacher": args.teacher, "negatives": args.negatives, "num_negatives": args.num_negatives}
    save(encoder, out / "model", stage=stage, overwrite=True)
    summary = {**stage, "model": str(args.model), "output": str(out / "model"), "wall_s": round(wall, 1),
               "train_s": round(stats["train_s"], 1), "tokens": int(stats["tokens"]),
               "tokens_per_s": round(stats["tokens"] / max(stats["train_s"], 1e-9), 1),
               "final_loss": stats["last_loss"], "final_doc_cos": stats.get("final_doc_cos"),
               "collapsed": stats["collapsed_steps"] >= COLLAPSE_STEPS, "args": {k: getattr(args, k) for k in RUN_KEYS}}
    write_json(out / "finetune.json", summary)  # last: its presence means the run is complete
    print(f"effir finetune: {total} steps in {wall:.0f}s; model saved to {out / 'model'}")
