"""Width reduction ("self-slimming"): learnable neuron gates on every kept MLP, their l0 surrogate, and the global
ranking into hard masks (the physical slicing is :func:`effir.surgery.slice_mlp`).

The gate of a layer is a vector ``z`` over its intermediate neurons, applied as
``down( ReLU(z) * act(gate(x)) * up(x) )``. Every supported MLP ends in a down projection whose *input* is exactly
that intermediate activation (Llama-like, Gemma, Phi3's fused gate_up and BERT's ``output.dense`` alike), so the
gate is a forward pre-hook on the down projection: one mechanism for every architecture, and peft's LoRA still
sees the original Linear modules.

Super neurons. A handful of MLP neurons write the massive activations that attention uses as a sink (see
:mod:`effir.redundancy`); pruning one breaks the whole model, yet nothing in an InfoNCE-trained gate protects it
(measured on SmolLM2-135M: slimming 30 % of the MLP width took the sink token's largest activation from 22,552 to
2,993). :func:`super_neurons` finds them from one calibration pass: the neuron's peak activation times its largest
down-projection weight, against the layer's median (SmolLM2, as `effir analyze` reports it: MLP 11's strongest at
20,799x, MLP 28's at 3,401x; in the MLPs without one, no neuron above 69x). The maskers below always keep them.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import ArchAdapter, get_path, layer_list
from .utils import EffirError

SUPER_NEURON_FACTOR = 100.0
"""A neuron whose peak contribution reaches this multiple of its layer's median is kept (module docstring)."""


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


@torch.no_grad()
def super_neurons(model: nn.Module, adapter: ArchAdapter, layers: list[int], batches,
                  factor: float = SUPER_NEURON_FACTOR) -> list[torch.Tensor]:
    """Boolean masks (one per layer in ``layers``) of the neurons that carry massive activations.

    A neuron's contribution (:func:`neuron_contribution`) is its peak ``|activation|`` over the non-pad tokens of
    ``batches`` (dicts with ``input_ids`` and ``attention_mask``) times the largest ``|weight|`` of its
    down-projection column; it is a super neuron when that reaches ``factor`` times the median contribution of its
    layer. ``factor <= 0`` flags none.
    """
    blocks = layer_list(model, adapter)
    downs = [get_path(blocks[i], adapter.down_proj) for i in layers]
    if factor <= 0:
        return [torch.zeros(d.in_features, dtype=torch.bool) for d in downs]
    peaks: dict[int, torch.Tensor] = {}
    state = {"mask": None}
    handles = [d.register_forward_pre_hook(neuron_peak_hook(peaks, k, state)) for k, d in enumerate(downs)]
    try:
        calibration_passes(model, batches, state)
    finally:
        for h in handles:
            h.remove()
    out = []
    for k, d in enumerate(downs):
        contribution = neuron_contribution(peaks[k], d) if k in peaks else torch.zeros(d.in_features)
        out.append(contribution >= factor * contribution.median().clamp(min=1e-12))
    return out


def calibration_passes(model: nn.Module, batches, state: dict, after_batch=None) -> int:
    """Run ``model`` over ``batches`` (dicts with ``input_ids`` and ``attention_mask``) for the hooks a caller has
    registered: ``state["mask"]`` holds the current ``(B, T)`` mask as floats, ``after_batch()`` runs after each
    forward. Positions count real tokens only, as in Encoder.embed (left padding == right padding). Returns the
    number of non-pad tokens."""
    device = next(model.parameters()).device
    tokens = 0
    for batch in batches:
        mask = batch["attention_mask"].to(device)
        state["mask"] = mask.float()
        model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
              position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)
        if after_batch is not None:
            after_batch()
        tokens += int(mask.sum())
    return tokens


def neuron_peak_hook(store: dict, key, state: dict):
    """Forward pre-hook for a down projection: ``store[key]`` becomes the per-neuron peak ``|input|`` over the
    tokens where ``state["mask"]`` ``(B, T)`` is 1, accumulated over calls."""

    def hook(_module, args):
        peak = (args[0].detach().float().abs() * state["mask"][..., None]).amax(dim=(0, 1))  # (d_ff,)
        store[key] = peak if key not in store else torch.maximum(store[key], peak)

    return hook


def neuron_contribution(peak: torch.Tensor, down: nn.Module) -> torch.Tensor:
    """Each neuron's peak ``|activation|`` times the largest ``|weight|`` of its down-projection column: ``(d_ff,)``."""
    return peak.float().cpu() * down.weight.detach().float().abs().amax(dim=0).cpu()


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

