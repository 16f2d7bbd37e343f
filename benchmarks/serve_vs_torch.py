"""What EffiR and int8 each buy, and both together: nDCG@10 and encoding speed of served variants, in one run.

    python benchmarks/serve_vs_torch.py --data XS --out OUT \
        --model original=DIR_A --model effir=DIR_B [--variants torch-none,onnx-int8,openvino-int8,torch-int8]

Every DIR is a folder written by ``effir export DIR_SRC --format onnx --int8`` (and ``--format openvino --int8`` into
the same folder's ``openvino/`` for the openvino variants: export twice and copy, or export openvino alone). For
each (model, variant): ``effir eval`` on --data (nDCG@10), then all variants are timed *interleaved* in one process
(round robin over the variants, each call a pre-tokenized batch of real queries or documents, so the load on the
machine hits them alike); speed-ups are against the first model's first variant (the fp32 torch original).
Writes OUT/serve.json and OUT/serve.md.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from effir import serving
from effir.checkpoint import load
from effir.cli import main
from effir.data import load_beir

ap = argparse.ArgumentParser()
ap.add_argument("--data", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--model", action="append", required=True, help="NAME=EXPORTED_DIR, the reference first")
ap.add_argument("--variants", default="torch-none,onnx-int8")
ap.add_argument("--query-batch", type=int, default=32)
ap.add_argument("--doc-batch", type=int, default=8)
ap.add_argument("--rounds", type=int, default=6)
ap.add_argument("--threads", type=int, default=None)
ap.add_argument("--no-eval", action="store_true",
                help="time only: nDCG@10 from OUT/eval/NAME-VARIANT/results.json where present, else '-'")
a = ap.parse_args()
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
if a.threads:
    torch.set_num_threads(a.threads)
models = dict(m.split("=", 1) for m in a.model)
variants = [tuple(v.split("-")) for v in a.variants.split(",")]

rows = {}
for name, folder in models.items():
    for backend, quantize in variants:
        key = f"{name} {backend}-{quantize}"
        ev = out / "eval" / f"{name}-{backend}-{quantize}"
        if a.no_eval and not (ev / "results.json").exists():
            rows[key] = {"ndcg@10": None}
            continue
        if not (ev / "results.json").exists():
            assert main(["eval", folder, "--data", a.data, "--output", str(ev), "--backend", backend, "--quantize",
                         quantize, "--device", "cpu", "--dtype", "fp32", "--no-cache", "--overwrite"]) == 0
        r = json.loads((ev / "results.json").read_text())
        rows[key] = {"ndcg@10": r["metrics"]["nDCG@10"], "size": r["size"]}

data = load_beir(a.data, "test", progress=False)
queries = list(data.queries.values())[: a.query_batch]
docs = list(data.corpus.values())[: a.doc_batch]
encoders, batches = {}, {}
for name, folder in models.items():
    for backend, quantize in variants:
        key = f"{name} {backend}-{quantize}"
        enc = load(folder, device="cpu", dtype="fp32", padding_side="right")
        encoders[key] = serving.apply_variant(enc, backend, quantize, a.threads)
        rows[key].setdefault("size", serving.size_report(encoders[key]))
        batches[key] = {"query": enc.tokenize(queries, "query"), "document": enc.tokenize(docs, "document")}
times = {k: {"query": [], "document": []} for k in encoders}
with torch.inference_mode():
    for k, enc in encoders.items():  # warm-up
        for side in ("query", "document"):
            enc.embed(**batches[k][side])
    for r in range(a.rounds):
        order = list(encoders) if r % 2 == 0 else list(encoders)[::-1]
        for side in ("query", "document"):
            for k in order:
                t0 = time.perf_counter()
                encoders[k].embed(**batches[k][side])
                times[k][side].append(time.perf_counter() - t0)
ref = next(iter(encoders))
for k in encoders:
    for side in ("query", "document"):
        med = statistics.median(times[k][side])
        rows[k][f"{side}_ms"] = 1e3 * med
        rows[k][f"{side}_speedup"] = statistics.median(times[ref][side]) / med
result = {"data": a.data, "models": models, "threads": torch.get_num_threads(), "query_batch": a.query_batch,
          "doc_batch": a.doc_batch, "rounds": a.rounds, "reference": ref, "rows": rows,
          "doc_tokens": int(batches[ref]["document"]["attention_mask"].shape[1])}
(out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
lines = ["| model | runtime | nDCG@10 | parameters | 16-bit MB | stored MB | query ms | speed-up | document ms | speed-up |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
for k, r in rows.items():
    name, variant = k.split(" ")
    s = r["size"]
    ndcg = "-" if r["ndcg@10"] is None else f"{r['ndcg@10']:.4f}"
    lines.append(f"| {name} | {variant} | {ndcg} | {s['parameters']:,} | {s['bytes_16bit'] / 1e6:.1f} | "
                 f"{s['bytes_stored'] / 1e6:.1f} | {r['query_ms']:.1f} | {r['query_speedup']:.2f}x | "
                 f"{r['document_ms']:.1f} | {r['document_speedup']:.2f}x |")
(out / "serve.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
