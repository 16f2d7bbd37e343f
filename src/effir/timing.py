"""The timing engine of ``effir bench``: query- and document-side ``Encoder.embed`` timed over a grid of lengths and
batch sizes, interleaved against a baseline, beside the speed-up the FLOPs predict.

What is timed: ``Encoder.embed`` (forward pass + pooling + L2 normalisation) on pre-tokenized fixed-length batches
already on the device; tokenization is excluded. For every (side, length, batch size) cell both models are warmed
up, then timed *interleaved* (candidate, baseline, baseline, candidate, ...) with device synchronisation, at least
``repeats`` times each and until each has run ``min_time`` seconds.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import serving
from .encoder import SIDES, AsymmetricEncoder, Encoder
from .flops import activation_bytes_estimate, count_parameters, flops_per_sequence, structure_summary
from .utils import EffirError, dtype_name

FORMAT = 1
MAX_QUERIES = 1000
"""Real queries are cycled over at most this many texts."""
CPU_MEMORY = ("cpu_estimate: parameter bytes + effir.flops.activation_bytes_estimate = dtype bytes x B x (T x "
              "(3 x hidden + widest gate/up output) + heads x T x T attention scores); an estimate, not a measurement")
CUDA_MEMORY = ("cuda_measured: parameter bytes + rise of torch.cuda.max_memory_allocated over the memory allocated "
               "before the call (both models stay resident, so the absolute peak would count both)")


@dataclass(frozen=True)
class BenchGrid:
    """What :func:`bench_encoders` times, and for how long."""

    sides: tuple[str, ...]
    """``query`` and/or ``document``, in that order."""
    query_length: int | None
    """Tokens per synthetic query, EOS included; ``None``: real queries (padded to the longest of each batch)."""
    doc_lengths: tuple[int, ...]
    """Tokens per synthetic document."""
    query_batch_sizes: tuple[int, ...]
    doc_batch_sizes: tuple[int, ...]
    warmup: int | None = None
    """Untimed calls per model and cell; ``None``: 1 on CPU, 3 on CUDA (at least 2 when compiling)."""
    repeats: int = 5
    """Minimum timed calls per model and cell."""
    max_repeats: int = 200
    """Maximum timed calls per model and cell."""
    min_time: float = 1.0
    """Keep timing a cell until each model ran this many seconds (or ``max_repeats`` is reached)."""
    compile_backend: str | None = None
    """``torch.compile`` both models with this backend (static shapes); ``None``: eager."""
    seed: int = 0
    """Seed of the synthetic token ids."""
    query_source: str = "synthetic"
    """``synthetic`` or ``data``: recorded in the result's environment."""

    def cells(self) -> Iterator[tuple[str, int | None, int]]:
        """``(side, length, batch size)`` of every cell, queries first."""
        if "query" in self.sides:
            for b in self.query_batch_sizes:
                yield "query", self.query_length, b
        if "document" in self.sides:
            for t in self.doc_lengths:
                for b in self.doc_batch_sizes:
                    yield "document", t, b


def bench_encoders(candidate: Encoder | AsymmetricEncoder, baseline: Encoder | AsymmetricEncoder | None,
                   grid: BenchGrid, queries: list[str] | None = None,
                   progress: Callable[[dict], None] | None = None) -> dict:
    """Time ``candidate`` (and ``baseline``, interleaved) over ``grid``; return the ``bench.json`` dict.

    Args:
        candidate: the model to time; a query-side model is timed through its query route on the query side and
            its document route on the document side.
        baseline: the model to compare against (same device and dtype), or ``None``.
        grid: what to time and how long (see :class:`BenchGrid`).
        queries: real query texts for the query side when ``grid.query_length`` is ``None``.
        progress: called with each finished cell (a ``cells`` entry of the result).

    Raises:
        EffirError: the two models differ in device or dtype, or a length exceeds a model's positions.
    """
    encoders = {"candidate": candidate} | ({"baseline": baseline} if baseline is not None else {})
    device = candidate.device
    if baseline is not None and (baseline.device != device or baseline.dtype != candidate.dtype):
        raise EffirError("candidate and baseline ended up on different devices or dtypes")
    routes = {name: {side: enc.route(side) for side in SIDES} for name, enc in encoders.items()}
    for name, by_side in routes.items():
        _check_lengths(name, by_side, grid)
    models = {name: _describe(enc) for name, enc in encoders.items()}
    # uncompiled torch modules (of a served graph too), for FLOP counts
    raw = {id(e): serving.torch_module(e.model) for by_side in routes.values() for e in by_side.values()}
    warmup = grid.warmup if grid.warmup is not None else (3 if device.type == "cuda" else 1)
    if grid.compile_backend:
        _compile({id(e): e for by_side in routes.values() for e in by_side.values()}.values(), grid.compile_backend)
        warmup = max(warmup, 2)  # the first call of every shape compiles
    cells = []
    for side, length, batch_size in grid.cells():
        timed = {name: by_side[side] for name, by_side in routes.items()}
        batches = {n: _batches(e, side, length, batch_size, grid.seed, queries) for n, e in timed.items()}
        timings = _time_cell(timed, batches, warmup, grid)
        cells.append(_cell(side, length, batch_size, batches, timings, {n: raw[id(e)] for n, e in timed.items()},
                           timed))
        if progress is not None:
            progress(cells[-1])
    result = {
        "format": FORMAT,
        "environment": _environment(candidate, warmup, grid),
        "timed": "Encoder.embed (forward + pooling + normalisation) on pre-tokenized batches already on the "
                 "device; tokenization excluded",
        "flops_method": "analytic, from the instantiated modules (effir.flops): 2*in*out per token for every "
                        "nn.Linear in the layers, 2*2*T*T*heads*head_dim per layer with attention, once-per-sequence "
                        "linears outside the layers and the Dense head's; norms/activations/embedding lookups "
                        "neglected",
        "memory_method": CUDA_MEMORY if device.type == "cuda" else CPU_MEMORY,
        "models": models,
        "cells": cells,
        "summary": _summary(cells) if baseline is not None else {},
    }
    return result


def _check_lengths(name: str, by_side: dict[str, Encoder], grid: BenchGrid) -> None:
    lengths = {"query": [grid.query_length] if grid.query_length else [], "document": list(grid.doc_lengths)}
    for side in grid.sides:
        limit = getattr(by_side[side].model.config, "max_position_embeddings", None)
        if lengths[side] and limit and max(lengths[side]) > limit:
            raise EffirError(f"length {max(lengths[side])} exceeds the {name} model's max_position_embeddings "
                             f"{limit}; pass shorter --doc-lengths/--query-length")


def _describe(enc: Encoder | AsymmetricEncoder) -> dict:
    """Size and structure of a model; of each route for a query-side model (``routes``, the query route's at the
    top level)."""
    if isinstance(enc, AsymmetricEncoder):
        routes = {side: _describe(enc.route(side)) for side in SIDES}
        return {**routes["query"], "reference": enc.meta.get("reference"), "routes": routes}
    model = serving.torch_module(enc.model)
    params = count_parameters(model, enc.adapter)
    head = sum(p.numel() for p in enc.head.parameters()) if enc.head is not None else 0
    return {"reference": enc.meta.get("reference"), "model_type": enc.model.config.model_type,
            "parameters": params, "head_parameters": head,
            "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "size": serving.size_report(enc), "structure": structure_summary(model, enc.adapter),
            "attn_implementation": getattr(enc.model.config, "_attn_implementation", None)}


def _compile(encoders, backend: str) -> None:
    dynamo = torch._dynamo.config
    if hasattr(dynamo, "recompile_limit"):
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)  # one static graph per (batch, length) cell
    else:  # pragma: no cover - older torch
        dynamo.cache_size_limit = max(dynamo.cache_size_limit, 64)
    for enc in encoders:
        enc.model = torch.compile(enc.model, dynamic=False, backend=backend)


def _batches(enc: Encoder, side: str, length: int | None, batch_size: int, seed: int, queries) -> list[dict]:
    """Pre-tokenized batches on the device: one synthetic ``(B, T)`` batch, or real query batches (``length=None``)."""
    if length is None:  # real queries, cycled so a batch is always full; at most MAX_QUERIES // B batches
        texts = (queries * math.ceil(batch_size / len(queries)))[:max(batch_size, len(queries))]
        n = len(texts) // batch_size * batch_size
        chunks = [enc.tokenize(texts[i:i + batch_size], side) for i in range(0, n, batch_size)]
    else:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + length * 1009 + batch_size)
        ids = torch.randint(4, enc.model.config.vocab_size, (batch_size, length), generator=gen)  # (B, T)
        if enc.settings.append_eos:
            ids[:, -1] = enc.tokenizer.eos_token_id
        chunks = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    return [{k: v.to(enc.device) for k, v in c.items()} for c in chunks]


def _time_cell(encoders: dict, batches: dict, warmup: int, grid: BenchGrid) -> dict:
    """Warm up each model, then alternate them (ABBA order) until both have enough samples."""
    with torch.inference_mode():
        for name, enc in encoders.items():
            for i in range(warmup):
                enc.embed(**batches[name][i % len(batches[name])])
        _sync(next(iter(encoders.values())).device)
        times = {n: [] for n in encoders}
        peaks = {n: 0 for n in encoders}
        names = list(encoders)
        k = 0
        while True:
            for name in (names if k % 2 == 0 else names[::-1]):
                dt, peak = _timed_call(encoders[name], batches[name][k % len(batches[name])])
                times[name].append(dt)
                peaks[name] = max(peaks[name], peak)
            k += 1
            enough = k >= grid.repeats and all(sum(t) >= grid.min_time for t in times.values())
            if enough or k >= grid.max_repeats:
                return {n: (times[n], peaks[n]) for n in encoders}


def _timed_call(enc: Encoder, batch: dict) -> tuple[float, int]:
    device = enc.device
    before = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    enc.embed(**batch)
    _sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
    return dt, peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cell(side, length, batch_size, batches, timings, raw, encoders) -> dict:
    cell = {"side": side, "batch_size": batch_size}
    for name, (times, peak) in timings.items():
        enc, chunks = encoders[name], batches[name]
        padded = [c["input_ids"].shape[1] for c in chunks]
        tokens = sum(int(c["attention_mask"].sum()) for c in chunks) / len(chunks)  # real tokens per batch
        flops = sum(flops_per_sequence(raw[name], t, enc.adapter)["total"] for t in padded) / len(padded)
        flops += enc.head.flops_per_sequence if enc.head is not None else 0
        med = percentile(times, 50)
        cell.setdefault("seq_len", sum(padded) / len(padded) if length is None else length)
        param_bytes = sum(p.numel() * p.element_size() for p in raw[name].parameters())
        if enc.device.type == "cuda":
            memory = param_bytes + peak
        else:
            elem = next(raw[name].parameters()).element_size()
            memory = param_bytes + activation_bytes_estimate(raw[name], batch_size, max(padded), elem, enc.adapter)
        cell[name] = {
            "latency_ms": {"median": 1e3 * med, "p95": 1e3 * percentile(times, 95), "min": 1e3 * min(times)},
            "repeats": len(times), "sequences_per_s": batch_size / med, "tokens_per_s": tokens / med,
            "flops_per_sequence": flops, "tflops_per_s": flops * batch_size / med / 1e12, "peak_memory_bytes": memory,
        }
    if "baseline" in cell:
        b, c = cell["baseline"], cell["candidate"]
        cell["speedup"] = b["latency_ms"]["median"] / c["latency_ms"]["median"]
        cell["predicted_speedup"] = b["flops_per_sequence"] / c["flops_per_sequence"]
        cell["efficiency"] = cell["speedup"] / cell["predicted_speedup"]
    return cell


def progress_line(c: dict) -> str:
    """One line describing a finished cell."""
    line = f"{c['side']} T={c['seq_len']:g} batch {c['batch_size']}: candidate {c['candidate']['latency_ms']['median']:.1f} ms"
    if "baseline" in c:
        line += (f", baseline {c['baseline']['latency_ms']['median']:.1f} ms: {c['speedup']:.2f}x "
                 f"(FLOPs predict {c['predicted_speedup']:.2f}x)")
    return line


def percentile(values: list[float], q: float) -> float:
    """Median for q=50 (mean of the middle two), else nearest-rank percentile."""
    s = sorted(values)
    if q == 50:
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def _summary(cells: list[dict]) -> dict:
    """Per side: geometric means over its cells of the measured and the FLOPs-predicted speed-ups."""
    out = {}
    for side in ("query", "document"):
        mine = [c for c in cells if c["side"] == side]
        if not mine:
            continue
        speed = math.exp(sum(math.log(c["speedup"]) for c in mine) / len(mine))
        pred = math.exp(sum(math.log(c["predicted_speedup"]) for c in mine) / len(mine))
        out[side] = {"speedup": speed, "predicted_speedup": pred, "efficiency": speed / pred, "cells": len(mine)}
    return out


def _environment(enc: Encoder, warmup: int, grid: BenchGrid) -> dict:
    import transformers

    device = enc.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": name, "dtype": dtype_name(enc.dtype),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "compile": grid.compile_backend or False, "warmup": warmup, "min_repeats": grid.repeats,
            "max_repeats": grid.max_repeats, "min_time_s": grid.min_time, "seed": grid.seed,
            "query_source": grid.query_source}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
