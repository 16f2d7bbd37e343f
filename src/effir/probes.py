"""Calibration probes: forward passes over calibration batches with hooks on the MLP down projections, the super
neurons they reveal, and :func:`layer_pass`, the one-layer-at-a-time pass of layer-wise calibration (pruning,
compensation).

Super neurons. A handful of MLP neurons write the massive activations that attention uses as a sink (see
:mod:`effir.redundancy`); pruning one breaks the whole model, and nothing in an InfoNCE-trained gate protects it.
:func:`super_neurons` finds them from one calibration pass: the neuron's peak activation times its largest
down-projection weight, against the layer's median. The maskers of :mod:`effir.gates` keep them when given them as
``protect``. Measured ratios: docs/results/figures-behind-defaults.md.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import ArchAdapter, get_path, layer_list

SUPER_NEURON_FACTOR = 100.0
"""A neuron whose peak contribution reaches this multiple of its layer's median is a super neuron."""


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


# -- one layer at a time, through the layers already edited -------------------------------------------------------
class _Stop(Exception):
    """Raised right after the layer being calibrated: nothing after it is needed in this pass."""


def layer_pass(model: nn.Module, layers, target: int, batches: list, state: dict, *, start: int = 0,
               inputs: list | None = None) -> list:
    """Run ``model`` over ``batches`` for the hooks a caller has registered inside ``layers[target]``, as layer-wise
    calibration (SparseGPT, Wanda) needs: ``layers[target]`` sees what the layers before it, as edited so far, give
    it, and nothing is computed twice across passes.

    Layers ``0 .. start-1`` hand their input straight on (their forward is switched off for the pass), ``layers[start]``
    runs on ``inputs[b]`` (what entered it in an earlier pass, per batch; ``None``: the embeddings), the layers from
    it to ``target`` run as they are now, and the forward stops right after ``layers[target]``. During each forward
    ``state["batch"]`` is the batch index and ``state["mask"]`` its ``(B, T)`` attention mask as floats.

    Returns:
        What entered ``layers[target]``, per batch: the ``inputs`` of a later pass with ``start=target``.
    """
    entered: list = [None] * len(batches)

    def replay(_layer, args, kwargs):  # run on the recorded input, not on the passed-through embeddings
        return _with_hidden(args, kwargs, inputs[state["batch"]])

    def record(_layer, args, kwargs):
        entered[state["batch"]] = _hidden(args, kwargs)

    def stop(*_):
        raise _Stop

    skipped = [(layer, layer.__dict__.get("forward")) for layer in layers[:start]] if inputs is not None else []
    handles = [layers[target].register_forward_pre_hook(record, with_kwargs=True),
               layers[target].register_forward_hook(stop)]
    if inputs is not None:
        handles.append(layers[start].register_forward_pre_hook(replay, with_kwargs=True))
    try:
        for layer, _ in skipped:
            layer.forward = _pass_through
        device = next(model.parameters()).device
        for b, batch in enumerate(batches):
            mask = batch["attention_mask"].to(device)
            state.update(batch=b, mask=mask.float())
            try:
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        for layer, forward in skipped:
            del layer.forward
            if forward is not None:
                layer.forward = forward
    return entered


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a layer is called with (first positional argument, or ``hidden_states=``)."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _pass_through(*args, **kwargs) -> torch.Tensor:
    """A layer's forward for the pass of a later layer: its input, unchanged (that layer's input is replayed)."""
    return _hidden(args, kwargs)
