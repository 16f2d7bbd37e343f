"""Closed-form compensation after an MLP width cut: the kept neurons' down projection is refit so that they reproduce
the full MLP's output on calibration text, by least squares, without a gradient step (the weight updates of
SlimGPT / ZipLM, per MLP).

For one MLP with down projection ``W`` ``(d, d_ff)`` and intermediate activations ``H`` ``(d_ff, N)`` over the ``N``
non-pad calibration tokens, keeping the neurons ``K`` and removing ``R``::

    W' = argmin ||W H - W' H_K||^2 + lam ||W' - W_K||^2 = W_K + W_R H_R H_K^T (H_K H_K^T + lam I)^-1

i.e. ``W H Hk^T (Hk Hk^T + lam I)^-1`` with the ridge pulling towards the unrepaired weights ``W_K`` rather than
towards 0: a direction the calibration text never excites keeps its original weight instead of shrinking, the
refit never strays further from the plain cut than the data supports, and with every neuron kept ``W' = W``
exactly. A down projection with a bias (BERT) refits it too, as the weight of an extra always-1 neuron (a row of
ones, over non-pad tokens, appended to ``H``); LLaMA-style down projections have none and only their weight
changes, so the model keeps its structure and loads anywhere it loaded before.

``lam = dampening * mean(diag(H_K H_K^T))``: relative to the Gram's own scale, so one value fits every layer,
activation size and number of calibration tokens (SparseGPT's choice, and effir prune's --dampening).

Statistics are gathered sequentially, as SparseGPT does: MLP ``i``'s Gram comes from a pass through layers
``0 .. i-1`` already sliced and refit (:func:`effir.probes.layer_pass`), so its refit also absorbs what the earlier
cuts changed in its inputs. The Gram is summed per batch in float32 and across batches in float64, and solved in
float64: a few massive-activation neurons make it badly conditioned for float32.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchAdapter, get_path, layer_list
from .probes import layer_pass
from .surgery import slice_mlp
from .utils import EffirError

METHODS = ("none", "lstsq")
DAMPENING = 0.01
"""Ridge ``lam`` as a fraction of the kept neurons' mean Gram diagonal."""


@torch.no_grad()
def slice_and_refit(model: nn.Module, adapter: ArchAdapter, keeps: Mapping[int, torch.Tensor],
                    batches: Iterable[Mapping[str, torch.Tensor]], *, dampening: float = DAMPENING,
                    progress: bool = True) -> dict:
    """Slice every MLP of ``keeps`` (layer index -> neuron indices to keep) and refit its down projection, layer by
    layer in order, each on the calibration ``batches`` (dicts with ``input_ids`` and ``attention_mask``) as they
    come out of the layers before it, already compensated.

    Returns:
        ``{"layers": [...], "tokens": n, "error_unrepaired": [...], "error_refit": [...], "seconds": s}``: per layer,
        the squared output error of the cut MLP over its calibration tokens, relative to its full output's energy,
        without and with the refit.

    Raises:
        EffirError: ``dampening`` is negative, or a keep set is not a subset of its layer's neurons.
    """
    if dampening < 0:
        raise EffirError(f"compensation dampening must be >= 0, got {dampening}")
    t0 = time.perf_counter()
    layers = layer_list(model, adapter)
    batches = list(batches)
    model.eval()
    out: dict = {"layers": [], "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
                 "error_unrepaired": [], "error_refit": []}
    inputs, start = None, 0
    for i in tqdm(sorted(keeps), desc="compensate lstsq", unit="layer", disable=not progress, file=sys.stderr):
        old = get_path(layers[i], adapter.down_proj)
        gram, inputs = down_gram(model, layers, i, old, batches, start=start, inputs=inputs)
        keep = torch.as_tensor(keeps[i], dtype=torch.long).unique(sorted=True)  # slice_mlp's order
        slice_mlp(model, adapter, i, keep)
        weight, bias = refit_down(old.weight, old.bias, gram, keep, dampening)
        new = get_path(layers[i], adapter.down_proj)
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
        out["layers"].append(i)
        for key, (w, b) in (("error_unrepaired", (old.weight[:, keep.to(old.weight.device)], old.bias)),
                            ("error_refit", (weight, bias))):
            out[key].append(round(output_error(old.weight, old.bias, gram, keep, w, b), 6))
        start = i
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def down_gram(model: nn.Module, layers, i: int, down: nn.Linear, batches: list, *, start: int = 0,
              inputs: list | None = None) -> tuple[torch.Tensor, list]:
    """``H H^T`` ``(d_ff [+1], d_ff [+1])`` float64 of the inputs of ``down`` (layer ``i``'s down projection) over the
    non-pad tokens of ``batches``, with the row of ones last where ``down`` has a bias; plus what entered layer ``i``
    per batch. ``start`` / ``inputs``: where the pass resumes (:func:`effir.probes.layer_pass`)."""
    size = down.in_features + (down.bias is not None)
    gram = torch.zeros(size, size, dtype=torch.float64, device=down.weight.device)
    state: dict = {}

    def take(_module, args):
        mask = state["mask"].reshape(-1, 1)  # (B*T, 1)
        h = args[0].detach().float().reshape(mask.shape[0], -1) * mask  # (B*T, d_ff), pad rows zero
        if down.bias is not None:
            h = torch.cat([h, mask], dim=1)
        gram.add_((h.T @ h).double())

    handle = down.register_forward_pre_hook(take)
    try:
        entered = layer_pass(model, layers, i, batches, state, start=start, inputs=inputs)
    finally:
        handle.remove()
    return gram, entered


def refit_down(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, keep: torch.Tensor,
               dampening: float = DAMPENING) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ridge least-squares down projection of the neurons ``keep`` (sorted indices into ``d_ff``).

    Args:
        weight: the full down projection ``(d, d_ff)``; bias: its ``(d,)`` bias or ``None``.
        gram: ``H H^T`` of its inputs, ``(d_ff [+1], d_ff [+1])``, the row of ones last when there is a bias.
        dampening: ``lam`` as a fraction of the kept neurons' mean Gram diagonal (0: plain least squares).

    Returns:
        ``(weight (d, k), bias (d,) or None)`` in ``weight``'s dtype and device.
    """
    d_ff = weight.shape[1]
    w, kept = weight.detach().double().to(gram.device), keep.to(gram.device)
    if bias is not None:  # the bias is the weight of an always-1 neuron, which is always kept
        w = torch.cat([w, bias.detach().double().to(gram.device)[:, None]], dim=1)
        kept = torch.cat([kept, kept.new_tensor([d_ff])])
    cut = torch.ones(d_ff, dtype=torch.bool, device=gram.device)
    cut[keep.to(gram.device)] = False
    removed = torch.nonzero(cut).flatten()
    g_kk = gram[kept][:, kept]  # (k', k')
    scale = float(g_kk.diagonal()[:keep.numel()].mean())  # neurons only: the ones row counts tokens
    lam = dampening * scale if scale > 0 else 1.0  # all kept neurons silent: the correction is 0 for any lam
    rhs = gram[kept][:, removed] @ w[:, removed].T  # H_K H_R^T W_R^T: (k', d)
    delta = torch.linalg.solve(g_kk + lam * torch.eye(len(kept), dtype=g_kk.dtype, device=g_kk.device), rhs).T
    new = (w[:, kept] + delta).to(weight.dtype).to(weight.device)  # (d, k')
    if bias is None:
        return new, None
    return new[:, :-1].contiguous(), new[:, -1].contiguous()


def output_error(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, keep: torch.Tensor,
                 new_weight: torch.Tensor, new_bias: torch.Tensor | None) -> float:
    """``||W H + b - (W' H_K + b')||^2 / ||W H + b||^2`` over the tokens of ``gram`` (:func:`down_gram`): how far
    the cut MLP, with down projection ``new_weight`` ``(d, k)`` on the neurons ``keep``, is from the full one."""
    dev = gram.device
    full = weight.detach().double().to(dev)
    cut = torch.zeros_like(full)
    cut[:, keep.to(dev)] = new_weight.detach().double().to(dev)
    if bias is not None:
        full = torch.cat([full, bias.detach().double().to(dev)[:, None]], dim=1)
        cut = torch.cat([cut, new_bias.detach().double().to(dev)[:, None]], dim=1)
    err = full - cut
    return float((err @ gram * err).sum() / (full @ gram * full).sum().clamp(min=1e-30))
