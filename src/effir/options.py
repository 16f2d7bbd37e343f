"""The options the training verbs (``effir finetune``, ``distill``, ``slim``) share, each declared once, and what is
derived from them.

Each group is a function that adds its options, with their help, to a parser or an argument group; the choices
come from the constants where they are defined. :func:`run_keys` derives a stage's resume key from its options:
every option is part of it except the few in :data:`NOT_RUN_KEYS`, so a new option that changes training can never
be forgotten. :func:`typed` builds the small dataclasses components take (e.g. :class:`Optimisation`) from a
stage's parsed options, so no component reads an argparse Namespace.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TypeVar

from .encoder import POOLINGS
from .train_data import MINED_BY_MODEL, NEGATIVES
from .utils import DTYPE_CHOICES, PRECISIONS, SCHEDULES, finite_float

T = TypeVar("T")


# -- option groups --------------------------------------------------------------------------------------------------
def add_lora(g, *, full: bool = True) -> None:
    """LoRA's rank and alpha; with ``full``, also --full (every weight instead), --lora-dropout and --lora-targets."""
    if full:
        g.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    g.add_argument("--lora-r", type=int, default=32, help="LoRA rank (default: 32)")
    g.add_argument("--lora-alpha", type=int, default=64, help="LoRA alpha: adapters scale by alpha / r (default: 64)")
    if full:
        g.add_argument("--lora-dropout", type=finite_float, default=0.0, help="dropout on LoRA's input (default: 0)")
        g.add_argument("--lora-targets", default="all",
                       help="comma-separated module names (default: all the architecture table names)")


def add_steps(g, *, lr_help: str, batch_size: int, batch_help: str) -> None:
    """The step every training verb takes: its lr, batch, accumulation, autocast, activation checkpointing, seed."""
    g.add_argument("--lr", type=finite_float, default=1e-4, help=f"{lr_help} (default: 1e-4)")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"{batch_help} (default: {batch_size})")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast dtype while training; auto = bf16 on CUDA (and CPUs with native bf16), else fp32")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, more time, the same gradients "
                        "(figures in docs/results/figures-behind-defaults.md)")
    g.add_argument("--seed", type=int, default=42, help="random seed: data order, sampled texts and negatives, LoRA's init (default: 42)")


def add_schedule(g, *, epochs_help: str) -> None:
    """AdamW's decay, the lr schedule over --epochs or --max-steps, clipping and the saved dtype (finetune, distill)."""
    g.add_argument("--weight-decay", type=finite_float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--schedule", default="linear", choices=SCHEDULES, help="lr decay after warm-up (default: linear)")
    g.add_argument("--warmup-ratio", type=finite_float, default=0.1,
                   help="fraction of steps with linear warm-up (default: 0.1)")
    g.add_argument("--epochs", type=finite_float, default=1.0, help=f"{epochs_help} (default: 1)")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--max-grad-norm", type=finite_float, default=1.0, help="gradient clipping norm (default: 1)")
    g.add_argument("--save-dtype", default="source", choices=[c for c in DTYPE_CHOICES if c != "auto"],
                   help="dtype of the saved model (default: source, the dtype the input model is stored in); "
                        "LoRA's frozen base is loaded in it too, full fine-tuning keeps fp32 master weights")


def add_lengths(g, *, who: str = "") -> None:
    """The per-side token budgets while training; the saved model keeps its own."""
    g.add_argument("--query-max-length", type=int, default=None,
                   help=f"query tokens while training{who} (default: the model's)")
    g.add_argument("--document-max-length", type=int, default=None,
                   help=f"document tokens while training{who}; the saved model keeps its own (default: the model's)")


def add_train_data(p, *, required: bool, purpose: str = "") -> None:
    """The labelled training data and its qrels split."""
    p.add_argument("--train", required=required, help=f"BEIR folder, Tevatron jsonl or FlagEmbedding jsonl{purpose}")
    p.add_argument("--split", default="train", help="qrels split of a BEIR folder (default: train)")


def add_contrastive(g, *, negatives: str, num_negatives: int, miner: bool) -> None:
    """InfoNCE over each query's positive and hard negatives (finetune, slim): where the negatives come from (those
    mined by a model only with a ``miner``: an --mine-model option), how many, the temperature and the pooling."""
    choices = tuple(n for n in NEGATIVES if miner or n not in MINED_BY_MODEL)
    g.add_argument("--negatives", default=negatives, choices=choices,
                   help="; ".join(f"{n}: {_NEGATIVES_HELP[n]}" for n in choices) + f" (default: {negatives})")
    g.add_argument("--num-negatives", type=int, default=num_negatives,
                   help=f"hard negatives per query (default: {num_negatives}; paper: 7)")
    g.add_argument("--mine-range", default="10-100",
                   help="ranks LO-HI (0-based, positives removed) to mine negatives from (default: 10-100)")
    g.add_argument("--temperature", type=finite_float, default=0.02, help="InfoNCE temperature (paper: 0.02)")
    g.add_argument("--pooling", choices=POOLINGS, default=None,
                   help="train (and save) with this pooling (default: the model's)")


_NEGATIVES_HELP = {"auto": "the data's own when every query has enough, else bm25", "data": "the data's own",
                   "bm25": "mined by BM25", "dense": "mined by --mine-model", "random": "random documents"}
"""What each of train_data.NEGATIVES means, for --negatives' help."""


def add_training_device(g) -> None:
    g.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="cpu forces CPU; default: accelerate gives each process its GPU (or the CPU)")


def add_run(g, *, save_every: int, keep_checkpoints: bool = True) -> None:
    """The run folder's bookkeeping: checkpoints, progress bars, --overwrite."""
    g.add_argument("--save-every", type=int, default=save_every,
                   help=f"checkpoint every N steps (0: never; default: {save_every})")
    if keep_checkpoints:
        g.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (default: 2)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a finished run, or checkpoints of other arguments, in DIR (a killed run with the "
                        "same arguments still resumes)")


# -- resume keys ----------------------------------------------------------------------------------------------------
NOT_RUN_KEYS = {
    "output": "the run folder: where checkpoints are looked for, not what trains",
    "resume": "which checkpoint to start from; that checkpoint's key is checked against every other option",
    "overwrite": "what to do with a finished run or another run's checkpoints; a killed run resumes under it",
    "no_progress": "display only",
    "save_every": "when checkpoints are written, not what the steps compute",
    "keep_checkpoints": "how many checkpoints stay on disk",
    "gradient_checkpointing": "memory against time: the same gradients (tests: accumulation_and_checkpointing_do_not_"
                              "change_the_losses, gradient_checkpointing_does_not_change_gate_training)",
    "prepare_only": "stops before training, so it never writes or resumes a checkpoint",
    "compensate": "slim's refit runs on the final masks, after the last step that writes a checkpoint",
    "compensate_samples": "the calibration size of that refit, after the last checkpoint as well",
    "encode_batch_size": "batch of passes whose output is stored and keyed by content: finetune's train_data.jsonl "
                         "(its sha256 is in the key), distill's parent embeddings (cached by parent and texts)",
}
"""The options a killed run may change before it resumes, each with why its change cannot change the trained
result. Every other option of a training verb is a resume key (:func:`run_keys`)."""


def run_keys(add_arguments: Callable[[argparse.ArgumentParser], None]) -> tuple[str, ...]:
    """The option names (dests) a stage's ``add_arguments`` declares, less :data:`NOT_RUN_KEYS`: the options whose
    change makes a checkpoint of an unfinished run another run's."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    # argparse lists every action, those of argument groups included, in _actions; it has no public listing
    return tuple(a.dest for a in parser._actions if a.dest not in NOT_RUN_KEYS)


# -- typed options --------------------------------------------------------------------------------------------------
def typed(cls: type[T], options: argparse.Namespace) -> T:
    """``cls`` (a dataclass whose fields are option names) filled from a stage's parsed ``options``."""
    return cls(**{f.name: getattr(options, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Optimisation:
    """What trains and how fast (:func:`effir.training.optimizer_and_schedule`): the finetune / distill options of
    the same names (``effir finetune -h``)."""

    lr: float
    weight_decay: float
    schedule: str
    warmup_ratio: float
    full: bool
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_targets: str
    gradient_checkpointing: bool
