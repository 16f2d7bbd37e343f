"""Training phases of `effir slim`: learned MLP gates (phase "gates") and recovery of the masked model (phase
"recover"), on labelled data (InfoNCE, effir.training) or, for the gates, on the unslimmed model's own embeddings of
unlabelled text (effir.distillation). Slim passes its options as :class:`GateOptions` and :class:`LoopOptions`
(``effir slim -h`` explains each).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from . import distillation, train_checkpoints, training
from .gates import MlpGates, SettledRanking, TargetSparsityAdam, closed_fraction, global_keep_masks
from .utils import lr_schedule

TARGET_GATE_LR = 0.05  # a gate crosses from 1 to 0 in about 20 Adam steps (faster for budgets under 50 steps)
PAPER_GATE_LR = 1e-2


GATES_MODULE = "effir_gates"
"""Name under which the gates sit inside the model while they train, so DDP syncs their gradients and the
training checkpoints hold them."""


@dataclass(frozen=True)
class GateOptions:
    """What the gates learn towards and how fast: the ``effir slim`` options of the same names."""

    ratio: float
    width_multiple: int
    gate_steps: int
    gate_lr: float | None
    lam: float | None
    beta: float
    no_early_stop: bool
    gates_with_lora: bool
    lr: float


@dataclass(frozen=True)
class LoopOptions:
    """How each phase steps and keeps its checkpoints: the ``effir slim`` options of the same names."""

    batch_size: int
    grad_accum: int
    num_negatives: int
    temperature: float
    seed: int
    save_every: int
    overwrite: bool
    no_progress: bool


@dataclass(frozen=True)
class ParentTargets:
    """Unlabelled texts (from ``source``) and the unslimmed model's embeddings of them: what the gates learn from
    without --train."""

    texts: distillation.Texts
    embeddings: dict
    source: str


GATE_DISTILLATION = distillation.Loss("cosine", 1.0, 0.0, 0.05, 0.05)
"""Gates without labels: the slimmed model's embeddings against the unslimmed model's (1 - cos), as effir distill."""


def parent_targets(encoder, source: str, loop: LoopOptions, steps: int) -> ParentTargets:
    """Texts of ``source`` (as many as ``steps`` gate steps use, at most 4096 a side) and the model's own embeddings
    of them, taken before any gate exists: the parent the gates are trained to stay close to."""
    wanted = min(4096, loop.batch_size * loop.grad_accum * steps)
    texts = distillation.read_texts([source], 200, max(2, wanted), loop.seed)
    with torch.no_grad():
        embeddings = {side: encoder.encode(items, side, batch_size=32) for side, items in
                      (("query", texts.queries), ("document", texts.documents))}
    return ParentTargets(texts, embeddings, source)


def train_gates(how: GateOptions, loop: LoopOptions, acc, encoder, examples, gates: MlpGates, lora_params, protect,
                out: Path, key: dict, offset: list[torch.Tensor] | None = None):
    """Phase "gates": train z (and LoRA under --gates-with-lora), then rank z (+ the prior ``offset``, target-driven
    gates only) globally into keep masks.
    Returns (z, masks, what gate training did: steps run, where the cut settled, the closed fraction)."""
    base, paper = encoder.model, how.lam is not None
    base.add_module(GATES_MODULE, gates)
    set_trainable(gates.z, True)
    set_trainable(lora_params, how.gates_with_lora)
    # target-driven: fast enough to close within the budget after the task has ordered the gates
    lr = how.gate_lr or (PAPER_GATE_LR if paper else min(0.1, max(TARGET_GATE_LR, 2.5 / how.gate_steps)))
    groups = [{"params": list(gates.z), "lr": lr} | ({} if paper else {"target": how.ratio})]
    if how.gates_with_lora:
        groups.append({"params": lora_params, "lr": how.lr})

    def cut(optimizer) -> list[torch.Tensor]:
        if paper:
            return global_keep_masks([v.detach().cpu() for v in gates.z], how.ratio, how.width_multiple, protect)
        return global_keep_masks([r.cpu() for r in optimizer.ranking_scores()], how.ratio, how.width_multiple, protect,
                                 secondary=optimizer.importance())

    def stop_rule(optimizer):
        if paper or how.no_early_stop:
            return None
        rule = SettledRanking(lambda: optimizer.gate_group)
        return lambda step: rule.settled(step, lambda: ([v.detach().cpu() for v in gates.z],
                                                        ~torch.cat(cut(optimizer))))

    optimizer = run_phase(loop, acc, encoder, examples, "gates", groups, how.gate_steps, out, key,
                          penalty=(lambda: how.lam * gates.penalty(how.beta)) if paper else None,
                          optimizer_class=torch.optim.Adam if paper else partial(
                              TargetSparsityAdam, protect=protect, ramp_steps=max(5, round(0.4 * how.gate_steps)),
                              offset=offset),
                          stop_rule=stop_rule)
    delattr(base, GATES_MODULE)
    set_trainable(gates.z, False)
    z = [v.detach().cpu().clone() for v in gates.z]
    settled = optimizer.param_groups[0].get("settled_at")
    ran = int(optimizer.state[gates.z[0]]["step"]) if "step" in optimizer.state[gates.z[0]] else 0
    info = {"gate_steps_run": ran, "settled_at": settled, "closed_gate_fraction": round(closed_fraction(z), 4)}
    if acc.is_main_process:
        print(f"effir slim: gates: {closed_fraction(z):.1%} closed (target {how.ratio:.0%})"
              + (f"; the cut settled after {settled} steps" if settled else ""), flush=True)
        if paper and closed_fraction(z) > how.ratio:
            print(f"effir slim: warning: {closed_fraction(z):.0%} of the gates closed, more than --ratio "
                  f"{how.ratio}: the cut among them follows z below zero, not the task (lower --lam or --gate-steps, "
                  "or leave --lam out)", file=sys.stderr, flush=True)
    return z, cut(optimizer), info


def set_trainable(params, on: bool) -> None:
    for p in params:
        p.requires_grad_(on)


def run_phase(loop: LoopOptions, acc, encoder, examples, phase: str, groups: list[dict], steps: int, out: Path,
              key: dict, penalty, optimizer_class=torch.optim.Adam, stop_rule=None):
    """InfoNCE, or distillation towards ``examples`` when they are :class:`ParentTargets` (+ ``penalty()``), on the
    parameter ``groups`` for at most ``steps`` steps, with effir finetune's loop:
    several processes, gradient accumulation, autocast; checkpoints in DIR/checkpoints/PHASE, the last one after the
    final step (a phase that finished is skipped on resume, its weights restored). ``stop_rule(optimizer)`` may give
    a ``stop(step)`` that ends the phase early. Returns the optimizer."""
    optimizer = raw = optimizer_class(groups)
    # recovery fine-tunes a damaged model: warm up, decay and clip as effir finetune does; gate training keeps the
    # paper's plain Adam
    factor = lr_schedule(0.1, "linear", steps) if phase == "recover" else (lambda _step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    root, log_path, key = out / "checkpoints" / phase, out / "slim_log.jsonl", {**key, "phase": phase}
    start = train_checkpoints.resume(root, acc, encoder.model, optimizer, scheduler, key, log_path=log_path,
                                     log_match={"phase": phase}, restart_on_mismatch=loop.overwrite)
    stop = stop_rule(raw) if stop_rule is not None else None
    if start >= steps or raw.param_groups[0].get("settled_at"):  # finished, or stopped early, before a kill
        return raw
    if start and acc.is_main_process:
        print(f"effir slim: resuming {phase} at step {start}")
    if isinstance(examples, ParentTargets):  # gates that see the parent: distillation, no labels
        per_epoch = {side: training.steps_per_epoch(len(items), loop.batch_size, acc.num_processes, loop.grad_accum,
                                                    f"{side}-side texts of {examples.source}")
                     for side, items in (("query", examples.texts.queries), ("document", examples.texts.documents))}
    else:
        per_epoch = training.steps_per_epoch(len(examples), loop.batch_size, acc.num_processes, loop.grad_accum)
    model, optimizer = acc.prepare(encoder.model, optimizer)
    encoder.model = model
    if isinstance(examples, ParentTargets):
        micro_batch = distillation.micro_batches(acc, encoder, examples.texts, examples.embeddings, GATE_DISTILLATION,
                                                 batch_size=loop.batch_size, grad_accum=loop.grad_accum,
                                                 per_epoch=per_epoch, seed=loop.seed, penalty=penalty)
    else:
        spec = training.Contrastive(loop.num_negatives, loop.temperature, loop.seed)
        micro_batch = training.contrastive_micro_batches(acc, encoder, examples, spec, batch_size=loop.batch_size,
                                                         grad_accum=loop.grad_accum, per_epoch=per_epoch,
                                                         penalty=penalty)

    def save(step: int) -> None:
        train_checkpoints.save_checkpoint(root, acc, model, optimizer, scheduler, step, key, keep=1)

    training.train_steps(acc, model, optimizer, scheduler, micro_batch, start=start, total=steps,
                         grad_accum=loop.grad_accum, max_grad_norm=1.0 if phase == "recover" else None,
                         log_path=log_path, log_fields={"phase": phase}, save=save, save_every=loop.save_every,
                         save_last=True, desc=f"slim: {phase}", progress=not loop.no_progress, stop=stop,
                         on_record=controller_fields(raw))
    encoder.model = acc.unwrap_model(model)
    return raw


def controller_fields(optimizer):
    """Adds the gate controller's weight and closed fraction to each log record (target-driven gates only)."""
    group = optimizer.param_groups[0]
    if "target" not in group:
        return None
    return lambda record: record.update(lam=group["lam"], closed=round(group["closed"], 4))
