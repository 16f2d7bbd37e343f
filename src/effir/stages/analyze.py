"""Score how much every attention and MLP sub-layer (and every whole block) changes the residual stream.

    effir analyze MODEL --calibration wiki|FILE.txt|FILE.jsonl|beir:DIR[:corpus|queries|both] --output OUT

Importance = 1 - cos(x_in, x_out) of the residual stream across the sub-layer, per non-pad token, averaged over
the calibration tokens; low = redundant, dropped first. One forward pass per batch with hooks.
Sides (--side): `text` joins the texts and cuts them into --calibration-samples blocks of --seq-len tokens
(LLM-Drop's recipe); `query` / `document` encode --calibration-samples texts one by one exactly as retrieval does
(prompt template, per-side max length, EOS); `both` scores queries and documents separately so you can see whether
they disagree (the headline scores are then their token-weighted mean). Default (`auto`): `both` for beir:DIR (queries vs corpus), else `text`.
It also flags the sub-layers that create a massive activation (an attention sink: one token's largest activation
grows >= 100x across the sub-layer, or an MLP neuron contributes >= 100x its layer's median); their score looks
redundant but `effir drop` keeps them (see effir.redundancy).
Writes OUT/importance.png (layer x {attention, MLP, block}, one panel per side, annotated with the drop order) and,
last, OUT/scores.json, which `effir drop` reads for any number of dropped layers. Prints a table.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..calibration import block_batches, calibration_blocks, load_texts, sample_texts, side_batches
from ..checkpoint import fingerprint, load
from ..files import write_json
from ..plots import importance_heatmap
from ..redundancy import (
    GROUPS,
    MASSIVE_GROWTH,
    combine,
    drop_order,
    massive_sources,
    rank_correlation,
    ranks,
    sublayer_importance,
)
from ..surgery import structure_of
from ..utils import DTYPE_CHOICES, EffirError, check_device, check_output_dir

SIDES = ("auto", "text", "query", "document", "both")
SCORES_FILE = "scores.json"
HEATMAP_FILE = "importance.png"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name (smollm2-135m, minilm-l6), model folder, .gguf file or hub id")
    p.add_argument("--calibration", default="wiki", metavar="SOURCE",
                   help="wiki (built-in English prose, default), a .txt/.jsonl file, or beir:DIR[:corpus|queries|both]")
    p.add_argument("--output", required=True, help="output folder for scores.json and importance.png")
    p.add_argument("--side", choices=SIDES, default="auto",
                   help="text (joined blocks), query, document, or both sides scored separately "
                        "(default auto: both for beir:DIR with queries and corpus, else text)")
    # --samples: this verb's name for it before every verb said --calibration-samples; configs and scripts use it
    p.add_argument("--calibration-samples", "--samples", type=int, default=256,
                   help="blocks (side text) or texts per side (query/document) to score (default: 256)")
    p.add_argument("--document-samples", type=int, default=None,
                   help="texts for the document side when it differs from --calibration-samples (default: "
                        "--calibration-samples)")
    p.add_argument("--seq-len", type=int, default=2048,
                   help="block length in tokens for side text, capped at the model's max_position_embeddings "
                        "(default: 2048); query/document sides use the model's per-side max lengths")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing texts (default: 0)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="dtype to compute in; auto = bf16 where the hardware runs it natively, else fp32; "
                        "source = the dtype the model is stored in")
    p.add_argument("--query-prompt", default=None,
                   help="query prompt preset (effir, e5, none) or a template with {text} (default: the model's)")
    p.add_argument("--task", default=None, help="task instruction filled into the query prompt's {task}")
    p.add_argument("--prompt-name", default=None,
                   help="named prompt of a sentence-transformers folder to use for queries, e.g. web_search_query "
                        "(default: its 'query' prompt)")
    p.add_argument("--query-max-length", type=int, default=None, help="query token budget (default: the model's)")
    p.add_argument("--document-max-length", type=int, default=None, help="document token budget (default: the model's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/scores.json")


def run(args: argparse.Namespace) -> int:
    out = _check_args(args)
    texts = load_texts(args.calibration)  # before the model: a bad source fails in a second, not after loading
    side = args.side if args.side != "auto" else ("both" if texts.queries is not texts.documents else "text")
    sides = ("query", "document") if side == "both" else (side,)
    encoder = load(args.model, device=args.device, dtype=args.dtype, query_prompt=args.query_prompt,
                   prompt_name=args.prompt_name, task=args.task,
                   query_max_length=args.query_max_length, document_max_length=args.document_max_length)
    dropped = _dropped(encoder)

    results, calib = {}, {}
    for s in sides:
        batches, n_batches, info = _batches(encoder, texts, s, args)
        bar = tqdm(batches, total=n_batches, desc=f"analyze {s}", unit="batch", file=sys.stderr)
        results[s] = sublayer_importance(encoder.model, encoder.adapter, bar, dropped=dropped)
        bar.close()
        calib[s] = {**info, "tokens": results[s]["tokens"]}
    scores = combine(list(results.values())) if side == "both" else results[side]

    report = _report(args, encoder, side, scores, results, calib)
    panels = {s: results[s] for s in sides} if side == "both" else {side: scores}
    title = f"{args.model} on {args.calibration} ({report['calibration']['tokens']} tokens)"
    importance_heatmap(panels, out / HEATMAP_FILE, title=title)
    write_json(out / SCORES_FILE, report)  # last: its presence means the analysis is complete
    _print_table(report, out)
    return 0


def _check_args(args) -> Path:
    for name, low in (("calibration_samples", 1), ("document_samples", 1), ("seq_len", 2), ("batch_size", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise EffirError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    check_device(args.device)
    out = check_output_dir(args.output)
    if (out / SCORES_FILE).exists() and not args.overwrite:
        raise EffirError(f"{out / SCORES_FILE} already exists; pass --overwrite or choose another --output")
    return out


def _dropped(encoder) -> dict[str, list[int]]:
    """Sub-layers already dropped: from the model folder's structure and from the modules themselves."""
    saved = encoder.meta.get("structure") or {}
    live = structure_of(encoder.model, encoder.adapter)
    return {g: sorted(set(saved.get(f"dropped_{g}", [])) | set(live[f"dropped_{g}"])) for g in ("attention", "mlp")}


def _batches(encoder, texts, side: str, args):
    """Token batches for one side -> (iterator, number of batches, calibration info)."""
    if side == "text":
        blocks = calibration_blocks(encoder, texts.documents, args.calibration_samples, args.seq_len, seed=args.seed,
                                    source=args.calibration, verb="analyze")
        info = {"samples": len(blocks), "seq_len": max(len(b) for b in blocks)}
        return block_batches(blocks, args.batch_size, encoder.pad_id), math.ceil(len(blocks) / args.batch_size), info
    n = args.document_samples if side == "document" and args.document_samples else args.calibration_samples
    chosen = sample_texts(texts.for_side(side), n, seed=args.seed)
    seq_len = encoder.settings.query_max_length if side == "query" else encoder.settings.document_max_length
    info = {"samples": len(chosen), "seq_len": seq_len}
    return side_batches(encoder, chosen, side, args.batch_size), math.ceil(len(chosen) / args.batch_size), info


def _report(args, encoder, side: str, scores: dict, results: dict, calib: dict) -> dict:
    """The scores.json document (format 1; `effir drop` reads it)."""
    report = {
        "format": 1,
        "model": str(args.model),
        "fingerprint": fingerprint(encoder),
        "num_layers": len(scores["attention"]),
        "calibration": {
            "source": args.calibration,
            "samples": sum(c["samples"] for c in calib.values()),
            "seq_len": max(c["seq_len"] for c in calib.values()),
            "tokens": scores["tokens"],
            "side": side,
            "seed": args.seed,
            "by_side": calib,
        },
        "side": side,
        "scores": {g: scores[g] for g in GROUPS},
    }
    if side == "both":
        report["by_side"] = {s: {g: r[g] for g in GROUPS} for s, r in results.items()}
        report["side_agreement"] = {g: rank_correlation(results["query"][g], results["document"][g])
                                    for g in GROUPS}  # Spearman rank correlation, query vs document
    report["drop_order"] = {g: drop_order(scores[g]) for g in GROUPS}
    report["peak_growth"] = scores["peak_growth"]
    report["super_neuron_ratio"] = scores["super_neuron_ratio"]
    report["massive"] = {"threshold": MASSIVE_GROWTH,
                         **massive_sources(scores["peak_growth"], scores["super_neuron_ratio"])}
    return report


def _print_table(report: dict, out: Path) -> None:
    both = report["side"] == "both"
    head = "layer" + "".join(f" | {g:>9} {'#':>3}" + (f" {'q#':>3} {'d#':>3}" if both else "") for g in GROUPS)
    rank = {g: ranks(report["scores"][g]) for g in GROUPS}
    side_rank = {(s, g): ranks(report["by_side"][s][g]) for s in report.get("by_side", {}) for g in GROUPS}
    lines = [head, "-" * len(head)]
    for i in range(report["num_layers"]):
        row = f"{i:5d}"
        for g in GROUPS:
            v = report["scores"][g][i]
            row += f" | {'dropped':>9} {'':>3}" if v is None else f" | {v:9.5f} {rank[g][i]:3d}"
            row += "!" if i in report["massive"][g] else " "
            if both:
                row += "".join(f" {_fmt(side_rank[(s, g)][i])}" for s in ("query", "document"))
        lines.append(row)
    lines.append("drop order (least important first):")
    lines += [f"  {g:9}: {' '.join(map(str, report['drop_order'][g]))}" for g in GROUPS]
    def strength(g, i):
        growth = report["peak_growth"][g][i]
        ratio = report["super_neuron_ratio"][i] if g == "mlp" else None
        return f"growth {growth:.0f}x" + (f", super neuron {ratio:.0f}x" if ratio else "")

    sources = [f"{g} {i} ({strength(g, i)})" for g in ("attention", "mlp") for i in report["massive"][g]]
    if sources:
        lines.append(f"! massive-activation source (kept by `effir drop`): {', '.join(sources)}")
    if both:
        agree = report["side_agreement"]
        lines.append("query vs document rank correlation (Spearman): "
                     + ", ".join(f"{g} {_fmt(agree[g], '.3f')}" for g in GROUPS))
    c = report["calibration"]
    lines.append(f"{c['samples']} samples, {c['tokens']} tokens from {c['source']} (side {c['side']}); "
                 f"wrote {out / SCORES_FILE} and {out / HEATMAP_FILE}")
    print("\n".join(lines))


def _fmt(v, spec: str = "3d") -> str:
    return "  -" if v is None else format(v, spec)
