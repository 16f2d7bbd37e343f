"""Width reduction ("self-slimming"): learnable neuron gates on every kept MLP, their l0 surrogate, and the global
ranking into hard masks (the physical slicing is :func:`effir.surgery.slice_mlp`).

The gate of a layer is a vector ``z`` over its intermediate neurons, applied as
``down( ReLU(z) * act(gate(x)) * up(x) )``. Every supported MLP ends in a down projection whose *input* is exactly
that intermediate activation (Llama-like, Gemma, Phi3's fused gate_up and BERT's ``output.dense`` alike), so the
gate is a forward pre-hook on the down projection: one mechanism for every architecture, and peft's LoRA still
sees the original Linear modules.

The maskers take an optional ``protect`` mask (e.g. :func:`effir.probes.super_neurons`) of neurons they always
keep.

Two ways to train the gates: the paper's fixed ``lambda * sum sigmoid(beta |z|)`` added to the loss (plain Adam), or
:class:`TargetSparsityAdam`, which needs no lambda: it drives the fraction of closed gates to the ratio to be cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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

    def __init__(self, model: nn.Module, adapter: ArchAdapter, layers: list[int], straight_through: bool = False):
        super().__init__()
        self.layers = list(layers)
        self.straight_through = straight_through
        """Gradient of the gate value w.r.t. z taken as 1 below zero too: a closed gate still learns whether the task
        wants it back (the task gradient at gate 0), so it can reopen."""
        blocks = layer_list(model, adapter)
        downs = [get_path(blocks[i], adapter.down_proj) for i in self.layers]
        self.z = nn.ParameterList([nn.Parameter(torch.ones(d.in_features, dtype=torch.float32)) for d in downs])
        self._hard: list[torch.Tensor | None] = [None] * len(downs)
        self._handles = [d.register_forward_pre_hook(self._hook(k)) for k, d in enumerate(downs)]

    def _hook(self, k: int):
        def gate(_module, args):
            (x,) = args
            g = self._hard[k] if self._hard[k] is not None else self.value(k)
            return (x * g.to(x.dtype),)  # (..., d_ff) * (d_ff,)

        return gate

    def value(self, k: int) -> torch.Tensor:
        """``ReLU(z)`` of gate vector ``k``; with ``straight_through`` its gradient is 1 everywhere."""
        z = self.z[k]
        if not self.straight_through:
            return torch.relu(z)
        return z + (torch.relu(z) - z).detach()

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
                      protect: list[torch.Tensor] | None = None,
                      secondary: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Rank neuron ``scores`` (e.g. ``ReLU(z)``) across *all* layers and drop the lowest ``ratio`` of them.

    Each layer's kept count is then rounded to the nearest multiple of ``multiple`` (so matmuls keep hardware-
    friendly shapes), keeping that layer's top-scoring neurons. Neurons in ``protect`` (boolean masks, e.g. from
    :func:`effir.probes.super_neurons`) rank above all others. Equal scores are ordered by ``secondary`` (e.g. the
    gates' recorded task importance), higher kept first; only neurons equal in both keep their position order.
    Returns one boolean keep-mask per layer.

    Raises:
        EffirError: ``ratio`` outside (0, 1), or a layer would be left with no neuron.
    """
    if not 0.0 < ratio < 1.0:
        raise EffirError(f"ratio must be in (0, 1), got {ratio}")
    if multiple < 1:
        raise EffirError(f"width multiple must be >= 1, got {multiple}")
    scores = _protected(scores, protect)
    flat = torch.cat([s.detach().float().flatten() for s in scores])
    second = None if secondary is None else [v.detach().float().flatten().cpu() for v in secondary]
    n_drop = int(round(ratio * flat.numel()))
    order = _ascending(flat.cpu(), None if second is None else torch.cat(second))
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
        top = _ascending(s.detach().float().flatten().cpu(), None if second is None else second[i]).flip(0)[:target]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[top] = True
        masks.append(mask)
    return masks


def _ascending(primary: torch.Tensor, secondary: torch.Tensor | None) -> torch.Tensor:
    """Indices from lowest to highest ``primary``, equal ones by ``secondary``, then by position (lexicographic by
    two stable sorts)."""
    order = torch.arange(primary.numel()) if secondary is None else torch.argsort(secondary, stable=True)
    return order[torch.argsort(primary[order], stable=True)]


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



def check_reachable(ratio: float, widths: list[int], protected: list[int], multiple: int) -> None:
    """Refuse a --ratio that the kept super neurons and the width multiple leave no way to reach: every layer keeps
    its super neurons and at least one multiple, and a cut rounds to whole multiples.

    Raises:
        EffirError: the cut would be larger than what can be removed, or would round to nothing.
    """
    total, wanted = sum(widths), ratio * sum(widths)
    floor = [min(w, max(multiple, -(-p // multiple) * multiple)) for w, p in zip(widths, protected, strict=True)]
    removable = total - sum(floor)
    if wanted > removable + multiple / 2:
        raise EffirError(f"--ratio {ratio} cannot be reached: keeping {sum(protected)} super neuron(s) and at least "
                         f"{multiple} neurons per MLP (--width-multiple) leaves at most {removable / total:.1%} of the "
                         f"{total} neurons to cut; lower --ratio, --width-multiple or --super-neuron-factor")
    if wanted < multiple / 2:
        raise EffirError(f"--ratio {ratio} cuts {wanted:.0f} of {total} neurons, which rounds to nothing at "
                         f"--width-multiple {multiple}; raise --ratio or lower --width-multiple")


class TargetSparsityAdam(torch.optim.Adam):
    """Adam whose gate group (``{"params": z, "target": ratio}``) closes exactly the ``target`` fraction of gates.

    Only the gates the global ranking would cut now (the lowest ``target`` fraction of z, equal values ordered by
    recorded task importance, ``protect``-ed neurons never) feel the l0 push: a weight ``lam`` added to their task
    gradient, which is first divided by its mean magnitude over all gates, so no loss scale or model size sets how
    hard that is. ``lam`` starts at 1 % of that mean and grows while fewer than ``target`` gates are closed, shrinking
    while more are (``lam *= exp(rate * (target - closed) / target)`` per step, a multiplicative Lagrange-style
    controller whose rate lets it reach the mean after ``ramp_steps`` steps with nothing closed): until then the task
    alone moves the gates and orders the cut set, later the push closes it. The fraction is reached by construction
    and can never overshoot into a collapse: gates outside the cut set are never pushed. Which gates form that set is decided by the task: a gate the task needs climbs back above the
    boundary (closed gates follow it through a straight-through gradient) and another takes its place. The task
    importance of each gate (a running mean of its normalised gradient magnitude) is recorded as the ranking's
    secondary key. An optional ``offset`` per gate (:func:`prior_offsets`) is added to z wherever gates are ranked:
    a prior order the task has to out-learn, since a short budget gives the task too few batches to order the gates
    alone. All of it lives in the optimizer's state, so it is checkpointed and resumed with it. Other groups (LoRA)
    are plain Adam.
    """

    def __init__(self, groups: list[dict], protect: list[torch.Tensor] | None = None, ramp_steps: int = 20,
                 importance_decay: float = 0.9, offset: list[torch.Tensor] | None = None):
        for g in groups:
            if "target" in g:
                if not 0.0 < g["target"] < 1.0:
                    raise EffirError(f"target fraction of closed gates must be in (0, 1), got {g['target']}")
                g.setdefault("lam", 0.01)
                g.setdefault("closed", 0.0)
                g.setdefault("importance", [torch.zeros_like(z) for z in g["params"]])
                g.setdefault("offset", [torch.zeros_like(z) for z in g["params"]] if offset is None else
                             [o.to(z.device, torch.float32).view_as(z) for o, z in zip(offset, g["params"],
                                                                                         strict=True)])
                g.setdefault("protect", [torch.zeros_like(z, dtype=torch.bool) for z in g["params"]]
                             if protect is None else [m.to(z.device).bool() for m, z in zip(protect, g["params"],
                                                                                              strict=True)])
        super().__init__(groups)
        self.rate, self.importance_decay = math.log(100) / max(1, ramp_steps), importance_decay

    @property
    def gate_group(self) -> dict:
        return next(g for g in self.param_groups if "target" in g)

    @torch.no_grad()
    def step(self, closure=None):
        group = self.gate_group
        zs = group["params"]
        grads = [z.grad if z.grad is not None else torch.zeros_like(z) for z in zs]
        scale = torch.cat([g.abs().flatten() for g in grads]).mean().clamp(min=1e-30)
        for g, importance in zip(grads, group["importance"], strict=True):
            g.div_(scale)
            importance.mul_(self.importance_decay).add_(g.abs(), alpha=1 - self.importance_decay)
        cut = self.cut_set()
        for z, g, in_cut in zip(zs, grads, cut, strict=True):
            z.grad = g.add_((in_cut & (z > 0)).to(g.dtype), alpha=group["lam"])
        loss = super().step(closure)
        group["closed"] = closed_fraction(list(zs))
        gap = max(-1.0, (group["target"] - group["closed"]) / group["target"])
        group["lam"] = min(1e6, max(1e-6, group["lam"] * math.exp(self.rate * gap)))
        return loss

    def cut_set(self) -> list[torch.Tensor]:
        """Per gate vector, the gates the global ranking would cut now (boolean masks)."""
        group = self.gate_group
        zs = group["params"]
        flat = torch.cat([r.flatten() for r in self.ranking_scores()])
        flat = flat.masked_fill(torch.cat([m.flatten() for m in group["protect"]]), float("inf"))
        order = _ascending(flat.cpu(), torch.cat([i.float().flatten() for i in group["importance"]]).cpu())
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[order[:round(group["target"] * flat.numel())]] = True
        return [m.view_as(z).to(z.device) for m, z in zip(chosen.split([z.numel() for z in zs]), zs, strict=True)]

    def ranking_scores(self) -> list[torch.Tensor]:
        """What the gates are ranked by: z plus its prior offset."""
        group = self.gate_group
        return [z.detach().float() + o.to(z.device) for z, o in zip(group["params"], group["offset"], strict=True)]

    def importance(self) -> list[torch.Tensor]:
        """The recorded task importance of every gate (zeros before the first step)."""
        return [i.detach().cpu().clone() for i in self.gate_group["importance"]]


def prior_offsets(scores: list[torch.Tensor], spread: float) -> list[torch.Tensor]:
    """Per neuron, ``spread * (q - 1/2)`` with ``q`` its percentile among all ``scores`` (e.g. the activation
    ranking's), so ranking by z + offset starts as ranking by ``scores``. Percentiles, not the scores, so the offsets
    do not depend on the scores' scale or tail; equal scores get equal offsets."""
    flat = torch.cat([s.detach().float().flatten().cpu() for s in scores])
    if flat.numel() < 2:
        return [torch.zeros_like(s, dtype=torch.float32) for s in scores]
    sorted_ = torch.sort(flat).values
    below = torch.searchsorted(sorted_, flat, right=False).float()
    upto = torch.searchsorted(sorted_, flat, right=True).float()
    q = (below + upto - 1) / 2 / (flat.numel() - 1)  # mid-rank of ties, in [0, 1]
    return [o.view_as(s).float() for o, s in zip((spread * (q - 0.5)).split([s.numel() for s in scores]), scores,
                                                  strict=True)]


def closed_fraction(z: list[torch.Tensor]) -> float:
    """Fraction of gates with ReLU(z) = 0."""
    return sum(int((v <= 0).sum()) for v in z) / sum(v.numel() for v in z)


class SettledRanking:
    """Ends gate training once the cut has settled: checked every ``every`` steps, the set of neurons the ranking
    would cut changed by less than ``tolerance`` of all neurons and the closed fraction is within
    ``max(tolerance, 0.02)`` of the target, ``patience`` checks in a row. Its state lives in the optimizer's gate
    group (read through ``group()`` each time: accelerate may replace the group dicts), so a resumed run stops where
    an uninterrupted one would."""

    def __init__(self, group: Callable[[], dict], every: int = 10, patience: int = 2, tolerance: float = 0.01):
        self.group, self.every, self.patience, self.tolerance = group, every, patience, tolerance

    def settled(self, step: int, now: Callable[[], tuple[list[torch.Tensor], torch.Tensor]]) -> bool:
        """``now()``: the gate vectors and the flat boolean mask of the neurons the ranking would cut, asked for on
        check steps only (ranking every gate is not free)."""
        group = self.group()
        if group.get("settled_at"):
            return True
        if step % self.every:
            return False
        z, cut = now()
        previous = group.get("settle_cut")
        changed = 1.0 if previous is None else float((cut != previous.to(cut.device)).float().mean())
        group["settle_cut"] = cut.clone()
        near = abs(closed_fraction(z) - group["target"]) <= max(self.tolerance, 0.02)
        group["settle_calm"] = group.get("settle_calm", 0) + 1 if changed <= self.tolerance and near else 0
        if group["settle_calm"] >= self.patience:
            group["settled_at"] = step
        return bool(group.get("settled_at"))
