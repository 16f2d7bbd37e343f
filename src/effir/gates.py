"""Width reduction ("self-slimming"): learnable neuron gates on every kept MLP, their l0 surrogate, and the global
ranking into hard masks (the physical slicing is :func:`effir.surgery.slice_mlp`).

The gate of a layer is a vector ``z`` over its intermediate neurons, applied as
``down( ReLU(z) * act(gate(x)) * up(x) )``. Every supported MLP ends in a down projection whose *input* is exactly
that intermediate activation (Llama-like, Gemma, Phi3's fused gate_up and BERT's ``output.dense`` alike), so the
gate is a forward pre-hook on the down projection: one mechanism for every architecture, and peft's LoRA still
sees the original Linear modules.

The maskers take an optional ``protect`` mask (e.g. :func:`effir.probes.super_neurons`) of neurons they always
keep.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import ArchAdapter, get_path, layer_list
from .utils import EffirError


class MlpGates(nn.Module):
    """One trainable gate vector per kept MLP, applied through pre-hooks on the down projections.

    Args:
        model: headless HF model.
        adapter: its architecture adapter.
        layers: indices of the MLPs to gate (the kept ones).
    """

    def __init__(self, model: nn.Module, adapter: ArchAdapter, layers: list[int]):
        super().__init__()
        self.layers = list(layers)
        blocks = layer_list(model, adapter)
        downs = [get_path(blocks[i], adapter.down_proj) for i in self.layers]
        self.z = nn.ParameterList([nn.Parameter(torch.ones(d.in_features, dtype=torch.float32)) for d in downs])
        self._hard: list[torch.Tensor | None] = [None] * len(downs)
        self._handles = [d.register_forward_pre_hook(self._hook(k)) for k, d in enumerate(downs)]

    def _hook(self, k: int):
        def gate(_module, args):
            (x,) = args
            g = self._hard[k] if self._hard[k] is not None else torch.relu(self.z[k])
            return (x * g.to(x.dtype),)  # (..., d_ff) * (d_ff,)

        return gate

    def set_hard_masks(self, masks: list[torch.Tensor] | None) -> None:
        """Replace ``ReLU(z)`` by fixed 0/1 masks (``None`` returns to the soft gates)."""
        self._hard = [None] * len(self.z) if masks is None else [m.float() for m in masks]

    def remove(self) -> None:
        """Detach the hooks; the model computes exactly as before the gates were added."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def penalty(self, beta: float = 5.0) -> torch.Tensor:
        """The paper's l0 surrogate ``sum_i sigmoid(beta * |z_i|)`` over all gated neurons."""
        return l0_penalty(list(self.z), beta)


def l0_penalty(zs: list[torch.Tensor], beta: float = 5.0) -> torch.Tensor:
    return sum(torch.sigmoid(beta * z.abs()).sum() for z in zs)


def global_keep_masks(scores: list[torch.Tensor], ratio: float, multiple: int = 1,
                      protect: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Rank neuron ``scores`` (e.g. ``ReLU(z)``) across *all* layers and drop the lowest ``ratio`` of them.

    Each layer's kept count is then rounded to the nearest multiple of ``multiple`` (so matmuls keep hardware-
    friendly shapes), keeping that layer's top-scoring neurons. Neurons in ``protect`` (boolean masks, e.g. from
    :func:`super_neurons`) rank above all others. Returns one boolean keep-mask per layer.

    Raises:
        EffirError: ``ratio`` outside (0, 1), or a layer would be left with no neuron.
    """
    if not 0.0 < ratio < 1.0:
        raise EffirError(f"ratio must be in (0, 1), got {ratio}")
    if multiple < 1:
        raise EffirError(f"width multiple must be >= 1, got {multiple}")
    scores = _protected(scores, protect)
    flat = torch.cat([s.detach().float().flatten() for s in scores])
    n_drop = int(round(ratio * flat.numel()))
    # Stable global order: sort by score, ties broken by position, so equal scores give a deterministic cut.
    order = torch.argsort(flat, stable=True)
    dropped = torch.zeros_like(flat, dtype=torch.bool)
    dropped[order[:n_drop]] = True
    masks, start = [], 0
    for i, s in enumerate(scores):
        n = s.numel()
        kept = int((~dropped[start:start + n]).sum())
        start += n
        target = min(n, multiple * round(kept / multiple)) if multiple > 1 else kept
        if target <= 0:
            raise EffirError(f"ratio {ratio} would empty MLP {i} (it keeps {kept} of {n} neurons, rounded to "
                             f"multiples of {multiple}); use a smaller --ratio or --width-multiple")
        top = torch.argsort(s.detach().float().flatten(), descending=True, stable=True)[:target]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[top] = True
        masks.append(mask)
    return masks


def _protected(scores: list[torch.Tensor], protect: list[torch.Tensor] | None) -> list[torch.Tensor]:
    if protect is None:
        return scores
    return [s.detach().float().flatten().masked_fill(p.to(s.device).flatten(), float("inf"))
            for s, p in zip(scores, protect, strict=True)]


def uniform_magnitude_masks(model: nn.Module, adapter: ArchAdapter, layers: list[int], ratio: float,
                            multiple: int = 1, protect: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Baseline ("homogeneous width", Minitron-style): drop the same fraction of every layer, by weight magnitude.

    A neuron's magnitude is the L2 norm of its down-projection column times that of its up-projection row(s).
    """
    if not 0.0 < ratio < 1.0:
        raise EffirError(f"ratio must be in (0, 1), got {ratio}")
    blocks = layer_list(model, adapter)
    masks = []
    for k, i in enumerate(layers):
        score = neuron_magnitude(blocks[i], adapter)
        if protect is not None:
            score = score.masked_fill(protect[k], float("inf"))
        n = score.numel()
        keep = min(n, multiple * round(n * (1 - ratio) / multiple))
        if keep <= 0:
            raise EffirError(f"ratio {ratio} would empty MLP {i} (width {n}, rounded to multiples of {multiple}); "
                             "use a smaller --ratio or --width-multiple")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.argsort(score, descending=True, stable=True)[:keep]] = True
        masks.append(mask)
    return masks


def neuron_magnitude(layer: nn.Module, adapter: ArchAdapter) -> torch.Tensor:
    down = get_path(layer, adapter.down_proj).weight.detach().float()  # (H, d_ff)
    score = down.norm(dim=0)
    for path in adapter.up_projs:
        w = get_path(layer, path).weight.detach().float()  # (d_ff or 2*d_ff, H)
        for half in w.chunk(2, dim=0) if adapter.fused_gate_up else (w,):
            score = score * half.norm(dim=1)
    return score

