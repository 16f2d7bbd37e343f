"""Time query-side and document-side encoding of a model against a baseline, beside the speed-up its FLOPs predict.

    effir bench MODEL [--baseline MODEL] --output OUT [--data BEIR] [--compile] [--device cuda] [--dtype bf16]

What is timed: ``Encoder.embed`` (forward pass + pooling + L2 normalisation) on pre-tokenized fixed-length batches
already on the device; tokenization is excluded. Query side: synthetic queries of ``--query-length`` tokens, or real
queries from ``--data`` (prompt + EOS, padded to the longest of each batch; batches cycle over up to 1,000 queries).
Document side: synthetic documents of each ``--doc-lengths`` (random token ids, EOS last). For every (side, length,
batch size) cell, both models are warmed up, then timed *interleaved* (candidate, baseline, baseline, candidate,
...) with device synchronisation, at least ``--repeats`` times each and until each has run ``--min-time`` seconds.
Reported per cell: median and p95 latency, sequences/s, tokens/s, peak memory (CUDA: measured; CPU: an estimate,
see ``memory_method``) and FLOPs per sequence counted from the instantiated modules (``effir.flops``); with a
baseline, measured speed-up / FLOPs-predicted speed-up = efficiency, and per side the geometric means over its cells.
Writes ``OUT/bench.md`` and, last, ``OUT/bench.json``; prints one summary line per side.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .. import serving
from ..checkpoint import load, resolve
from ..data import load_queries, resolve_beir
from ..encoder import Encoder
from ..flops import activation_bytes_estimate, count_parameters, flops_per_sequence, structure_summary
from ..utils import DTYPE_CHOICES, EffirError, check_device, check_output_dir, dtype_name, finite_float, write_json

FORMAT = 1
MAX_QUERIES = 1000
CPU_MEMORY = ("cpu_estimate: parameter bytes + effir.flops.activation_bytes_estimate = dtype bytes x B x (T x "
              "(3 x hidden + widest gate/up output) + heads x T x T attention scores); an estimate, not a measurement")
CUDA_MEMORY = ("cuda_measured: parameter bytes + rise of torch.cuda.max_memory_allocated over the memory allocated "
               "before the call (both models stay resident, so the absolute peak would count both)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model to time: built-in name (smollm2-135m), model folder, .gguf file or hub id")
    p.add_argument("--baseline", default=None, help="the original model to compare against (same forms as MODEL)")
    p.add_argument("--output", required=True, help="output folder for bench.json and bench.md")
    p.add_argument("--data", default=None, help="BEIR folder or .zip: time its real queries instead of synthetic ones")
    p.add_argument("--sides", default="query,document", help="query, document or both (default: query,document)")
    p.add_argument("--query-length", default="32", help="tokens per synthetic query, EOS included (default: 32)")
    p.add_argument("--doc-lengths", default="256,512", help="tokens per document, comma-separated (default: 256,512)")
    p.add_argument("--query-batch-sizes", default="1,8,32", help="query batch sizes (default: 1,8,32)")
    p.add_argument("--doc-batch-sizes", default=None, help="document batch sizes (default: 1,8,32 on GPU, 1,4 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per model and cell (default: 1 CPU, 3 GPU)")
    p.add_argument("--repeats", type=int, default=5, help="minimum timed calls per model and cell (default: 5)")
    p.add_argument("--max-repeats", type=int, default=200, help="maximum timed calls per model and cell")
    p.add_argument("--min-time", type=finite_float, default=1.0,
                   help="keep timing a cell until each model ran this long (s)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="dtype to compute in; auto = bf16 where the hardware runs it natively, else fp32; "
                        "source = the dtype the model is stored in")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (static shapes; warm-up compiles)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default: inductor; eager/aot_eager only check the tracing)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic token ids")
    p.add_argument("--backend", default="torch", choices=serving.BACKENDS,
                   help="runtime of MODEL: torch, or the onnx / openvino graph of a folder written by `effir export` "
                        "(the baseline stays on torch, fp32)")
    p.add_argument("--quantize", default="none", choices=serving.QUANTIZATIONS,
                   help="precision of MODEL: int8 (torchao on torch, the exported int8 graph on onnx/openvino) or "
                        "nf4 (bitsandbytes, CUDA only); the baseline is not quantised")


def run(args: argparse.Namespace) -> int:
    cfg = _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    queries = _real_queries(args.data) if args.data and "query" in cfg["sides"] else None
    out = Path(args.output)
    for stale in ("bench.json", "bench.md"):  # a failed run must not leave an older result looking current
        (out / stale).unlink(missing_ok=True)
    served = args.backend != "torch"
    dtype = "fp32" if served and args.dtype == "auto" else args.dtype  # the graphs compute in fp32
    candidate = load(args.model, device=args.device, dtype=dtype, padding_side="right" if served else None)
    candidate = serving.apply_variant(candidate, args.backend, args.quantize, args.threads)
    baseline = load(args.baseline, device=args.device, dtype=dtype) if args.baseline else None
    if cfg["doc_batch_sizes"] is None:
        cfg["doc_batch_sizes"] = [1, 8, 32] if candidate.device.type == "cuda" else [1, 4]
    result = bench_encoders(candidate, baseline, cfg, queries=queries)
    variant = serving.variant_name(args.backend, args.quantize)
    result["models"]["candidate"]["reference"] = args.model + (f" [{variant}]" if variant else "")
    if baseline is not None:
        result["models"]["baseline"]["reference"] = args.baseline
    _write_text(out / "bench.md", markdown(result))
    write_json(out / "bench.json", result)  # last: its presence means the run is complete
    for line in summary_lines(result):
        print(line)
    print(f"effir bench: wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def _check_args(args) -> dict:
    """Validate everything that needs no model, before loading any (a bad flag should not cost a model load)."""
    sides = _names(args.sides, "--sides", ("query", "document"))
    cfg = {
        "sides": sides,
        "query_length": _ints(args.query_length, "--query-length", minimum=2)[0] if not args.data else None,
        "doc_lengths": _ints(args.doc_lengths, "--doc-lengths", minimum=2),
        "query_batch_sizes": _ints(args.query_batch_sizes, "--query-batch-sizes", minimum=1),
        "doc_batch_sizes": _ints(args.doc_batch_sizes, "--doc-batch-sizes", minimum=1) if args.doc_batch_sizes else None,
        "warmup": args.warmup, "repeats": args.repeats, "max_repeats": args.max_repeats, "min_time": args.min_time,
        "compile": args.compile_backend if args.compile else False, "seed": args.seed,
        "query_source": "data" if args.data else "synthetic",
    }
    if args.data and len(str(args.query_length).split(",")) > 1:
        raise EffirError("--query-length takes one length")
    if args.warmup is not None and args.warmup < 0:
        raise EffirError(f"--warmup must be >= 0, got {args.warmup}")
    if args.repeats < 1 or args.max_repeats < args.repeats:
        raise EffirError(f"need 1 <= --repeats <= --max-repeats, got {args.repeats} and {args.max_repeats}")
    if args.min_time < 0:
        raise EffirError(f"--min-time must be >= 0 seconds, got {args.min_time}")
    if args.threads is not None and args.threads < 1:
        raise EffirError(f"--threads must be >= 1, got {args.threads}")
    for flag, ref in (("MODEL", args.model), ("--baseline", args.baseline)):
        if ref is not None:
            try:
                resolve(ref)
            except EffirError as e:
                raise EffirError(f"{flag}: {e}") from None
    check_device(args.device)
    serving.check_variant(args.backend, args.quantize, args.device, args.dtype)
    if args.compile and args.backend != "torch":
        raise EffirError(f"--compile applies to the torch backend, not --backend {args.backend}")
    check_output_dir(args.output)
    return cfg


def _ints(text: str, flag: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < minimum for v in values):
        raise EffirError(f"{flag} takes comma-separated integers >= {minimum} (e.g. 1,8,32), got {text!r}")
    return sorted(set(values))


def _names(text: str, flag: str, allowed: tuple[str, ...]) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or any(n not in allowed for n in names):
        raise EffirError(f"{flag} takes {' and/or '.join(allowed)} (comma-separated), got {text!r}")
    return [n for n in allowed if n in names]


def _real_queries(data) -> list[str]:
    texts = list(load_queries(resolve_beir(data) / "queries.jsonl").values())[:MAX_QUERIES]
    return texts


# -- the benchmark ------------------------------------------------------------------------------------------------
def bench_encoders(candidate: Encoder, baseline: Encoder | None, cfg: dict, queries: list[str] | None = None) -> dict:
    """Time ``candidate`` (and ``baseline``, interleaved) over the grid in ``cfg``; return the ``bench.json`` dict."""
    encoders = {"candidate": candidate} | ({"baseline": baseline} if baseline is not None else {})
    device = candidate.device
    if baseline is not None and (baseline.device != device or baseline.dtype != candidate.dtype):
        raise EffirError("candidate and baseline ended up on different devices or dtypes")
    _check_lengths(encoders, cfg)
    models = {name: _describe(enc) for name, enc in encoders.items()}
    raw = {name: serving.torch_module(enc.model) for name, enc in encoders.items()}  # uncompiled modules, for FLOP counts
    warmup = cfg["warmup"] if cfg["warmup"] is not None else (3 if device.type == "cuda" else 1)
    if cfg["compile"]:
        _compile(encoders, cfg["compile"])
        warmup = max(warmup, 2)  # the first call of every shape compiles
    cells = []
    for side, length, batch_size in _grid(cfg):
        batches = {n: _batches(e, side, length, batch_size, cfg["seed"], queries) for n, e in encoders.items()}
        timings = _time_cell(encoders, batches, warmup, cfg)
        cells.append(_cell(side, length, batch_size, batches, timings, raw, encoders))
        print(f"effir bench: {_progress(cells[-1])}", file=sys.stderr, flush=True)
    result = {
        "format": FORMAT,
        "environment": _environment(candidate, warmup, cfg),
        "timed": "Encoder.embed (forward + pooling + normalisation) on pre-tokenized batches already on the "
                 "device; tokenization excluded",
        "flops_method": "analytic, from the instantiated modules (effir.flops): 2*in*out per token for every "
                        "nn.Linear in the layers, 2*2*T*T*heads*head_dim per layer with attention, once-per-sequence "
                        "linears outside the layers; norms/activations/embedding lookups neglected",
        "memory_method": CUDA_MEMORY if device.type == "cuda" else CPU_MEMORY,
        "models": models,
        "cells": cells,
        "summary": _summary(cells) if baseline is not None else {},
    }
    return result


def _check_lengths(encoders: dict, cfg: dict) -> None:
    lengths = [cfg["query_length"]] if cfg["query_length"] and "query" in cfg["sides"] else []
    lengths += cfg["doc_lengths"] if "document" in cfg["sides"] else []
    if not lengths:
        return
    for name, enc in encoders.items():
        limit = getattr(enc.model.config, "max_position_embeddings", None)
        if limit and max(lengths) > limit:
            raise EffirError(f"length {max(lengths)} exceeds the {name} model's max_position_embeddings {limit}; "
                             "pass shorter --doc-lengths/--query-length")


def _describe(enc: Encoder) -> dict:
    model = serving.torch_module(enc.model)
    params = count_parameters(model, enc.adapter)
    return {"reference": enc.meta.get("reference"), "model_type": enc.model.config.model_type,
            "parameters": params, "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "size": serving.size_report(enc), "structure": structure_summary(model, enc.adapter),
            "attn_implementation": getattr(enc.model.config, "_attn_implementation", None)}


def _compile(encoders: dict, backend: str) -> None:
    dynamo = torch._dynamo.config
    if hasattr(dynamo, "recompile_limit"):
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)  # one static graph per (batch, length) cell
    else:  # pragma: no cover - older torch
        dynamo.cache_size_limit = max(dynamo.cache_size_limit, 64)
    for enc in encoders.values():
        enc.model = torch.compile(enc.model, dynamic=False, backend=backend)


def _grid(cfg: dict):
    if "query" in cfg["sides"]:
        for b in cfg["query_batch_sizes"]:
            yield "query", cfg["query_length"], b
    if "document" in cfg["sides"]:
        for t in cfg["doc_lengths"]:
            for b in cfg["doc_batch_sizes"]:
                yield "document", t, b


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


def _time_cell(encoders: dict, batches: dict, warmup: int, cfg: dict) -> dict:
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
            enough = k >= cfg["repeats"] and all(sum(t) >= cfg["min_time"] for t in times.values())
            if enough or k >= cfg["max_repeats"]:
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
        med = _percentile(times, 50)
        cell.setdefault("seq_len", sum(padded) / len(padded) if length is None else length)
        param_bytes = sum(p.numel() * p.element_size() for p in raw[name].parameters())
        if enc.device.type == "cuda":
            memory = param_bytes + peak
        else:
            elem = next(raw[name].parameters()).element_size()
            memory = param_bytes + activation_bytes_estimate(raw[name], batch_size, max(padded), elem, enc.adapter)
        cell[name] = {
            "latency_ms": {"median": 1e3 * med, "p95": 1e3 * _percentile(times, 95), "min": 1e3 * min(times)},
            "repeats": len(times), "sequences_per_s": batch_size / med, "tokens_per_s": tokens / med,
            "flops_per_sequence": flops, "tflops_per_s": flops * batch_size / med / 1e12, "peak_memory_bytes": memory,
        }
    if "baseline" in cell:
        b, c = cell["baseline"], cell["candidate"]
        cell["speedup"] = b["latency_ms"]["median"] / c["latency_ms"]["median"]
        cell["predicted_speedup"] = b["flops_per_sequence"] / c["flops_per_sequence"]
        cell["efficiency"] = cell["speedup"] / cell["predicted_speedup"]
    return cell


def _progress(c: dict) -> str:
    line = f"{c['side']} T={c['seq_len']:g} batch {c['batch_size']}: candidate {c['candidate']['latency_ms']['median']:.1f} ms"
    if "baseline" in c:
        line += (f", baseline {c['baseline']['latency_ms']['median']:.1f} ms: {c['speedup']:.2f}x "
                 f"(FLOPs predict {c['predicted_speedup']:.2f}x)")
    return line


def _percentile(values: list[float], q: float) -> float:
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


def _environment(enc: Encoder, warmup: int, cfg: dict) -> dict:
    import transformers

    device = enc.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": name, "dtype": dtype_name(enc.dtype),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "compile": cfg["compile"], "warmup": warmup, "min_repeats": cfg["repeats"],
            "max_repeats": cfg["max_repeats"], "min_time_s": cfg["min_time"], "seed": cfg["seed"],
            "query_source": cfg["query_source"]}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- reporting ----------------------------------------------------------------------------------------------------
def summary_lines(result: dict) -> list[str]:
    if not result["summary"]:
        lines = []
        for c in result["cells"]:
            lines.append(f"{c['side']} side, T={c['seq_len']:g}, batch {c['batch_size']}: "
                         f"{c['candidate']['sequences_per_s']:.1f} seq/s (no baseline)")
        return lines
    lines = []
    for side, s in result["summary"].items():
        verdict = f"{s['speedup']:.2f}x faster" if s["speedup"] >= 1 else f"{s['speedup']:.2f}x the speed (slower)"
        lines.append(f"{side} side: {verdict} (FLOPs predict {s['predicted_speedup']:.2f}x, efficiency "
                     f"{s['efficiency']:.2f}; geometric mean over {s['cells']} cells)")
    return lines


def markdown(result: dict) -> str:
    env, models = result["environment"], result["models"]
    lines = [f"# effir bench: {env['device_name']} ({env['device']}), {env['dtype']}, "
             f"{'torch.compile (' + env['compile'] + ')' if env['compile'] else 'eager'}, {env['threads']} threads", ""]
    for name, m in models.items():
        p = m["parameters"]
        lines.append(f"- {name}: `{m['reference']}`: {p['total']:,} parameters ({p['without_embeddings']:,} without "
                     f"embeddings); {m['structure']['attention']} attention + {m['structure']['mlp']} MLP sub-layers "
                     f"of {m['structure']['layers']} layers")
    lines += ["", *[f"**{line}**" for line in summary_lines(result)], ""]
    has_base = "baseline" in models
    head = "| side | T | batch | candidate ms (median / p95) | seq/s | tokens/s | peak MiB |"
    if has_base:
        head += " baseline ms (median / p95) | seq/s | peak MiB | speed-up | FLOPs predict | efficiency |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for c in result["cells"]:
        row = f"| {c['side']} | {c['seq_len']:g} | {c['batch_size']} | " + _model_cols(c["candidate"], tokens=True)
        if has_base:
            row += " " + _model_cols(c["baseline"], tokens=False)
            row += f" {c['speedup']:.2f}x | {c['predicted_speedup']:.2f}x | {c['efficiency']:.2f} |"
        lines.append(row)
    lines += ["", f"Timed: {result['timed']}.", f"FLOPs: {result['flops_method']}.",
              f"Memory: {result['memory_method']}.",
              f"Protocol: {env['warmup']} warm-up call(s), then >= {env['min_repeats']} interleaved timed calls per "
              f"model and cell (until {env['min_time_s']} s each); p95 is nearest-rank. torch {env['torch']}, "
              f"transformers {env['transformers']}.", ""]
    return "\n".join(lines)


def _model_cols(m: dict, tokens: bool) -> str:
    lat = m["latency_ms"]
    cols = f"{lat['median']:.2f} / {lat['p95']:.2f} | {m['sequences_per_s']:.1f} |"
    if tokens:
        cols += f" {m['tokens_per_s']:.0f} |"
    return cols + f" {m['peak_memory_bytes'] / 2**20:.1f} |"


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
