"""N:M semi-structured sparsity: the pattern, the projections it covers, and the zeros that training must keep.

``N:M`` (``2:4``) means at most N non-zero weights in every group of M consecutive weights along the *input*
dimension of each row (``weight[o, k*M:(k+1)*M]``): the layout sparse tensor cores run. `effir prune` writes it
(:mod:`effir.pruning`) into every projection of every layer's attention and MLP, the modules the architecture table
names for those roles; embeddings, norms and heads stay dense.

A pruned folder records the pattern in its ``effir.json`` (``sparsity``), and every later save keeps that record
while the weights still follow it (:func:`checked_record`): fine-tuning (:func:`zero_masks`, :func:`hold_zeros`,
:func:`restore_zeros`) keeps the zeros, dropping sub-layers keeps them in what is left, while slicing MLP neurons
(`effir slim`) shifts the groups of the down projection and drops the record, with a warning.

The zeros save no memory and no time in a dense matmul: only sparse kernels (2:4 on NVIDIA tensor cores) turn them
into speed, and `effir bench` times the dense model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from .arch import ArchAdapter, get_path, layer_list
from .surgery import is_dropped
from .utils import EffirError

SCOPE = "every Linear of each layer's attention and MLP"
"""What the pattern covers, as recorded in effir.json."""


@dataclass(frozen=True)
class Pattern:
    """``keep`` non-zeros in every ``group`` consecutive input weights of a row (``2:4``)."""

    keep: int
    group: int

    def __str__(self) -> str:
        return f"{self.keep}:{self.group}"


def parse_pattern(text: str) -> Pattern:
    """``"2:4"`` -> ``Pattern(2, 4)``.

    Raises:
        EffirError: not ``N:M`` with integers ``0 < N < M``.
    """
    n, sep, m = str(text).strip().partition(":")
    if not sep or not n.strip().isdigit() or not m.strip().isdigit() or not 0 < int(n) < int(m):
        raise EffirError(f"--pattern {text!r} is not N:M with 0 < N < M (N non-zeros in every M weights), e.g. 2:4")
    return Pattern(int(n), int(m))


def layer_projections(layer: nn.Module, adapter: ArchAdapter) -> dict[str, nn.Linear]:
    """The Linear modules of one layer's attention and MLP sub-layers, by name inside the layer (dropped sub-layers
    have none; the map that replaces a dropped MLP, effir drop --compensate, is no projection of the model's)."""
    found = {}
    for role in (adapter.attention, *adapter.mlp):
        if is_dropped(layer, adapter, "attention" if role == adapter.attention else "mlp"):
            continue
        sub = get_path(layer, role)
        for name, module in sub.named_modules() if sub is not None else ():
            if isinstance(module, nn.Linear):
                found[f"{role}.{name}" if name else role] = module
    return found


def projections(model: nn.Module, adapter: ArchAdapter) -> dict[str, nn.Linear]:
    """Every projection the pattern covers, by its name in ``model`` (a headless, unwrapped model)."""
    return {f"{adapter.layers}.{i}.{name}": module for i, layer in enumerate(layer_list(model, adapter))
            for name, module in layer_projections(layer, adapter).items()}


def check_divisible(model: nn.Module, adapter: ArchAdapter, pattern: Pattern) -> int:
    """Refuse a model whose projections cannot be cut into groups of ``pattern.group`` inputs; returns how many
    projections there are.

    Raises:
        EffirError: naming the first projection whose input width is not a multiple of the group.
    """
    found = projections(model, adapter)
    if not found:
        raise EffirError(f"the model has no attention or MLP projection left to prune ({adapter.family})")
    for name, module in found.items():
        if module.in_features % pattern.group:
            raise EffirError(f"{name} takes {module.in_features} inputs, not a multiple of {pattern.group}: pattern "
                             f"{pattern} cannot apply to this model; use an M that divides its widths, e.g. 2:4")
    return len(found)


def nonzeros_per_group(weight: torch.Tensor, group: int) -> torch.Tensor:
    """How many non-zeros each group of ``group`` consecutive input weights holds: ``(out, in // group)``."""
    return (weight.detach() != 0).reshape(weight.shape[0], -1, group).sum(-1)


def follows(model: nn.Module, adapter: ArchAdapter, pattern: Pattern) -> str | None:
    """None when every projection has at most ``pattern.keep`` non-zeros per group, else the first that breaks it."""
    for name, module in projections(model, adapter).items():
        if module.in_features % pattern.group or int(nonzeros_per_group(module.weight, pattern.group).max()) > \
                pattern.keep:
            return name
    return None


def record(pattern: Pattern, method: str, calibration: dict) -> dict:
    """The ``sparsity`` entry of effir.json."""
    return {"pattern": str(pattern), "keep": pattern.keep, "group": pattern.group, "method": method,
            "scope": SCOPE, "calibration": calibration}


def pattern_of(meta: dict) -> Pattern | None:
    """The pattern a model's meta records (``None``: a dense model)."""
    entry = meta.get("sparsity")
    return Pattern(entry["keep"], entry["group"]) if isinstance(entry, dict) else None


def checked_record(model: nn.Module, adapter: ArchAdapter, meta: dict, where: str) -> dict | None:
    """The meta's ``sparsity`` entry when the weights still follow it; ``None`` (and a warning on stderr, naming the
    first projection that broke it) when they do not, e.g. after `effir slim` cut MLP neurons."""
    pattern = pattern_of(meta)
    if pattern is None:
        return None
    broken = follows(model, adapter, pattern)
    if broken is None:
        return meta["sparsity"]
    print(f"effir: WARNING: {where}: {broken} no longer has the {pattern} pattern of `effir prune`; the folder is "
          "saved without its sparsity record", file=sys.stderr)
    return None


# -- fine-tuning keeps the zeros ------------------------------------------------------------------------------------
def zero_masks(encoder) -> dict[str, torch.Tensor] | None:
    """For a model whose meta records a pattern: each projection's non-zeros now (bool, on the CPU), before training
    changes anything; ``None`` for a dense model. Take them from the plain model, before LoRA wraps it."""
    if pattern_of(encoder.meta) is None:
        return None
    return {name: (m.weight.detach() != 0).cpu() for name, m in projections(encoder.model, encoder.adapter).items()}


def hold_zeros(model: nn.Module, adapter: ArchAdapter, masks: dict[str, torch.Tensor] | None) -> None:
    """Full fine-tuning: the pruned weights get no gradient, so AdamW (whose update and decay of a weight with zero
    gradient and zero moments are zero) leaves them at exactly zero all through training."""
    if masks is None:
        return
    for name, module in projections(model, adapter).items():
        if name in masks and module.weight.requires_grad:
            keep = masks[name].to(module.weight.device)
            module.weight.register_hook(lambda g, keep=keep: g * keep.to(g.dtype))


def restore_zeros(model: nn.Module, adapter: ArchAdapter, masks: dict[str, torch.Tensor] | None) -> int:
    """After training (LoRA merged into the weights): zero again every weight that was zero before; returns how
    many weights that changed."""
    if masks is None:
        return 0
    changed = 0
    with torch.no_grad():
        for name, module in projections(model, adapter).items():
            if name in masks:
                drop = ~masks[name].to(module.weight.device)
                changed += int((module.weight[drop] != 0).sum())
                module.weight.masked_fill_(drop, 0)
    return changed


def kept(encoder, masks: dict[str, torch.Tensor] | None) -> dict:
    """Restore the zeros of a trained, merged ``encoder`` (:func:`restore_zeros`) and say so for its stage record:
    ``{"kept_sparsity": "2:4", "rezeroed": n}`` (``n``: merged LoRA weights set back to zero); ``{}`` when dense."""
    if masks is None:
        return {}
    changed = restore_zeros(encoder.model, encoder.adapter, masks)
    return {"kept_sparsity": str(pattern_of(encoder.meta)), "rezeroed": changed}
