"""Layer-by-layer N:M pruning with llmcompressor's Wanda and SparseGPT kernels; effir writes only the glue.

The kernels (``llmcompressor.modifiers.pruning.wanda.wanda_sparsify`` and ``...sparsegpt.sgpt_sparsify``) take a
Linear and statistics of its inputs and return its pruned weight: Wanda keeps the N largest ``|W_ij| * ||X_j||_2``
of every M inputs (no update), SparseGPT picks and compensates them through the inverse Hessian ``2 X^T X / n``.
They count N:M the other way round (``prune_n`` = weights *removed* per group), so effir's ``2:4`` (keep 2 of 4)
passes ``prune_n = 2``, ``prune_m = 4``.

The glue, as SparseGPT and Wanda calibrate: layer ``i`` sees what the already-pruned layers ``0..i-1`` give it. One
pass over the calibration batches per layer, in which layers ``0..i-2`` hand their input straight on (their forward
is switched off for the pass), layer ``i-1`` (pruned) runs on the inputs recorded for it in the previous pass, layer
``i`` runs with hooks on its projections (:func:`effir.sparsity.layer_projections`: inputs with pad tokens zeroed go
into the kernel's statistics) and a hook that records its own input for the next pass, and the forward stops right
after it. So pruning costs about two forward passes of the model, and the calibration activations of one layer are
kept (on the model's device). All projections of layer ``i`` are calibrated on the dense layer ``i``, then pruned.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchAdapter, layer_list
from .probes import layer_pass
from .sparsity import Pattern, layer_projections
from .utils import EffirError

METHODS = ("wanda", "sparsegpt")
INSTALL = ("pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0 && pip install loguru datasets "
           "(--no-deps: llmcompressor pins an older transformers; effir uses only its pruning kernels)")
_LOG_LEVEL = "LLM_COMPRESSOR_LOG_LEVEL"


@functools.cache
def kernel(method: str):
    """llmcompressor's kernel module for ``method``, imported on first use (it takes seconds and only pruning needs
    it). Its import-time notices ("No accelerator available!", on stdout) stay quiet; its warnings afterwards (a
    Hessian it could not invert) go to stderr.

    Raises:
        EffirError: llmcompressor is not installed.
    """
    quiet = _LOG_LEVEL not in os.environ
    if quiet:
        os.environ[_LOG_LEVEL] = "ERROR"  # read once, when llmcompressor configures its logger at import
    try:
        if method == "wanda":
            from llmcompressor.modifiers.pruning.wanda import wanda_sparsify as module
        else:
            from llmcompressor.modifiers.pruning.sparsegpt import sgpt_sparsify as module
    except ImportError as e:
        raise EffirError(f"effir prune needs llmcompressor's kernels ({e}); install them: {INSTALL}") from None
    finally:
        if quiet:
            os.environ.pop(_LOG_LEVEL, None)
    if quiet:
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING", filter="llmcompressor",
                   format="effir prune: llmcompressor {level}: {message}")
    return module


@torch.no_grad()
def prune_layers(model: nn.Module, adapter: ArchAdapter, batches: Iterable[Mapping[str, torch.Tensor]], method: str,
                 pattern: Pattern, *, block_size: int = 128, dampening: float = 0.01, progress: bool = True) -> dict:
    """Prune every attention and MLP projection of ``model`` (a headless HF model) to ``pattern``, in place, layer
    by layer on the calibration ``batches`` (dicts with ``input_ids`` and ``attention_mask``).

    Args:
        method: ``wanda`` or ``sparsegpt``.
        block_size, dampening: SparseGPT's column block (a multiple of the group) and Hessian dampening (a fraction
            of its mean diagonal).

    Returns:
        ``{"projections": n, "weights": n, "zeros": n, "seconds": [per layer], "error": [per layer]}``; ``error`` is
        SparseGPT's own estimate of each layer's output error (``None`` for Wanda).
    """
    if method not in METHODS:
        raise EffirError(f"unknown pruning method {method!r}; use {' or '.join(METHODS)}")
    module = kernel(method)
    layers = layer_list(model, adapter)
    batches = list(batches)
    model.eval()
    inputs: list = [None] * len(batches)  # what entered layer i-1 in the last pass, per batch
    out = {"projections": 0, "weights": 0, "zeros": 0, "seconds": [], "error": []}
    for i in tqdm(range(len(layers)), desc=f"prune {method} {pattern}", unit="layer", disable=not progress,
                  file=sys.stderr):
        t0 = time.perf_counter()
        found = layer_projections(layers[i], adapter)
        stats = {m: [module.make_empty_hessian(m) if method == "sparsegpt" else module.make_empty_row_scalars(m), 0]
                 for m in found.values()}
        inputs = _calibrate(model, layers, i, batches, inputs, stats, module, method)
        errors = [_sparsify(m, stats, module, method, pattern, block_size, dampening) for m in found.values()]
        out["projections"] += len(found)
        out["weights"] += sum(m.weight.numel() for m in found.values())
        out["zeros"] += sum(int((m.weight == 0).sum()) for m in found.values())
        out["seconds"].append(round(time.perf_counter() - t0, 3))
        out["error"].append(sum(errors) if method == "sparsegpt" else None)
    return out


def _calibrate(model, layers, i: int, batches: list, inputs: list, stats: dict, module, method: str) -> list:
    """One pass for layer ``i`` (:func:`effir.probes.layer_pass`): its projections' statistics accumulate in
    ``stats``; returns what entered layer ``i`` for each batch (the inputs of the next pass)."""
    state: dict = {"batch": 0, "mask": None}
    accumulate = module.accumulate_hessian if method == "sparsegpt" else module.accumulate_row_scalars

    def take(proj, args):
        x = args[0] * state["mask"][..., None].to(args[0].dtype)  # pad tokens add nothing
        s = stats[proj]
        s[0], s[1] = accumulate(x, proj, s[0], s[1])

    handles = [proj.register_forward_pre_hook(take) for proj in stats]
    try:
        return layer_pass(model, layers, i, batches, state, start=max(i - 1, 0), inputs=inputs if i > 0 else None)
    finally:
        for h in handles:
            h.remove()


def _sparsify(proj: nn.Linear, stats: dict, module, method: str, pattern: Pattern, block_size: int,
              dampening: float) -> float:
    """Prune ``proj`` with the kernel on its accumulated statistics; SparseGPT's error estimate (0 for Wanda)."""
    removed, sparsity = pattern.group - pattern.keep, 1 - pattern.keep / pattern.group
    table = {proj: stats.pop(proj)[0]}
    if method == "wanda":
        weight, error = module.sparsify_weight(proj, table, sparsity, removed, pattern.group), 0.0
    else:
        error, weight = module.sparsify_weight(proj, table, sparsity, removed, pattern.group, block_size, dampening,
                                               False)
    proj.weight.copy_(weight)
    return float(error)
