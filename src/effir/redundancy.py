"""Sub-layer importance: ``S = 1 - cos(x_in, x_out)`` of the residual stream, per token, averaged over non-pad tokens.

Measured with hooks during ordinary forward passes (one per batch), never from ``output_hidden_states``, whose last
entry is taken after the final norm. Module names come from the :mod:`effir.arch` table only.

What ``x_in`` and ``x_out`` are, per group:

- **attention / mlp, pre-norm models** (Llama, Mistral, Qwen, Gemma, Phi3): ``x_in`` is the residual stream entering
  the sub-layer, i.e. the *input* of its pre-norm (forward pre-hook on the norm); ``x_out = x_in + branch``, where the
  branch is the sub-layer's output (forward hook), taken after its output norm where the architecture has one
  (Gemma2/3's ``post_attention_layernorm`` / ``post_feedforward_layernorm``).
- **attention / mlp, post-norm models** (BERT, ``x = LN(x + F(x))``): ``x_in`` is the sub-layer's input and ``x_out``
  its output *after* its LayerNorm, i.e. the stream the next sub-layer sees. Our choice: the LayerNorm is part of
  the sub-layer in a post-norm model, so this is the change the next sub-layer actually receives.
- **block**: the layer's input against the layer's output (forward pre-hook and hook on the layer). For pre-norm
  layers that is the attention's ``x_in`` against the MLP's ``x_out``.

Massive activations. Decoder LLMs grow a few huge activations (thousands of times the typical size) on one token,
usually the first, which attention then uses as a sink (Sun et al., "Massive Activations in Large Language Models",
2024), written by a few "super neurons" in a few MLPs. Such an MLP's mean ``1 - cos`` is low, because it changes a
few tokens of thousands, yet dropping it breaks every attention layer after it (measured: docs/results/
figures-behind-defaults.md). So the analysis also records, per sub-layer, its **peak growth** (the largest
``max|x_out| / max|x_in|`` over tokens) and, per MLP, its **super-neuron ratio** (the largest neuron contribution, peak ``|activation|`` times
largest ``|down weight|``, over the layer's median; see :func:`effir.probes.super_neurons`), and
:func:`massive_sources` names the sub-layers where either reaches :data:`MASSIVE_GROWTH`; `effir drop` keeps them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .arch import ArchAdapter, get_path, layer_list
from .probes import calibration_passes, neuron_contribution, neuron_peak_hook
from .utils import EffirError

GROUPS = ("attention", "mlp", "block")
MASSIVE_GROWTH = 100.0
"""Peak growth or super-neuron ratio from which a sub-layer counts as a massive-activation source (the figures that
chose it: docs/results/figures-behind-defaults.md)."""


@torch.inference_mode()
def sublayer_importance(model, adapter: ArchAdapter, batches: Iterable[Mapping[str, torch.Tensor]],
                        dropped: Mapping[str, Iterable[int]] | None = None) -> dict:
    """Importance of every attention, MLP and whole block of ``model`` over calibration ``batches``.

    Args:
        model: a headless HF model (``AutoModel``) whose architecture ``adapter`` describes.
        adapter: its :class:`~effir.arch.ArchAdapter`.
        batches: dicts with ``input_ids`` and ``attention_mask`` ``(B, T)``; pad positions (mask 0) are excluded.
        dropped: ``{"attention": [...], "mlp": [...]}`` layer indices whose sub-layer is already removed; they (and
            sub-layers whose modules are missing) score ``None``.

    Returns:
        ``{"attention": [L], "mlp": [L], "block": [L], "tokens": n, "peak_growth": {group: [L]},
        "super_neuron_ratio": [L]}``: mean ``1 - cos`` per layer (``None`` where dropped), the number of non-pad
        tokens scored, each sub-layer's largest per-token growth of the largest activation, and each MLP's largest
        neuron contribution over its median (module docstring).

    Raises:
        EffirError: the batches hold no non-pad token.
    """
    layers = layer_list(model, adapter)
    n = len(layers)
    dropped = {g: set(dropped.get(g, ())) if dropped else set() for g in ("attention", "mlp")}
    device = next(model.parameters()).device
    state: dict = {"mask": None, "sums": None, "x_in": {}, "peak": torch.zeros(len(GROUPS), n, device=device),
                   "neurons": {}}
    handles: list = []
    try:
        present = _hook_layers(state, layers, adapter, dropped, handles)
        model.eval()
        totals = torch.zeros(len(GROUPS), n, dtype=torch.float64)
        state["sums"] = torch.zeros(len(GROUPS), n, dtype=torch.float32, device=device)

        def accumulate():  # per batch in float32 on the device, across batches in float64
            nonlocal totals
            totals += state["sums"].double().cpu()
            state["sums"].zero_()

        tokens = calibration_passes(model, batches, state, accumulate)
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise EffirError("the calibration batches contain no (non-pad) tokens; give more or longer texts")
    means = (totals / tokens).tolist()
    peak = state["peak"].tolist()
    ratio = [_super_ratio(state["neurons"][i], get_path(layers[i], adapter.down_proj)) if i in state["neurons"]
             else None for i in range(n)]
    out = {g: [means[k][i] if present[g][i] else None for i in range(n)] for k, g in enumerate(GROUPS)}
    out["tokens"] = tokens
    out["peak_growth"] = {g: [peak[k][i] if present[g][i] else None for i in range(n)] for k, g in enumerate(GROUPS)}
    out["super_neuron_ratio"] = ratio
    return out


@torch.inference_mode()
def neuron_importance(model, adapter: ArchAdapter, layers: Sequence[int],
                      batches: Iterable[Mapping[str, torch.Tensor]]) -> list[torch.Tensor]:
    """How much each neuron of the MLPs ``layers`` changes the residual stream, comparable *across* layers.

    For neuron ``j`` with activation ``h_j(t)`` (the down projection's input) the score is the mean over non-pad
    tokens of ``h_j(t)^2 * ||W_down[:, j]||^2 / ||x_in(t)||^2``: the squared size of what the neuron writes into the
    stream, relative to the stream it writes into (``x_in`` as for the sub-layer score above). Relative, because the
    stream grows with depth, so raw contributions would always prune the first layers; per token, so the sink
    token's huge stream does not swamp the mean. It is the calibration-based global ranking of
    ``effir slim --method activation`` (the neuron-level counterpart of ``1 - cos``; no training).

    Returns one float tensor ``(d_ff,)`` per entry of ``layers``.

    Raises:
        EffirError: the batches hold no non-pad token.
    """
    blocks = layer_list(model, adapter)
    state: dict = {"mask": None, "inv": {}}
    sums: dict[int, torch.Tensor] = {}
    handles = []

    def take_in(k):
        def hook(_module, args, kwargs):
            x = _first_tensor(args, kwargs).float()
            state["inv"][k] = state["mask"] / x.pow(2).sum(-1).clamp(min=1e-12)  # (B, T); 0 on pads

        return hook

    def take_neurons(k, column_sq):
        def hook(_module, args):
            h2 = args[0].float().pow(2)  # (B, T, d_ff)
            s = torch.einsum("btf,bt->f", h2, state["inv"].pop(k)) * column_sq
            sums[k] = s if k not in sums else sums[k] + s

        return hook

    try:
        for k, i in enumerate(layers):
            points = _hook_points(blocks[i], adapter, "mlp")
            down = get_path(blocks[i], adapter.down_proj)
            if points is None or down is None:
                raise EffirError(f"MLP {i} is dropped; it has no neurons to score")
            column_sq = down.weight.detach().float().pow(2).sum(0)  # (d_ff,)
            handles.append(points[0].register_forward_pre_hook(take_in(k), with_kwargs=True))
            handles.append(down.register_forward_pre_hook(take_neurons(k, column_sq)))
        model.eval()
        tokens = calibration_passes(model, batches, state)
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise EffirError("the calibration batches contain no (non-pad) tokens; give more or longer texts")
    return [(sums[k] / tokens).cpu() for k in range(len(layers))]


def _hook_layers(state: dict, layers, adapter: ArchAdapter, dropped: Mapping[str, set[int]],
                 handles: list) -> dict[str, list[bool]]:
    """Hooks (added to ``handles``) scoring every block and every sub-layer still there, and recording each MLP's
    neuron peaks. Returns ``{group: [L]}``: which sub-layers are scored."""
    n = len(layers)
    present = {"block": [True] * n, "attention": [False] * n, "mlp": [False] * n}
    for i, layer in enumerate(layers):
        handles += _hook(state, layer, layer, (GROUPS.index("block"), i), adds_branch=False)
        for group in ("attention", "mlp"):
            points = None if i in dropped[group] else _hook_points(layer, adapter, group)
            if points is not None:
                present[group][i] = True
                in_mod, out_mod, adds_branch = points
                handles += _hook(state, in_mod, out_mod, (GROUPS.index(group), i), adds_branch)
        down = None if i in dropped["mlp"] else get_path(layer, adapter.down_proj)
        if down is not None:
            handles.append(down.register_forward_pre_hook(neuron_peak_hook(state["neurons"], i, state)))
    return present


def _super_ratio(peaks: torch.Tensor, down) -> float:
    contribution = neuron_contribution(peaks, down)  # (d_ff,)
    return float(contribution.max() / contribution.median().clamp(min=1e-12))


def _hook_points(layer, adapter: ArchAdapter, group: str):
    """``(in_module, out_module, adds_branch)`` for one sub-layer of ``layer``; ``None`` if it is not there."""
    if group == "attention":
        in_path = adapter.attention if adapter.post_norm else adapter.attn_in_norm
        out_path = adapter.attention if adapter.post_norm else (adapter.attn_out_norm or adapter.attention)
    else:
        in_path = adapter.mlp[0] if adapter.post_norm else adapter.mlp_in_norm
        out_path = adapter.mlp[-1] if adapter.post_norm else (adapter.mlp_out_norm or adapter.mlp[-1])
    in_mod, out_mod = get_path(layer, in_path), get_path(layer, out_path)
    if in_mod is None or out_mod is None:
        return None
    return in_mod, out_mod, not adapter.post_norm


def _hook(state: dict, in_mod, out_mod, key: tuple[int, int], adds_branch: bool) -> list:
    """Pre-hook on ``in_mod`` stores ``x_in``; hook on ``out_mod`` scores it against ``x_out`` and frees it."""

    def take_in(module, args, kwargs):
        state["x_in"][key] = _first_tensor(args, kwargs)

    def score(module, args, output):
        x_in = state["x_in"].pop(key).float()  # (B, T, H)
        out = _first_tensor((output,) if torch.is_tensor(output) else tuple(output), {}).float()
        x_out = x_in + out if adds_branch else out
        cos = F.cosine_similarity(x_in, x_out, dim=-1)  # (B, T)
        state["sums"][key] += ((1.0 - cos) * state["mask"]).sum()
        growth = x_out.abs().amax(-1) / x_in.abs().amax(-1).clamp(min=1e-6)  # (B, T)
        state["peak"][key] = torch.maximum(state["peak"][key], (growth * state["mask"]).max())

    return [in_mod.register_forward_pre_hook(take_in, with_kwargs=True), out_mod.register_forward_hook(score)]


def _first_tensor(args: Sequence, kwargs: Mapping) -> torch.Tensor:
    if args and torch.is_tensor(args[0]):
        return args[0]
    if torch.is_tensor(kwargs.get("hidden_states")):
        return kwargs["hidden_states"]
    raise EffirError("could not find the hidden states in a hooked module's inputs/outputs; the adapter in "
                     "effir/arch.py may point at the wrong module")


# -- post-processing ----------------------------------------------------------------------------------------------
def combine(results: Sequence[dict]) -> dict:
    """Token-weighted mean of several :func:`sublayer_importance` results (e.g. query and document sides)."""
    total = sum(r["tokens"] for r in results)
    out = {}
    for g in GROUPS:
        cols = zip(*(r[g] for r in results), strict=True)
        out[g] = [None if any(v is None for v in col) else
                  sum(v * r["tokens"] for v, r in zip(col, results, strict=True)) / total for col in cols]
    out["tokens"] = total
    if all("peak_growth" in r for r in results):
        out["peak_growth"] = {g: _column_max([r["peak_growth"][g] for r in results]) for g in GROUPS}
        out["super_neuron_ratio"] = _column_max([r["super_neuron_ratio"] for r in results])
    return out


def _column_max(rows: Sequence[Sequence[float | None]]) -> list[float | None]:
    return [None if any(v is None for v in col) else max(col) for col in zip(*rows, strict=True)]


def massive_sources(peak_growth: Mapping[str, Sequence[float | None]], super_ratio: Sequence[float | None] = (),
                    threshold: float = MASSIVE_GROWTH) -> dict[str, list[int]]:
    """Per group, the layers whose sub-layer creates a massive activation: peak growth or (MLPs) super-neuron ratio
    at or above ``threshold``. A block counts when it or one of its sub-layers does."""
    def over(values):
        return {i for i, v in enumerate(values or []) if v is not None and v >= threshold}

    out = {g: over(peak_growth.get(g)) for g in GROUPS}
    out["mlp"] |= over(super_ratio)
    return with_blocks(out)


def with_blocks(flagged: Mapping[str, Iterable[int] | None]) -> dict[str, list[int]]:
    """``{group: layers}`` (missing groups: none; other keys ignored) with every layer that holds a flagged
    attention or MLP added to ``block``: a block holding a massive-activation source is one too."""
    out = {g: set(flagged.get(g) or ()) for g in GROUPS}
    out["block"] |= out["attention"] | out["mlp"]
    return {g: sorted(v) for g, v in out.items()}


def drop_order(scores: Sequence[float | None]) -> list[int]:
    """Layer indices from least to most important; ``None`` (already dropped) is left out; ties keep layer order."""
    return sorted((i for i, s in enumerate(scores) if s is not None), key=lambda i: (scores[i], i))


def ranks(scores: Sequence[float | None]) -> list[int | None]:
    """1-based position of each layer in :func:`drop_order` (1 = dropped first); ``None`` where already dropped."""
    out: list[int | None] = [None] * len(scores)
    for r, i in enumerate(drop_order(scores), 1):
        out[i] = r
    return out


def rank_correlation(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Spearman's rank correlation of two score lists over the layers scored in both; ``None`` under 3 layers."""
    both = [i for i in range(len(a)) if a[i] is not None and b[i] is not None]
    if len(both) < 3:
        return None
    ra = ranks([a[i] for i in both])
    rb = ranks([b[i] for i in both])
    x = torch.tensor(ra, dtype=torch.float64)
    y = torch.tensor(rb, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom else None
