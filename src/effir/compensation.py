"""Closed-form compensation after a cut, without a gradient step.

Width (:func:`slice_and_refit`): the kept neurons' down projection is refit so that they reproduce the full MLP's
output on calibration text, by least squares (the weight updates of SlimGPT / ZipLM, per MLP).

Depth (:func:`replace_and_fit`): a dropped MLP is replaced by what reproduces it best for its cost
(:class:`effir.surgery.MappedBranch`): its calibration mean as a bias (FLAP's bias compensation), or a linear map of
its normalised input plus a bias fitted by ridge least squares (LLM-Streamline's light-weight replacement), full
rank or reduced rank (the best rank-r map: the fitted outputs projected on their top-r principal directions).

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
from .surgery import replace_mlp, slice_mlp
from .utils import EffirError

METHODS = ("none", "bias", "lstsq")
"""What --compensate takes, in effir drop (what replaces a dropped MLP) and effir slim (what repairs a width cut)."""
COMPENSATE_SAMPLES = 128
"""Calibration blocks (of a stage's --seq-len tokens) a compensation fits on: more tokens than an MLP has neurons,
with room to spare."""
DAMPENING = 0.01
"""Ridge ``lam`` as a fraction of the kept neurons' mean Gram diagonal."""


@torch.no_grad()
def slice_and_refit(model: nn.Module, adapter: ArchAdapter, keeps: Mapping[int, torch.Tensor],
                    batches: Iterable[Mapping[str, torch.Tensor]], *, method: str = "lstsq",
                    dampening: float = DAMPENING, progress: bool = True) -> dict:
    """Slice every MLP of ``keeps`` (layer index -> neuron indices to keep) and refit its down projection, layer by
    layer in order, each on the calibration ``batches`` (dicts with ``input_ids`` and ``attention_mask``) as they
    come out of the layers before it, already compensated. ``method`` lstsq: :func:`refit_down`; bias: the kept
    weights stay and the removed neurons' mean contribution joins the bias (FLAP; a down projection without a bias,
    as in LLaMA-style MLPs, has nowhere to put it).

    Returns:
        ``{"layers": [...], "tokens": n, "error_unrepaired": [...], "error_refit": [...], "seconds": s}``: per layer,
        the squared output error of the cut MLP over its calibration tokens, relative to its full output's energy,
        without and with the refit.

    Raises:
        EffirError: ``dampening`` is negative, or a keep set is not a subset of its layer's neurons.
    """
    if dampening < 0:
        raise EffirError(f"compensation dampening must be >= 0, got {dampening}")
    layers = layer_list(model, adapter)
    check_width_method(model, adapter, method, keeps)
    t0 = time.perf_counter()
    batches = list(batches)
    model.eval()
    out: dict = {"layers": [], "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
                 "error_unrepaired": [], "error_refit": []}
    refit = refit_down if method == "lstsq" else mean_bias
    inputs, start = None, 0
    for i in tqdm(sorted(keeps), desc=f"compensate {method}", unit="layer", disable=not progress, file=sys.stderr):
        old = get_path(layers[i], adapter.down_proj)
        gram, inputs = down_gram(model, layers, i, old, batches, start=start, inputs=inputs)
        keep = torch.as_tensor(keeps[i], dtype=torch.long).unique(sorted=True)  # slice_mlp's order
        slice_mlp(model, adapter, i, keep)
        weight, bias = refit(old.weight, old.bias, gram, keep, dampening)
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


def check_width_method(model: nn.Module, adapter: ArchAdapter, method: str, layers: Iterable[int]) -> None:
    """Raises EffirError when ``method`` cannot compensate the MLPs of ``layers``: bias needs a down projection
    bias to put the removed neurons' mean into."""
    downs = [get_path(layer_list(model, adapter)[i], adapter.down_proj) for i in layers]
    if method == "bias" and any(down.bias is None for down in downs):
        raise EffirError(f"--compensate bias needs MLP down projections with a bias; {adapter.family}-style MLPs "
                         "have none: use --compensate lstsq")


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


def mean_bias(weight: torch.Tensor, bias: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor,
              _dampening: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept neurons' weights unchanged, and ``bias + W_R mean(h_R)``: the removed neurons' mean contribution
    over the tokens of ``gram`` (whose last row, the always-1 neuron's, sums each neuron's activations)."""
    dev = gram.device
    cut = torch.ones(weight.shape[1], dtype=torch.bool, device=dev)
    cut[keep.to(dev)] = False
    mean = gram[-1, :-1][cut] / gram[-1, -1].clamp(min=1)  # (|R|,)
    shift = weight.detach().double().to(dev)[:, cut] @ mean
    return (weight[:, keep.to(weight.device)].clone(),
            (bias.detach().double().to(dev) + shift).to(bias.dtype).to(bias.device))


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


@torch.no_grad()
def replace_and_fit(model: nn.Module, adapter: ArchAdapter, ranks: Mapping[int, int],
                    batches: Iterable[Mapping[str, torch.Tensor]], *, dampening: float = DAMPENING,
                    progress: bool = True) -> dict:
    """Replace the MLP of every layer of ``ranks`` (layer index -> rank of its map; 0: a bias alone) by a
    :class:`~effir.surgery.MappedBranch` fitted to reproduce what that MLP added to the residual stream, layer by
    layer in order, each on the calibration ``batches`` as they come out of the layers before it, already replaced.

    Returns:
        ``{"layers", "ranks", "tokens", "error_unrepaired", "error_refit", "seconds"}``: per layer, the squared error of
        the branch's contribution relative to its energy, without a replacement (1) and with it.
    """
    if dampening < 0:
        raise EffirError(f"compensation dampening must be >= 0, got {dampening}")
    layers = layer_list(model, adapter)
    hidden = model.config.hidden_size
    for i, rank in ranks.items():
        if get_path(layers[i], adapter.down_proj) is None:
            raise EffirError(f"the MLP of layer {i} is already dropped; only a present MLP can be replaced by a map")
        if not 0 <= rank <= hidden:
            raise EffirError(f"a replacement map's rank must be in 0..{hidden} (the hidden size), got {rank}")
    t0 = time.perf_counter()
    batches = list(batches)
    model.eval()
    out: dict = {"layers": [], "ranks": [], "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
                 "error_unrepaired": [], "error_refit": []}
    inputs, start = None, 0
    for i in tqdm(sorted(ranks), desc="compensate drops", unit="layer", disable=not progress, file=sys.stderr):
        stats, inputs = branch_stats(model, layers, adapter, i, batches, start=start, inputs=inputs)
        bias, maps = fit_map(stats, ranks[i], dampening)
        branch = replace_mlp(model, adapter, i, ranks[i])
        branch.bias.copy_(bias)
        for name, weight in maps.items():
            getattr(branch, name).weight.copy_(weight)
        out["layers"].append(i)
        out["ranks"].append(ranks[i])
        out["error_unrepaired"].append(1.0)
        out["error_refit"].append(round(map_error(stats, bias, maps), 6))
        start = i
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def branch_stats(model: nn.Module, layers, adapter: ArchAdapter, i: int, batches: list, *, start: int = 0,
                 inputs: list | None = None) -> tuple[dict, list]:
    """Sums over the non-pad tokens of ``batches`` of layer ``i``'s MLP input ``x`` (the normalised residual stream)
    and of what the MLP adds to the residual stream ``y`` (after an output norm; BERT: before its residual add and
    LayerNorm), in float64: ``{"n", "x", "y", "xx", "xy", "yy"}`` (``xx = sum x x^T``, ``xy = sum x y^T``, ``yy =
    sum |y|^2``); plus what entered layer ``i`` per batch (:func:`effir.probes.layer_pass`)."""
    layer = layers[i]
    first = get_path(layer, adapter.mlp[0])
    if adapter.post_norm:
        last = get_path(layer, adapter.down_proj)
    else:
        last = get_path(layer, adapter.mlp_out_norm or adapter.mlp[-1])
    d = model.config.hidden_size
    dev = get_path(layer, adapter.down_proj).weight.device
    stats = {"n": 0.0, "yy": 0.0, **{k: torch.zeros(shape, dtype=torch.float64, device=dev) for k, shape in
                                     (("x", d), ("y", d), ("xx", (d, d)), ("xy", (d, d)))}}
    state: dict = {}

    def take_x(_module, args):
        state["x"] = args[0].detach()

    def take_y(_module, _args, output):
        mask = state["mask"].reshape(-1).bool()
        x = state["x"].float().reshape(mask.numel(), -1)[mask]
        y = output.detach().float().reshape(mask.numel(), -1)[mask]
        stats["n"] += float(mask.sum())
        stats["yy"] += float((y.double() ** 2).sum())
        stats["x"] += x.sum(0).double()
        stats["y"] += y.sum(0).double()
        stats["xx"] += (x.T @ x).double()
        stats["xy"] += (x.T @ y).double()

    handles = [first.register_forward_pre_hook(take_x), last.register_forward_hook(take_y)]
    try:
        entered = layer_pass(model, layers, i, batches, state, start=start, inputs=inputs)
    finally:
        for h in handles:
            h.remove()
    return stats, entered


def fit_map(stats: dict, rank: int, dampening: float = DAMPENING) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The bias and the weights of a rank-``rank`` :class:`~effir.surgery.MappedBranch` that best reproduce ``y``
    from ``x`` (:func:`branch_stats`), float64: ``(bias (d,), {"proj": (d, d)} | {"up": (r, d), "down": (d, r)} | {})``.

    Rank 0: the mean of ``y``. Otherwise the ridge least-squares map on centred statistics (``lam`` = ``dampening`` x
    the mean variance of ``x``; towards 0), and for ``rank < d`` its outputs projected on their top-``rank``
    principal directions, the best rank-``rank`` map for that fit; the bias is the mean of ``y`` minus the map of
    the mean of ``x``.
    """
    n = max(stats["n"], 1.0)
    mx, my = stats["x"] / n, stats["y"] / n
    if rank == 0:
        return my, {}
    cxx = stats["xx"] / n - torch.outer(mx, mx)
    cxy = stats["xy"] / n - torch.outer(mx, my)
    d = cxx.shape[0]
    scale = float(cxx.diagonal().mean())
    lam = dampening * scale if scale > 0 else 1.0
    w = torch.linalg.solve(cxx + lam * torch.eye(d, dtype=cxx.dtype, device=cxx.device), cxy).T  # (d_out, d_in)
    if rank < d:
        _, vecs = torch.linalg.eigh(w @ cxx @ w.T)  # covariance of the fitted outputs, eigenvalues ascending
        v = vecs[:, d - rank:]  # (d, r)
        up, down = v.T @ w, v
        return my - down @ (up @ mx), {"up": up, "down": down}
    return my - w @ mx, {"proj": w}


def map_error(stats: dict, bias: torch.Tensor, maps: Mapping[str, torch.Tensor]) -> float:
    """``sum |y - (W x + b)|^2 / sum |y|^2`` over the tokens of ``stats`` (:func:`branch_stats`)."""
    w = maps["proj"] if "proj" in maps else maps["down"] @ maps["up"] if maps else torch.zeros_like(stats["xx"])
    n = stats["n"]
    err = (stats["yy"] - 2 * float((w * stats["xy"].T).sum()) - 2 * float(bias @ stats["y"])
           + float((w @ stats["xx"] * w).sum()) + 2 * float(bias @ (w @ stats["x"])) + n * float(bias @ bias))
    return max(err, 0.0) / max(stats["yy"], 1e-30)
