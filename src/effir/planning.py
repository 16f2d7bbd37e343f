"""Compression plans under a budget (``effir compress``): what a cut costs, which MLPs go first, the MLP widths that
meet a budget exactly, and the proxies that compare a candidate student with its parent before any training.

A plan drops the ``k`` least important MLPs (``1 - cos``, :func:`effir.redundancy.sublayer_importance`; massive-
activation sources never), replaces each by a fitted full-rank linear map (:func:`effir.compensation.replace_and_fit`,
its parameters counted), then cuts the remaining MLP neurons, ranked globally by
:func:`effir.redundancy.neuron_importance`, to the largest total the budget allows, and refits the down projections
(:func:`effir.compensation.slice_and_refit`). Every neuron of a model costs the same (one row of each up projection,
one column of the down projection), so the budget fixes the number of neurons kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .arch import ArchAdapter, get_path, layer_list
from .compensation import replace_and_fit, slice_and_refit
from .flops import flops_per_sequence
from .redundancy import drop_order, massive_sources, neuron_importance
from .surgery import count_parameters, structure_of

BUDGETS = ("params", "flops")
DROP_FRACTIONS = (0.0, 1 / 8, 1 / 4, 3 / 8)
"""Fractions of the layers whose MLPs the candidate plans drop (rounded half up, duplicates removed)."""


def cost(model: nn.Module, adapter: ArchAdapter, budget: str, length: int) -> int:
    """What the budget counts: parameters without embeddings, or forward FLOPs of one ``length``-token sequence."""
    if budget == "flops":
        return flops_per_sequence(model, length, adapter)["total"]
    return count_parameters(model, adapter)["without_embeddings"]


def neuron_cost(model: nn.Module, adapter: ArchAdapter, budget: str, length: int) -> int:
    """What one MLP neuron costs in ``budget`` units: its row of each up projection (two rows when gate and up are
    fused), its column of the down projection, and the up projections' bias entries (parameters only)."""
    layer = next(layer for layer in layer_list(model, adapter) if get_path(layer, adapter.down_proj) is not None)
    rows = 2 if adapter.fused_gate_up else 1
    ups = [get_path(layer, path) for path in adapter.up_projs]
    weights = sum(rows * up.in_features for up in ups) + get_path(layer, adapter.down_proj).out_features
    if budget == "flops":
        return 2 * length * weights
    return weights + sum(rows for up in ups if up.bias is not None)


def drop_counts(num_layers: int, droppable: int, fractions: Sequence[float] = DROP_FRACTIONS) -> list[int]:
    """How many MLPs each candidate drops: ``fractions`` of ``num_layers``, at most ``droppable``, ascending."""
    return sorted({min(droppable, int(f * num_layers + 0.5)) for f in fractions})


def mlp_drop_order(importance: Mapping) -> tuple[list[int], list[int]]:
    """The MLPs from least to most important, massive-activation sources left out; and those sources."""
    massive = massive_sources(importance["peak_growth"], importance.get("super_neuron_ratio") or ())["mlp"]
    return [i for i in drop_order(importance["mlp"]) if i not in massive], massive


def width_floors(widths: Sequence[int], protected: Sequence[int], multiple: int) -> list[int]:
    """The fewest neurons each MLP keeps: its protected (super) neurons rounded up to ``multiple``, at least one
    ``multiple``, at most its width."""
    return [min(w, max(multiple, -(-p // multiple) * multiple)) for w, p in zip(widths, protected, strict=True)]


def budget_masks(scores: Sequence[torch.Tensor], protect: Sequence[torch.Tensor], allowed: int,
                 multiple: int) -> list[torch.Tensor] | None:
    """Keep-masks (one per MLP) that keep at most ``allowed`` neurons in all, as many as possible: neurons ranked
    globally by ``scores`` (``protect`` ones first), each MLP's count rounded to the nearest ``multiple`` within its
    :func:`width_floors` and width, and the top-scoring ones of each MLP kept. None when the floors exceed
    ``allowed``."""
    widths = [s.numel() for s in scores]
    floors = width_floors(widths, [int(p.sum()) for p in protect], multiple)
    if sum(floors) > allowed:
        return None
    ranked = [s.detach().float().flatten().cpu().masked_fill(p.flatten().cpu(), math.inf)
              for s, p in zip(scores, protect, strict=True)]
    owner = torch.cat([torch.full((w,), i) for i, w in enumerate(widths)])
    order = torch.argsort(torch.cat(ranked), descending=True, stable=True)
    by_rank = owner[order]  # (N,) which MLP the n-th best neuron belongs to

    def counts(n: int) -> list[int]:
        kept = torch.bincount(by_rank[:n], minlength=len(widths)).tolist()
        return [min(w, max(f, multiple * round(k / multiple))) for k, f, w in zip(kept, floors, widths, strict=True)]

    lo, hi = 0, len(order)  # the largest n whose rounded counts fit: counts grow with n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(counts(mid)) <= allowed else (lo, mid - 1)
    masks = []
    for s, k in zip(ranked, counts(lo), strict=True):
        mask = torch.zeros(s.numel(), dtype=torch.bool)
        mask[torch.argsort(s, descending=True, stable=True)[:k]] = True
        masks.append(mask)
    return masks


def compress_to_budget(model: nn.Module, adapter: ArchAdapter, drops: Sequence[int], batches: list, *, target: int,
                       budget: str, length: int, multiple: int, protect: Mapping[int, torch.Tensor],
                       progress: bool = False) -> dict | None:
    """Cut ``model`` in place to at most ``target`` (:func:`cost`): replace the MLPs of ``drops`` by full-rank maps
    fitted on ``batches``, then keep the neurons :func:`budget_masks` allows and refit the down projections.
    ``protect``: layer -> super-neuron mask. Returns what was done, or None (model untouched) when no width reaches
    the target after these drops."""
    hidden = model.config.hidden_size
    per_neuron = neuron_cost(model, adapter, budget, length)
    if drops and not _reachable(model, adapter, drops, budget, length, target, multiple, protect, per_neuron):
        return None
    out: dict = {"drops": sorted(drops), "maps": None, "refit": None}
    if drops:
        out["maps"] = replace_and_fit(model, adapter, dict.fromkeys(drops, hidden), batches, progress=progress)
    present = structure_of(model, adapter)["mlp_widths"]
    layers = [i for i, w in enumerate(present) if w is not None]
    widths = [present[i] for i in layers]
    over = cost(model, adapter, budget, length) - target
    allowed = sum(widths) - max(0, math.ceil(over / per_neuron))
    masks = [torch.ones(w, dtype=torch.bool) for w in widths]
    if over > 0:
        scores = neuron_importance(model, adapter, layers, batches)
        masks = budget_masks(scores, [protect[i] for i in layers], allowed, multiple)
        if masks is None:
            return None
        keeps = {i: torch.nonzero(m).flatten() for i, m in zip(layers, masks, strict=True) if not m.all()}
        out["refit"] = slice_and_refit(model, adapter, keeps, batches, method="lstsq", progress=progress)
    kept = sum(int(m.sum()) for m in masks)
    out.update(widths=structure_of(model, adapter)["mlp_widths"], ratio=round(1 - kept / sum(widths), 4),
               cost=cost(model, adapter, budget, length),
               parameters=count_parameters(model, adapter)["without_embeddings"])
    return out


def _reachable(model, adapter, drops, budget, length, target, multiple, protect, per_neuron) -> bool:
    """Whether ``drops`` plus the narrowest widths can meet ``target``, counted without fitting anything: a dropped
    MLP costs its neurons and down bias, its map ``hidden^2 + hidden`` parameters (``2 hidden^2`` FLOPs a token)."""
    layers = layer_list(model, adapter)
    widths = {i: get_path(layer, adapter.down_proj).in_features for i, layer in enumerate(layers)
              if get_path(layer, adapter.down_proj) is not None}
    hidden = model.config.hidden_size
    saved = 0
    for i in drops:
        bias = get_path(layers[i], adapter.down_proj).bias
        saved += widths.pop(i) * per_neuron + (bias.numel() if bias is not None and budget == "params" else 0)
    maps = len(drops) * (hidden * hidden + hidden if budget == "params" else 2 * length * hidden * hidden)
    floors = width_floors(list(widths.values()), [int(protect[i].sum()) for i in widths], multiple)
    least = cost(model, adapter, budget, length) - saved + maps - (sum(widths.values()) - sum(floors)) * per_neuron
    return least <= target


# -- proxies ---------------------------------------------------------------------------------------------------------
def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine between the rows of ``a`` and ``b`` ``(N, H)``."""
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def top_k_overlap(queries: torch.Tensor, documents: torch.Tensor, ref_queries: torch.Tensor,
                  ref_documents: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of each query's top-``k`` documents (by cosine) that the reference embeddings also rank in
    their top ``k``: ``(Nq, H)`` queries against ``(Nd, H)`` documents, student and reference."""
    k = min(k, documents.shape[0])

    def top(q, d):
        return (F.normalize(q.float(), dim=-1) @ F.normalize(d.float(), dim=-1).T).topk(k, dim=-1).indices

    mine, theirs = top(queries, documents), top(ref_queries, ref_documents)
    shared = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(mine, theirs, strict=True)]
    return sum(shared) / (k * len(shared))
