"""Recover a compressed retriever from its parent on unlabelled text: label-free distillation.

    effir distill STUDENT --teacher PARENT --texts wiki beir:DIR --output DIR

The student (the output of effir drop / slim, or any model) learns to embed as its parent does, in the parent's
space, from text alone. Each step takes --batch-size query-side and --batch-size document-side texts and minimises
  --embedding-weight x the distance between the student's and the parent's embeddings of the same texts, both sides
    (--embedding-loss cosine: 1 - cos; mse: squared difference per element, as sentence-transformers' MSELoss), plus
  --kl-weight x KL(parent || student) between in-batch similarity distributions: each query over the batch's
    documents, and each document over the other documents (--temperature for the student, --teacher-temperature
    for the parent); off by default, plus
  --hidden-weight x the distance between the student's and the parent's block outputs (the residual stream after
    each block, before any final norm) on the same tokens, per non-pad token, averaged over tokens and blocks
    (--hidden-loss cosine: 1 - cos; nmse: |s - t|^2 / |t|^2); off by default. effir's cuts keep every block and the
    residual width, so block i of the student has block i of the parent as its counterpart; the parent must have
    the student's depth, width and tokenizer, and runs (frozen, no gradients) on every micro-batch beside it.
With a parent of another embedding size, train on the similarity KL alone (--embedding-weight 0 --kl-weight 1).
The parent's embeddings of every text are computed once and cached as effir eval caches a corpus (row count,
dimension and sha256 checked), so a step costs only the student's passes, and a second run on the same texts none.

Texts (--texts, one or more sources, no labels): wiki (built-in prose), FILE.txt, FILE.jsonl,
beir:DIR[:corpus|queries|both]. Documents longer than --passage-words words are cut into passages of whole
sentences. Query-side texts are the sources' queries; a source without queries (wiki, a file, a BEIR corpus) gives
one sentence of each of its passages instead.

--query-side compresses the query encoder only: the student learns the parent's query embeddings (and, with
--kl-weight, each query's similarities over the parent's document embeddings; with --hidden-weight, its block outputs
on the queries) and never embeds a document, and DIR/model becomes a query-side folder (effir.asymmetric): queries
through the student, documents through the parent unchanged, so an index the parent built stays valid and `effir
eval` reuses the parent's cached corpus embeddings.

LoRA by default (--full: every weight), resumable after a kill (--save-every; run the same command again), several
processes under torchrun / accelerate launch as effir finetune (documents are gathered across processes for the
in-batch distributions). Writes DIR/model, DIR/distill_log.jsonl and DIR/distill.json (last: the run is complete).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .. import asymmetric, embedding_cache, options, sparsity, train_checkpoints, training
from ..calibration import SOURCE_HELP
from ..checkpoint import fingerprint, load, outline, save
from ..distillation import Loss, Texts, micro_batches, read_texts
from ..encoder import Encoder
from ..files import cache_dir, write_json
from ..losses import EMBEDDING_LOSSES, HIDDEN_LOSSES
from ..refs import check_refs
from ..utils import (
    DTYPE_CHOICES,
    EffirError,
    check_device,
    check_output_dir,
    dtype_name,
    finite_float,
    from_main_process,
    seed_everything,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the student: a model folder (e.g. the output of effir drop / slim), built-in name, "
                                 ".gguf or hub id")
    p.add_argument("--teacher", required=True, help="the parent retriever whose embeddings the student learns")
    p.add_argument("--texts", required=True, nargs="+", metavar="SOURCE",
                   help=f"unlabelled text, one or more sources (space- or comma-separated): {SOURCE_HELP}")
    p.add_argument("--output", required=True, help="run folder: model/, distill.json, distill_log.jsonl")
    p.add_argument("--max-texts", type=int, default=None,
                   help="at most this many texts per side (a seeded sample; default: all)")
    p.add_argument("--query-side", action="store_true",
                   help="compress the query encoder only: train on query-side texts and save a query-side folder "
                        "whose documents the parent embeds, so its existing index stays valid")
    p.add_argument("--passage-words", type=int, default=200,
                   help="cut longer documents into passages of about this many words (default: 200)")
    options.add_lengths(p, who=", for student and parent")
    g = p.add_argument_group("loss")
    g.add_argument("--embedding-loss", choices=EMBEDDING_LOSSES, default="cosine",
                   help="distance between the student's and the parent's embeddings: 1 - cos, or squared difference "
                        "per element (default: cosine)")
    g.add_argument("--embedding-weight", type=finite_float, default=1.0,
                   help="weight of the embedding distance (needs the parent's embedding size; 0: similarities only)")
    g.add_argument("--kl-weight", type=finite_float, default=0.0,
                   help="weight of the in-batch similarity KL (default 0: at 1 it recovered less than the embedding "
                        "distance alone, docs/results/minilm-distill-cpu.md)")
    g.add_argument("--hidden-weight", type=finite_float, default=0.0,
                   help="weight of the block-output distance: each block's output of the student against the "
                        "parent's on the same tokens (needs the parent's depth, width and tokenizer; the parent then "
                        "runs beside the student every step; default 0: off, docs/results/hidden-distill-cpu.md)")
    g.add_argument("--hidden-loss", choices=HIDDEN_LOSSES, default="cosine",
                   help="block-output distance per token: cosine = 1 - cos, or nmse = |s - t|^2 / |t|^2 (relative to "
                        "the parent's norm there) (default: cosine, docs/results/hidden-distill-cpu.md)")
    g.add_argument("--temperature", type=finite_float, default=0.05, help="student temperature of the similarity KL")
    g.add_argument("--teacher-temperature", type=finite_float, default=None,
                   help="parent temperature (default: --temperature)")
    g = p.add_argument_group("optimisation")
    options.add_lora(g)
    options.add_steps(g, lr_help="AdamW lr", batch_size=32,
                      batch_help="query-side and document-side texts per process per micro-batch")
    options.add_schedule(g, epochs_help="passes over the document-side texts (query-side ones with --query-side)")
    g = p.add_argument_group("run")
    g.add_argument("--teacher-dtype", default="auto", choices=DTYPE_CHOICES,
                   help="dtype the parent computes its embeddings in (default: auto)")
    g.add_argument("--encode-batch-size", type=int, default=64, help="batch for the parent's embeddings")
    options.add_run(g, save_every=0)
    options.add_training_device(g)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    sources = [s for arg in args.texts for s in arg.split(",") if s]  # effir run passes a list joined by commas
    texts = read_texts(sources, args.passage_words, args.max_texts, args.seed)  # before any output or model
    return training.run_with_accelerator(args.device, args.precision, lambda acc: _run(args, acc, texts))


def _run(args, acc, texts: Texts) -> int:
    out = Path(args.output)
    training.prepare_output(out, "distill.json", args.overwrite, acc)
    t0 = time.perf_counter()
    seed_everything(args.seed)
    student, saved_settings, save_dtype = training.load_for_training(
        args.model, acc.device, full=args.full, save_dtype=args.save_dtype,
        query_max_length=args.query_max_length, document_max_length=args.document_max_length)
    parent = _parent(args, acc, student) if args.hidden_weight else None
    targets, teacher_id = _teacher_embeddings(args, acc, texts, student, parent)
    sides = (("query", texts.queries),) if args.query_side and not args.kl_weight else (
        ("query", texts.queries), ("document", texts.documents))
    per_epoch = {side: training.steps_per_epoch(len(items), args.batch_size, acc.num_processes, args.grad_accum,
                                                f"{side}-side texts") for side, items in sides}
    total = args.max_steps or max(1, round(args.epochs * per_epoch["query" if args.query_side else "document"]))
    seed_everything(args.seed)
    zeros = sparsity.zero_masks(student)  # an N:M-pruned student keeps its zeros (before LoRA wraps the model)
    optimizer, scheduler = training.optimizer_and_schedule(student, options.typed(options.Optimisation, args), total)
    if args.full:
        sparsity.hold_zeros(student.model, student.adapter, zeros)
    key = {**{k: getattr(args, k) for k in RUN_KEYS}, "teacher": teacher_id,
           "model_fingerprint": fingerprint(student), "texts": texts.key, "processes": acc.num_processes,
           "total_steps": total}
    start = train_checkpoints.resume(out / "checkpoints", acc, student.model, optimizer, scheduler, key,
                                     log_path=out / "distill_log.jsonl", restart_on_mismatch=args.overwrite)
    model, optimizer = acc.prepare(student.model, optimizer)
    student.model = model
    loss = Loss(args.embedding_loss, args.embedding_weight, args.kl_weight, args.temperature,
                args.teacher_temperature or args.temperature, args.hidden_weight, args.hidden_loss)
    micro_batch = micro_batches(acc, student, texts, targets, loss, batch_size=args.batch_size,
                                grad_accum=args.grad_accum, per_epoch=per_epoch, seed=args.seed,
                                query_side=args.query_side, parent=parent)

    def save_checkpoint(step: int) -> None:
        train_checkpoints.save_checkpoint(out / "checkpoints", acc, model, optimizer, scheduler, step, key,
                                 args.keep_checkpoints)

    stats = training.train_steps(acc, model, optimizer, scheduler, micro_batch, start=start, total=total,
                                 grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm,
                                 log_path=out / "distill_log.jsonl", log_fields=_logged_weights(args),
                                 save=save_checkpoint, save_every=args.save_every,
                                 desc="distill", progress=not args.no_progress)
    student.model, student.settings = acc.unwrap_model(model), saved_settings
    if acc.is_main_process:
        _finish(args, student, save_dtype, texts, out, stats, total, time.perf_counter() - t0, zeros)
    return 0


RUN_KEYS = options.run_keys(add_arguments)
"""What a checkpoint must share with this run to be resumed: every option but effir.options.NOT_RUN_KEYS (the key
holds the parent and the texts by content)."""


def _check_args(args) -> None:
    check_device(args.device)  # accelerate would otherwise train on the CPU when --device cuda finds no GPU
    check_output_dir(args.output)
    check_refs({"MODEL": args.model, "--teacher": args.teacher})
    for name in ("batch_size", "grad_accum", "lora_r", "lora_alpha", "encode_batch_size", "passage_words",
                 "query_max_length", "document_max_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise EffirError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise EffirError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.max_texts is not None and args.max_texts < 2:
        raise EffirError(f"--max-texts must be >= 2, got {args.max_texts}")
    if not args.lr > 0 or not args.temperature > 0 or not (args.teacher_temperature or 1.0) > 0:
        raise EffirError("--lr, --temperature and --teacher-temperature must be > 0")
    weights = (args.embedding_weight, args.kl_weight, args.hidden_weight)
    if min(weights) < 0 or sum(weights) <= 0:
        raise EffirError("--embedding-weight, --kl-weight and --hidden-weight must be >= 0, and not all 0")
    if args.hidden_weight:
        _check_blocks_correspond(args.model, args.teacher)


def _check_blocks_correspond(student: str, teacher: str) -> None:
    """The block-output loss compares block i of the student with block i of the parent, token by token: refuse a
    parent of another depth, residual width or tokenizer before any work (configs and tokenizers only)."""
    mine, theirs = outline(student), outline(teacher)
    if (mine.blocks, mine.width) != (theirs.blocks, theirs.width):
        raise EffirError(f"--hidden-weight: teacher {teacher} has {theirs.blocks} blocks of width {theirs.width} and "
                         f"the student {mine.blocks} of width {mine.width}; block outputs can only be compared between "
                         "models of the same depth and width: pass --hidden-weight 0")
    if mine.tokens != theirs.tokens:
        raise EffirError(f"--hidden-weight: teacher {teacher} has another tokenizer than the student; block outputs "
                         "are compared token by token, so both must tokenize alike: pass --hidden-weight 0")


def _logged_weights(args) -> dict:
    """Written into every log line beside the loss terms they weigh: the block-output term's weight and kind."""
    return {"hidden_weight": args.hidden_weight, "hidden_loss": args.hidden_loss} if args.hidden_weight else {}


# -- the parent -----------------------------------------------------------------------------------------------------
def _parent(args, acc, student: Encoder) -> Encoder:
    """The parent on every process for the block-output loss: frozen, in eval mode, in --teacher-dtype, at the
    student's training lengths."""
    parent = load(args.teacher, device=str(acc.device), dtype=args.teacher_dtype,
                  query_max_length=student.settings.query_max_length,
                  document_max_length=student.settings.document_max_length)
    parent.model.requires_grad_(False)
    return parent


def _teacher_embeddings(args, acc, texts: Texts, student: Encoder,
                        parent: Encoder | None) -> tuple[dict[str, torch.Tensor], str]:
    """The parent's embeddings of every text (``{"query": (Nq, H), "document": (Nd, H)}``) at the student's training
    lengths, computed once on the main process into effir's embedding cache and read from there by every process;
    and the parent's identity. ``parent``: the parent already loaded, else it is loaded here."""
    found = None
    if acc.is_main_process:
        found = _cache_teacher(args, texts, student, parent or _parent(args, acc, student))
    paths, teacher_id = from_main_process(found)
    acc.wait_for_everyone()
    return {side: torch.from_numpy(embedding_cache.read(path, n, dim).copy())
            for side, (path, n, dim) in paths.items()}, teacher_id


def _cache_teacher(args, texts: Texts, student: Encoder, teacher: Encoder) -> tuple[dict, str]:
    if args.query_side and teacher.dim != student.dim:
        raise EffirError(f"--query-side: teacher {args.teacher} embeds in {teacher.dim} dimensions and the student in "
                         f"{student.dim}; the student's queries are searched against the parent's document "
                         "embeddings, so both must embed in the same space")
    if args.embedding_weight and teacher.dim != student.dim:
        raise EffirError(f"teacher {args.teacher} embeds in {teacher.dim} dimensions and the student in "
                         f"{student.dim}: --embedding-weight needs the same space; pass --embedding-weight 0 to "
                         "distil the similarity distributions only")
    teacher_id = f"{fingerprint(teacher)}-{dtype_name(teacher.dtype)}"
    paths = {}
    for side, items in (("query", texts.queries), ("document", texts.documents)):
        if side == "document" and args.query_side and not args.kl_weight:
            continue  # the query-side embedding loss needs no document at all
        path = cache_dir() / "embeddings" / f"teacher-{teacher_id}-{texts.key}-{side}.npy"
        if embedding_cache.read(path, len(items), teacher.dim) is None:
            emb = teacher.encode(items, side, args.encode_batch_size, show_progress=not args.no_progress,
                                 desc=f"parent: {side} texts")
            embedding_cache.write(path, emb.numpy())
        paths[side] = (path, len(items), teacher.dim)
    return paths, teacher_id


def _finish(args, student: Encoder, save_dtype: torch.dtype, texts: Texts, out: Path, stats: dict, total: int,
            wall: float, zeros: dict | None) -> None:
    student.model = training.finished_model(student.model, lora=not args.full,
                                            gradient_checkpointing=args.gradient_checkpointing, dtype=save_dtype)
    stage = {"stage": "distill", "teacher": str(args.teacher), "texts": list(args.texts), "steps": total,
             "method": "full" if args.full else f"lora(r={args.lora_r},alpha={args.lora_alpha})", "lr": args.lr,
             "query_texts": len(texts.queries), "document_texts": len(texts.documents),
             "hidden_weight": args.hidden_weight, **({"hidden_loss": args.hidden_loss} if args.hidden_weight else {}),
             **sparsity.kept(student, zeros)}
    if args.query_side:  # the parent as it embeds documents: as stored, with its own settings
        parent = load(args.teacher, device="cpu", dtype="source")
        asymmetric.save(student, parent, out / "model", stage={**stage, "query_side": True}, overwrite=True)
    else:
        save(student, out / "model", stage=stage, overwrite=True)
    summary = {**stage, "model": str(args.model), "output": str(out / "model"), "wall_s": round(wall, 1),
               "train_s": round(stats["train_s"], 1), "tokens": int(stats["tokens"]),
               "final_loss": stats["last_loss"], "args": {k: getattr(args, k) for k in RUN_KEYS}}
    write_json(out / "distill.json", summary)  # last: its presence means the run is complete
    used = f"{len(texts.queries)} query-side" + ("" if args.query_side and not args.kl_weight else
                                                 f" and {len(texts.documents)} document-side")
    print(f"effir distill: {total} steps in {wall:.0f}s on {used} texts; model saved to {out / 'model'}")
