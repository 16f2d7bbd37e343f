"""The training machinery ``effir finetune``, ``effir slim`` and ``effir distill`` share: accelerate set-up, LoRA and
activation checkpointing, the data order, the contrastive loss of one micro-batch, and the step loop, whose
resumable checkpoints are :mod:`effir.train_checkpoints`.

One loop for every stage, so slim's gate training and recovery scale as fine-tuning does: several processes
(torchrun / accelerate launch; DDP syncs the gradients, documents are gathered for in-batch negatives), bf16
autocast on GPUs, gradient accumulation, activation checkpointing, and a kill at any moment resumes exactly. Data
order is a function of ``(seed, epoch, step, micro-batch, rank)``, not of a sampler's state, so a resumed run sees
the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .encoder import Encoder
from .losses import gather_with_grad, group_scores, info_nce, kl_distill
from .options import Optimisation
from .train_data import TrainExample
from .utils import EffirError, cpu_supports_bf16, lr_schedule

KILL_ENV = "EFFIR_TEST_KILL_AT_STEP"  # tests: SIGKILL this process right after step k (a real, uncatchable kill)


# -- set-up ---------------------------------------------------------------------------------------------------------
def accelerator(device: str | None, precision: str):
    """An ``accelerate.Accelerator`` for this process: CPU when asked or without CUDA, else this process's GPU.

    Raises:
        EffirError: the launcher started more processes than accelerate joined (each would train alone).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one precision per process and refuses another; a library user (or the test suite) runs several
    # stages in one process, so this stage's settings replace the last one's (the process group is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    # Without CUDA, accelerate must be told "cpu", or each launched process trains alone.
    acc = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available(),
                      mixed_precision=mixed_precision(precision, device))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise EffirError(f"the launcher started {launched} processes but accelerate joined {acc.num_processes}; "
                         "check the launch command (docs/distributed.md)")
    return acc


def mixed_precision(precision: str, device: str | None) -> str:
    """accelerate's ``mixed_precision`` for ``--precision``: auto is bf16 on CUDA and on CPUs with native bf16."""
    if precision == "auto":
        if torch.cuda.is_available() and device != "cpu":
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        return "bf16" if cpu_supports_bf16() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def run_with_accelerator(device: str | None, precision: str, body: Callable[[object], int]) -> int:
    """``body(acc)`` with this process's Accelerator, then a barrier; the process group is always torn down (no
    barrier on errors: a failed process exits and the launcher stops the others)."""
    acc = accelerator(device, precision)
    try:
        rc = body(acc)
        acc.wait_for_everyone()
        return rc
    finally:
        end_distributed()


def prepare_output(out: Path, marker: str, overwrite: bool, acc) -> None:
    """Create the run folder ``out`` on the main process; a finished run (``out/marker`` exists) is an error unless
    ``overwrite``, which removes it (an unfinished run is kept: it resumes). Every process waits for it."""
    if acc.is_main_process:
        if out.exists() and not out.is_dir():
            raise EffirError(f"--output {out} exists and is not a folder")
        if overwrite and (out / marker).exists():
            shutil.rmtree(out)
        if (out / marker).exists():
            raise EffirError(f"{out} already holds a finished run ({out / marker}); pass --overwrite to run again "
                             "or choose another --output")
        out.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()


def end_distributed() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def load_for_training(ref: str, device, *, full: bool, save_dtype: str, pooling: str | None = None,
                      query_max_length: int | None = None, document_max_length: int | None = None):
    """Load the model a training stage trains: fp32 master weights under ``full``, else the frozen base in
    ``save_dtype`` (a bf16 7B backbone stays bf16; peft keeps the adapter in fp32), so merging changes only what LoRA
    learned. Its settings get the training lengths given. Returns (encoder, the settings to save it with, the
    dtype to save it in)."""
    from dataclasses import replace

    from .checkpoint import load
    from .utils import floating_dtype, pick_dtype

    encoder = load(ref, device=str(device), dtype="fp32" if full else save_dtype, pooling=pooling)
    dtype = pick_dtype(save_dtype, torch.device(device), floating_dtype(encoder.meta["stored_dtype"]))
    saved = encoder.settings
    encoder.settings = replace(saved, query_max_length=query_max_length or saved.query_max_length,
                               document_max_length=document_max_length or saved.document_max_length)
    return encoder, saved, dtype


def optimizer_and_schedule(encoder: Encoder, options: Optimisation, total: int):
    """AdamW over :func:`trainable_parameters` and its lr schedule over ``total`` steps."""
    optimizer = torch.optim.AdamW(trainable_parameters(encoder, options), lr=options.lr,
                                  weight_decay=options.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(options.warmup_ratio, options.schedule,
                                                                                total))


def finished_model(model: torch.nn.Module, *, lora: bool, gradient_checkpointing: bool,
                   dtype: torch.dtype) -> torch.nn.Module:
    """The trained model as it is saved: LoRA merged, activation checkpointing off, eval mode, ``dtype``, frozen."""
    if lora:
        model = model.merge_and_unload()
    if gradient_checkpointing:
        set_activation_checkpointing(model, False)
    model.eval().to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def set_activation_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Recompute activations in the backward pass (less memory, ~30 % more time); non-reentrant, so frozen inputs
    and hooks (slim's gates) work."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()


def trainable_parameters(encoder: Encoder, options: Optimisation) -> list[torch.nn.Parameter]:
    """Put ``encoder.model`` in training mode and return what trains: every weight (``full``) or LoRA adapters."""
    encoder.model.train()
    if options.gradient_checkpointing:
        set_activation_checkpointing(encoder.model, True)
    if options.full:
        for p in encoder.model.parameters():
            p.requires_grad_(True)
        return list(encoder.model.parameters())
    return add_lora(encoder, options.lora_r, options.lora_alpha, options.lora_dropout, options.lora_targets)


def add_lora(encoder: Encoder, r: int, alpha: int, dropout: float = 0.0, targets: str = "all") -> list[torch.nn.Parameter]:
    """Wrap ``encoder.model`` in peft LoRA adapters (in place) and return the trainable parameters.

    ``targets`` is ``all`` (every name of the architecture table present in the model) or comma-separated names.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_targets(encoder, targets),
                        bias="none")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        encoder.model = get_peft_model(encoder.model, config)
    encoder.model.train()
    return [p for p in encoder.model.parameters() if p.requires_grad]


def lora_targets(encoder: Encoder, spec: str) -> list[str]:
    names = [n for n, _ in encoder.model.named_modules()]
    table = list(encoder.adapter.lora_targets)

    def present(t):
        return any(n == t or n.endswith("." + t) for n in names)

    if spec == "all":
        targets = [t for t in table if present(t)]
        if not targets:
            raise EffirError(f"none of the LoRA targets {table} of the architecture table is in the model; use --full")
        return targets
    wanted = [t.strip() for t in spec.split(",") if t.strip()]
    missing = [t for t in wanted if not present(t)]
    if missing or not wanted:
        raise EffirError(f"LoRA target(s) {missing or wanted} not in the model; the architecture table "
                         f"({encoder.adapter.family}) names: {','.join(table)}")
    return wanted


# -- data order and the loss of one micro-batch ---------------------------------------------------------------------
def steps_per_epoch(n: int, batch_size: int, world: int, grad_accum: int, what: str = "training queries") -> int:
    per_step = batch_size * world * grad_accum
    if n // per_step < 1:
        raise EffirError(f"{n} {what} are fewer than one step's {per_step} (--batch-size x processes x "
                         "--grad-accum); lower --batch-size or --grad-accum")
    return n // per_step


def batch_indices(n: int, step: int, micro: int, *, batch_size: int, grad_accum: int, world: int, rank: int,
                  per_epoch: int, seed: int, perms: dict) -> tuple[int, list[int]]:
    """This process's example indices for (step, micro): a seeded permutation per epoch, sliced by rank.
    ``perms`` caches the current epoch's permutation between calls. Returns (epoch, indices)."""
    epoch, within = divmod(step, per_epoch)
    if epoch not in perms:
        perms.clear()
        perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    start = ((within * grad_accum + micro) * world + rank) * batch_size
    return epoch, perms[epoch][start:start + batch_size].tolist()


@dataclass(frozen=True)
class Contrastive:
    """How a micro-batch is scored: InfoNCE over 1 positive + ``num_negatives`` per query (+ in-batch negatives,
    gathered from every process unless ``gather`` is off), plus ``kl_weight`` x KL towards the teacher's scores."""

    num_negatives: int
    temperature: float
    seed: int
    in_batch: bool = True
    gather: bool = True
    kl_weight: float = 0.0
    teacher_temperature: float = 1.0


def contrastive_loss(acc, encoder: Encoder, examples: list[TrainExample], idx: list[int], epoch: int,
                     spec: Contrastive) -> tuple[torch.Tensor, dict]:
    """Loss of the queries ``idx`` and their candidate groups; also returns detached parts for the log
    (``info_nce``, ``kl``, ``doc_cos``: mean cosine between the batch's documents, ``tokens``)."""
    g = spec.num_negatives + 1
    groups = [pick_group(examples[i], spec.num_negatives, random.Random(f"{spec.seed}-{epoch}-{i}")) for i in idx]
    q_batch = encoder.tokenize([examples[i].query for i in idx], "query")
    d_batch = encoder.tokenize([t for texts, _ in groups for t in texts], "document")
    q_batch = {k: v.to(acc.device) for k, v in q_batch.items()}
    d_batch = {k: v.to(acc.device) for k, v in d_batch.items()}
    with acc.autocast():
        q = encoder.embed(**q_batch)  # (b, H)
        d = encoder.embed(**d_batch)  # (b * G, H)
    if spec.gather:
        d_all = gather_with_grad(d.float().contiguous())  # (world * b * G, H)
        offset = acc.process_index * len(idx)
    else:
        d_all, offset = d.float(), 0  # (b * G, H)
    nce = info_nce(q.float(), d_all, g, spec.temperature, in_batch=spec.in_batch, query_offset=offset)
    loss, parts = nce, {"info_nce": nce.detach()}
    if spec.kl_weight:
        teacher = torch.tensor([s for _, s in groups], device=q.device)  # (b, G)
        kl = kl_distill(group_scores(q.float(), d.float(), g), teacher, spec.temperature, spec.teacher_temperature)
        loss = loss + spec.kl_weight * kl
        parts["kl"] = kl.detach()
    tokens = int(q_batch["attention_mask"].sum() + d_batch["attention_mask"].sum())
    parts["doc_cos"] = mean_pairwise_cosine(d.detach())
    return loss, {**parts, "tokens": torch.tensor(float(tokens), device=acc.device)}


MicroBatch = Callable[[int, int], tuple[torch.Tensor, dict, int]]
"""``(step, micro) -> (loss, detached parts incl. "tokens", epoch)`` for this process."""


def contrastive_micro_batches(acc, encoder: Encoder, examples: list[TrainExample], spec: Contrastive, *,
                              batch_size: int, grad_accum: int, per_epoch: int,
                              penalty: Callable[[], torch.Tensor] | None = None) -> MicroBatch:
    """The :data:`MicroBatch` of contrastive training on ``examples`` in this module's data order. ``penalty()``
    (slim's l0 term) is added to every micro-batch's loss and logged as ``penalty``."""
    perms: dict = {}

    def micro_batch(step: int, micro: int):
        epoch, idx = batch_indices(len(examples), step, micro, batch_size=batch_size, grad_accum=grad_accum,
                                   world=acc.num_processes, rank=acc.process_index, per_epoch=per_epoch,
                                   seed=spec.seed, perms=perms)
        loss, parts = contrastive_loss(acc, encoder, examples, idx, epoch, spec)
        if penalty is not None:
            extra = penalty()
            loss = loss + extra
            parts["penalty"] = extra.detach()
        return loss, parts, epoch

    return micro_batch


def pick_group(ex: TrainExample, n: int, rng: random.Random) -> tuple[list[str], list[float] | None]:
    """1 positive + n negatives (positive first), chosen by ``rng``, with their teacher scores when present."""
    p = rng.randrange(len(ex.pos))
    negs = sorted(rng.sample(range(len(ex.neg)), n))
    texts = [ex.pos[p]] + [ex.neg[i] for i in negs]
    scores = None if ex.pos_scores is None else [ex.pos_scores[p]] + [ex.neg_scores[i] for i in negs]
    return texts, scores


def mean_pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine over all pairs of different rows of ``x`` ``(N, H)``: 1 means every row points the same way."""
    n = x.shape[0]
    if n < 2:
        return torch.tensor(0.0, device=x.device)
    u = torch.nn.functional.normalize(x.float(), dim=-1)
    total = u.sum(0).pow(2).sum() - n  # sum over i != j of u_i . u_j, without the (N, N) matrix
    return total / (n * (n - 1))


# -- the loop -------------------------------------------------------------------------------------------------------
def train_steps(acc, model, optimizer, scheduler, micro_batch: MicroBatch, *, start: int, total: int, grad_accum: int,
                max_grad_norm: float | None, log_path: Path, log_fields: dict | None = None,
                on_record: Callable[[dict], None] | None = None, save: Callable[[int], None] | None = None,
                save_every: int = 0, save_last: bool = False, desc: str = "train", progress: bool = True,
                stop: Callable[[int], bool] | None = None) -> dict:
    """Optimizer steps ``start .. total - 1`` over ``grad_accum`` micro-batches each (gradients synced on the last
    one only). Appends one JSON line per step to ``log_path`` (main process; ``log_fields`` added to each), calls
    ``on_record(record)`` on every process, and ``save(step)`` every ``save_every`` steps (and after the last step
    with ``save_last``). ``stop(step)`` true after a step ends the loop there, as if it were the last one. Returns
    totals: tokens, train_s, last_loss, steps (the last step run).

    Raises:
        EffirError: the loss or the gradient norm of a step is not finite, or the weights are not when a checkpoint
            is due (the run diverged): raised before that step is applied or saved, so the checkpoints on disk are
            the last good ones and the caller writes no finished model.
    """
    from tqdm.auto import tqdm

    model.train()
    kill_at = int(os.environ.get(KILL_ENV, "0"))
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", disable=not progress or not acc.is_main_process)
    stats = {"tokens": 0.0, "train_s": 0.0, "last_loss": None, "steps": start}
    for step in range(start, total):
        t = time.perf_counter()
        sums: dict[str, float] = {}
        for micro in range(grad_accum):
            sync = micro == grad_accum - 1
            with (acc.no_sync(model) if not sync and acc.num_processes > 1 else contextlib.nullcontext()):
                loss, parts, epoch = micro_batch(step, micro)
                acc.backward(loss / grad_accum)
            parts["loss"] = loss.detach()
            for name, value in parts.items():
                reduced = acc.reduce(value.float(), "sum" if name == "tokens" else "mean")
                sums[name] = sums.get(name, 0.0) + float(reduced) / (1 if name == "tokens" else grad_accum)
        # inf max norm: measures the norm without clipping (multiplies by 1), for the divergence check
        norm = acc.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
        check_finite_step(step + 1, sums["loss"], norm, scaled=getattr(acc, "scaler", None) is not None)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        stats["tokens"] += sums["tokens"]
        stats["train_s"] += dt
        stats["last_loss"] = sums["loss"]
        record = {"step": step + 1, **{k: v for k, v in sums.items() if k not in ("tokens", "doc_cos")},
                  "doc_cos": round(sums["doc_cos"], 5), "lr": lr, "tokens": int(sums["tokens"]),
                  "tokens_per_s": round(sums["tokens"] / dt, 1), "epoch": epoch, **(log_fields or {})}
        if on_record is not None:
            on_record(record)
        if acc.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{sums['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
        last = step + 1 == total or (stop is not None and stop(step + 1))
        due = save_every and (step + 1) % save_every == 0 and not last
        if last or (save is not None and due):
            check_finite_weights(step + 1, model)  # nothing non-finite is saved, by a checkpoint or by the caller
        if save is not None and (due or (save_last and last)):
            save(step + 1)
        stats["steps"] = step + 1
        if kill_at and step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if last:
            break
    bar.close()
    return stats


def check_finite_step(step: int, loss: float, grad_norm, scaled: bool = False) -> None:
    """Stop a diverged run at ``step`` (1-based): one NaN update poisons every weight after it. ``scaled``: fp16
    loss scaling is on, where an inf gradient is expected now and then (the scaler skips that step)."""
    norm = None if grad_norm is None or scaled else float(grad_norm)
    for what, value in (("loss", loss), ("gradient norm", norm)):
        if value is not None and not math.isfinite(value):
            raise EffirError(f"training diverged at step {step}: the {what} is {value}; stopped before applying it "
                             "(earlier checkpoints are kept, no model is written); lower the learning rate (slim: "
                             "--gate-lr / --lam) and rerun with --overwrite")


def check_finite_weights(step: int, model) -> None:
    """Refuse to go on with trainable weights that are no longer finite after ``step`` (a huge but finite lr)."""
    bad = next((n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)
    if bad is not None:
        raise EffirError(f"training diverged at step {step}: weight {bad} is no longer finite; nothing of this step "
                         "was saved (earlier checkpoints are kept); lower the learning rate and rerun with --overwrite")
