"""The run report: one table over the EffiR model and every baseline (parameters, nDCG@10 per data set, retention,
query/document speed-ups), plots, written as ``report.md`` + ``report.json`` in the run folder; and the shorter
report of ``effir compress`` (:func:`compress_report`)."""

from __future__ import annotations

import json
from pathlib import Path

from .config import PRUNE_BASELINES
from .files import write_json, write_text
from .plots import quality_speed_plot

LABELS = {"effir": "EffiR (drop + slim)", "original": "original, not fine-tuned", "full": "full model, fine-tuned",
          "query_side": "query-side: compressed queries, the parent's documents"}
DROP_LABELS = {"drop_mlp": "Drop-{}M", "drop_blocks": "Drop-{}B (importance)", "drop_last": "Drop-Last{}B",
               "drop_attention": "Drop-{}A"}
"""Labels of the layer-dropping baselines, formatted with their K."""
METHODS = {"wanda": "Wanda", "sparsegpt": "SparseGPT"}
ORDERS = {"prune_ft": "pruned, then fine-tuned", "ft_prune": "the fine-tuned full model, pruned"}
"""Labels of the semi-structured baselines' two orders (effir.run_plan.PRUNE_ORDERS)."""
SPARSE_NOTE = ("2:4 variants store their zeros densely: they keep the full model's parameters and memory, and "
               "effir bench times dense matmuls, so their speed-up is about 1.0x; only sparse kernels (2:4 sparse "
               "tensor cores) would make them faster.")


def write_report(cfg, out: Path, steps) -> Path:
    """Collect the outputs of ``steps`` (eval results, bench summaries) into ``out/report.{md,json}``."""
    variants = _collect(steps)
    if getattr(cfg, "slim_after_finetune", False) and "effir" in variants:
        variants["effir"]["label"] = "EffiR (drop, fine-tune, then slim)"
    if "distill" in getattr(cfg, "stages", ()) and "effir" in variants:
        variants["effir"]["label"] = f"EffiR (drop + slim, distilled from the {cfg.parent} model)"
    reference = variants.get("full", {}).get("avg_ndcg10") or variants.get("original", {}).get("avg_ndcg10")
    for v in variants.values():
        if reference and v.get("avg_ndcg10") is not None:
            v["retention"] = v["avg_ndcg10"] / reference
    figures = _figures(out, variants)
    report = {"model": cfg.model, "datasets": cfg.datasets, "split": cfg.split, "variants": variants,
              "figures": figures}
    write_json(out / "report.json", report)
    return write_text(out / "report.md", _markdown(cfg, variants, figures))


def _collect(steps) -> dict[str, dict]:
    variants: dict[str, dict] = {}
    for step in steps:
        v = variants.setdefault(step.variant, {"label": _label(step), "ndcg10": {}, "metrics": {}})
        if step.family in PRUNE_BASELINES:
            v.update(sparsity=PRUNE_BASELINES[step.family][1], note=SPARSE_NOTE)
        if step.stage == "eval" and (step.folder / "results.json").exists():
            res = json.loads((step.folder / "results.json").read_text())
            if step.quantized:  # the variant evaluated quantised (run_plan._quantized_evals)
                v = v.setdefault("quantized", {}).setdefault(step.quantized, {"ndcg10": {}})
            v["ndcg10"][step.dataset] = res["metrics"]["nDCG@10"]
            v.setdefault("metrics", {})[step.dataset] = res["metrics"]
            v["size"] = res.get("size")
        elif step.stage == "bench" and (step.folder / "bench.json").exists():
            bench = json.loads((step.folder / "bench.json").read_text())
            v["parameters"] = bench["models"]["candidate"]["parameters"]
            v["baseline_parameters"] = bench["models"].get("baseline", {}).get("parameters")
            v["speed"] = {side: {k: s[k] for k in ("speedup", "predicted_speedup", "efficiency")}
                          for side, s in bench["summary"].items()}
        elif step.stage == "slim" and (step.folder / step.done_file).exists():
            slim = json.loads((step.folder / step.done_file).read_text())
            v["widths"] = slim["widths_after"]
            v["parameters"] = v.get("parameters") or slim["parameters_after"]
    for v in variants.values():
        for scored in (v, *v.get("quantized", {}).values()):
            scores = list(scored["ndcg10"].values())
            scored["avg_ndcg10"] = sum(scores) / len(scores) if scores else None
    return variants


def _label(step) -> str:
    """The report's name for the variant ``step`` belongs to, from the step's baseline fields."""
    if step.family in PRUNE_BASELINES:
        method, pattern = PRUNE_BASELINES[step.family]
        return f"{METHODS[method]} {pattern}: {ORDERS[step.order]}"
    if step.family in DROP_LABELS:
        return DROP_LABELS[step.family].format(step.count)
    return LABELS.get(step.variant, step.variant)


def _figures(out: Path, variants: dict) -> dict:
    figures = {}
    heatmap = next(iter(sorted((out / "analyze").glob("*.png"))), None) if (out / "analyze").exists() else None
    if heatmap:
        figures["importance"] = str(heatmap.relative_to(out))
    if (out / "slim" / "widths.png").exists():
        figures["widths"] = "slim/widths.png"
    points = {v["label"]: (v["speed"], v["avg_ndcg10"]) for v in variants.values()
              if v.get("speed") and v.get("avg_ndcg10") is not None}
    if points:
        quality_speed_plot(points, out / "quality_vs_speed.png")
        figures["quality_vs_speed"] = "quality_vs_speed.png"
    return figures


def _fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


def _markdown(cfg, variants: dict, figures: dict) -> str:
    datasets = sorted({d for v in variants.values() for d in v["ndcg10"]})
    lines = [f"# effir report: {cfg.model}", "",
             f"Split `{cfg.split}`; nDCG@10 from `effir eval`, speed-ups from `effir bench` against the original "
             "model (measured / FLOPs-predicted = efficiency; the query-side model against its parent, whose "
             "documents it keeps). Retention is relative to the fine-tuned full model, else to the original.",
             "", "| model | params (no emb.) | " + " | ".join(f"nDCG@10 {d}" for d in datasets)
             + " | avg | retention | query speed-up | doc speed-up |",
             "|---|---:|" + "---:|" * len(datasets) + "---:|---:|---:|---:|"]
    for v in variants.values():
        params = v.get("parameters", {}).get("without_embeddings")
        speed = v.get("speed", {})
        cells = [_fmt(v["ndcg10"].get(d)) for d in datasets]
        q, d = speed.get("query"), speed.get("document")
        lines.append(f"| {v['label']} | {_fmt(params, ',')} | " + " | ".join(cells)
                     + f" | {_fmt(v['avg_ndcg10'])} | {_fmt(v.get('retention'), '.1%')} | "
                     + f"{_speed(q)} | {_speed(d)} |")
    lines.append("")
    if any(v.get("sparsity") for v in variants.values()):
        lines += [SPARSE_NOTE, ""]
    lines += _quantized_table(variants)
    for key, title in (("quality_vs_speed", "Quality against speed"), ("importance", "Sub-layer importance"),
                       ("widths", "MLP widths after slimming")):
        if key in figures:
            lines += [f"## {title}", "", f"![{title}]({figures[key]})", ""]
    return "\n".join(lines)


def _quantized_table(variants: dict) -> list[str]:
    """The paper's Table 6: each variant's 16-bit size and quality beside every quantisation's (``quantize``)."""
    entries = sorted({q for v in variants.values() for q in v.get("quantized", {})})
    if not entries:
        return []
    lines = ["## Quantised (the paper's Table 6)", "",
             "Sizes in MB, embeddings included: 16-bit is 2 bytes per parameter; a quantised size is what that "
             "variant stores (the int8 graph file, or the quantised torch weights). nDCG@10 averaged over the data "
             "sets.", "", "| model | 16-bit MB | nDCG@10 | " + " | ".join(f"{q} MB | nDCG@10 {q}" for q in entries)
             + " |", "|---|---:|---:|" + "---:|---:|" * len(entries)]
    for v in variants.values():
        if not v.get("quantized"):
            continue
        cells = [_fmt(_megabytes(v, "bytes_16bit"), ".1f"), _fmt(v["avg_ndcg10"])]
        for q in entries:
            got = v["quantized"].get(q, {})
            cells += [_fmt(_megabytes(got, "bytes_stored"), ".1f"), _fmt(got.get("avg_ndcg10"))]
        lines.append(f"| {v['label']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _megabytes(scored: dict, key: str) -> float | None:
    size = scored.get("size") or {}
    return size[key] / 1e6 if key in size else None


def _speed(s) -> str:
    if not s:
        return "-"
    return f"{s['speedup']:.2f}x (pred. {s['predicted_speedup']:.2f}x)"


# -- effir compress ---------------------------------------------------------------------------------------------------
def compress_headline(s: dict) -> str:
    """One line of an ``effir compress`` summary (compress.json): retention, speed-up, size."""
    after = s["retention"]["after_distillation"]
    speed = ", ".join(f"{side} x{v:.2f}" for side, v in (s["speedup"] or {}).items()) or "not measured"
    return (f"retention (mean cosine to the parent, held out) {after['mean_cosine']:.4f}, top-10 overlap "
            f"{after['top10_overlap']:.3f}; speed-up {speed}; {s['budget']} {s['kept_fraction']:.1%} of the parent")


def compress_report(s: dict) -> str:
    """report.md of an ``effir compress`` run from its summary (compress.json): retention and speed-up first, then
    the chosen plan and every candidate."""
    p, r = s["plan"], s["retention"]
    lines = [f"# effir compress {s['model']} --keep {s['keep']:g}", "",
             f"- **retention**: mean cosine to the parent {r['after_distillation']['mean_cosine']:.4f} (before "
             f"distillation {r['before_distillation']['mean_cosine']:.4f}), top-10 overlap with the parent "
             f"{r['after_distillation']['top10_overlap']:.3f}, on {r['held_out']}",
             "- **speed-up** against the parent: " + (", ".join(f"{side} x{v:.2f}" for side, v in s["speedup"].items())
                                                      if s["speedup"] else "not measured"), "",
             f"Chosen plan: drop {p['k']} MLP(s) {p['dropped_mlp']} (each replaced by a fitted linear map), cut "
             f"{p['ratio']:.1%} of the other MLP neurons; {s['budget']} {s['cost']:,} of {s['parent_cost']:,} "
             f"(target {s['target']:,}). It had the highest mean cosine to the parent on the held-out texts before "
             "any training, among:", "",
             "| MLPs dropped | neurons cut | " + s["budget"] + " | mean cosine (proxy) | seconds |",
             "|---|---|---|---|---|"]
    for c in s["candidates"]:
        if c["reachable"]:
            lines.append(f"| {c['k']} {c['dropped_mlp']} | {c['ratio']:.1%} | {c['cost']:,} | {c['proxy']:.4f} | "
                         f"{c['seconds']} |")
        else:
            lines.append(f"| {c['k']} {c['dropped_mlp']} | unreachable | - | - | {c['seconds']} |")
    lines += ["", f"Then {s['steps']} distillation steps from the parent"
              + (" (query encoder only; documents stay the parent's)." if s["query_side"] else "."),
              f"Verified: {'PASS' if s['verified'] else 'FAIL (see verify.txt)'}. Wall times (s): "
              + ", ".join(f"{k[:-2]} {v}" for k, v in s["wall_s"].items()), ""]
    return "\n".join(lines)
