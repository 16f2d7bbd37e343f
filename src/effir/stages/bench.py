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

A query-side model (``effir distill --query-side``) is timed through its query route on the query side and its
document route on the other; without ``--baseline`` it is compared with its own document route, the parent.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from .. import serving
from ..asymmetric import load
from ..data import load_queries, resolve_beir
from ..encoder import AsymmetricEncoder
from ..files import write_json, write_text
from ..refs import query_side_routes, resolve
from ..timing import MAX_QUERIES, BenchGrid, bench_encoders, progress_line
from ..utils import DTYPE_CHOICES, EffirError, check_device, check_output_dir, finite_float


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
    grid = _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    queries = _real_queries(args.data) if args.data and "query" in grid.sides else None
    out = Path(args.output)
    for stale in ("bench.json", "bench.md"):  # a failed run must not leave an older result looking current
        (out / stale).unlink(missing_ok=True)
    served = args.backend != "torch"
    dtype = "fp32" if served and args.dtype == "auto" else args.dtype  # the graphs compute in fp32
    candidate = load(args.model, device=args.device, dtype=dtype, padding_side="right" if served else None)
    variant = serving.variant_name(args.backend, args.quantize)
    candidate = serving.apply_variant(candidate, args.backend, args.quantize, args.threads)
    baseline = load(args.baseline, device=args.device, dtype=dtype) if args.baseline else None
    if baseline is None and isinstance(candidate, AsymmetricEncoder):  # a query-side model against its parent
        baseline, args.baseline = candidate.route("document"), str(Path(args.model) / "document")
    if not grid.doc_batch_sizes:
        grid = replace(grid, doc_batch_sizes=(1, 8, 32) if candidate.device.type == "cuda" else (1, 4))
    result = bench_encoders(candidate, baseline, grid, queries=queries, progress=_print_progress)
    result["models"]["candidate"]["reference"] = args.model + (f" [{variant}]" if variant else "")
    if baseline is not None:
        result["models"]["baseline"]["reference"] = args.baseline
    write_text(out / "bench.md", markdown(result))
    write_json(out / "bench.json", result)  # last: its presence means the run is complete
    for line in summary_lines(result):
        print(line)
    print(f"effir bench: wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def _check_args(args) -> BenchGrid:
    """Validate everything that needs no model, before loading any (a bad flag should not cost a model load).
    ``doc_batch_sizes`` is left empty when not given: its default depends on the device the model lands on."""
    if len([v for v in str(args.query_length).split(",") if v.strip()]) > 1:  # checked with or without --data
        raise EffirError(f"--query-length takes one length, got {args.query_length!r}")
    grid = BenchGrid(
        sides=_names(args.sides, "--sides", ("query", "document")),
        query_length=_ints(args.query_length, "--query-length", minimum=2)[0] if not args.data else None,
        doc_lengths=_ints(args.doc_lengths, "--doc-lengths", minimum=2),
        query_batch_sizes=_ints(args.query_batch_sizes, "--query-batch-sizes", minimum=1),
        doc_batch_sizes=_ints(args.doc_batch_sizes, "--doc-batch-sizes", minimum=1) if args.doc_batch_sizes else (),
        warmup=args.warmup, repeats=args.repeats, max_repeats=args.max_repeats, min_time=args.min_time,
        compile_backend=args.compile_backend if args.compile else None, seed=args.seed,
        query_source="data" if args.data else "synthetic",
    )
    if args.warmup is not None and args.warmup < 0:
        raise EffirError(f"--warmup must be >= 0, got {args.warmup}")
    if args.repeats < 1 or args.max_repeats < args.repeats:
        raise EffirError(f"need 1 <= --repeats <= --max-repeats, got {args.repeats} and {args.max_repeats}")
    if args.min_time < 0:
        raise EffirError(f"--min-time must be >= 0 seconds, got {args.min_time}")
    if args.threads is not None and args.threads < 1:
        raise EffirError(f"--threads must be >= 1, got {args.threads}")
    for flag, ref in (("MODEL", args.model), ("--baseline", args.baseline)):
        if ref is not None and not query_side_routes(Path(ref)):  # a query-side folder is two models: load() takes it
            try:
                resolve(ref)
            except EffirError as e:
                raise EffirError(f"{flag}: {e}") from None
    check_device(args.device)
    serving.check_variant(args.backend, args.quantize, args.device, args.dtype)
    if args.compile and args.backend != "torch":
        raise EffirError(f"--compile applies to the torch backend, not --backend {args.backend}")
    check_output_dir(args.output)
    return grid


def _ints(text: str, flag: str, minimum: int) -> tuple[int, ...]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < minimum for v in values):
        raise EffirError(f"{flag} takes comma-separated integers >= {minimum} (e.g. 1,8,32), got {text!r}")
    return tuple(sorted(set(values)))


def _names(text: str, flag: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or any(n not in allowed for n in names):
        raise EffirError(f"{flag} takes {' and/or '.join(allowed)} (comma-separated), got {text!r}")
    return tuple(n for n in allowed if n in names)


def _real_queries(data) -> list[str]:
    return list(load_queries(resolve_beir(data) / "queries.jsonl").values())[:MAX_QUERIES]


def _print_progress(cell: dict) -> None:
    print(f"effir bench: {progress_line(cell)}", file=sys.stderr, flush=True)


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
        if "routes" in m:
            lines.append(f"- {name}: `{m['reference']}`, a query-side model:")
            lines += [f"  - {side} route: {_size(r)}" for side, r in m["routes"].items()]
        else:
            lines.append(f"- {name}: `{m['reference']}`: {_size(m)}")
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


def _size(m: dict) -> str:
    p, s = m["parameters"], m["structure"]
    return (f"{p['total']:,} parameters ({p['without_embeddings']:,} without embeddings); {s['attention']} attention "
            f"+ {s['mlp']} MLP sub-layers of {s['layers']} layers")


def _model_cols(m: dict, tokens: bool) -> str:
    lat = m["latency_ms"]
    cols = f"{lat['median']:.2f} / {lat['p95']:.2f} | {m['sequences_per_s']:.1f} |"
    if tokens:
        cols += f" {m['tokens_per_s']:.0f} |"
    return cols + f" {m['peak_memory_bytes'] / 2**20:.1f} |"

