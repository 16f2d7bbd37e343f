"""Paired per-query nDCG@10 differences between `effir eval` runs on the same BEIR split, with a bootstrap interval.

    python benchmarks/paired_ndcg.py --data DIR --base EVAL_FP32/run.trec --run EVAL_INT8/run.trec [--run ...]

For each --run: the mean difference to --base over the judged queries, its 95 % bootstrap interval (10,000
resamples of the queries, seeded), and how many queries moved up or down. nDCG@10 per query comes from
`effir.metrics.per_query`, what `effir eval` averages.
"""

import argparse

import ir_measures
import numpy as np

from effir.data import load_beir
from effir.metrics import per_query

ap = argparse.ArgumentParser()
ap.add_argument("--data", required=True, help="the BEIR folder both runs were evaluated on")
ap.add_argument("--split", default="test")
ap.add_argument("--base", required=True, help="run.trec of the reference evaluation")
ap.add_argument("--run", action="append", required=True, help="run.trec of an evaluation to compare")
ap.add_argument("--resamples", type=int, default=10_000)
a = ap.parse_args()


def ndcg10(path: str) -> dict[str, float]:
    run: dict[str, dict[str, float]] = {}
    for doc in ir_measures.read_trec_run(path):
        run.setdefault(doc.query_id, {})[doc.doc_id] = doc.score
    return {q: m["nDCG@10"] for q, m in per_query(qrels, run, ("nDCG@10",)).items()}


qrels = load_beir(a.data, a.split, progress=False).qrels
base = ndcg10(a.base)
queries = sorted(base)
print(f"base {a.base}: nDCG@10 {np.mean([base[q] for q in queries]):.4f} over {len(queries)} queries")
for path in a.run:
    rng = np.random.default_rng(0)  # the same resamples for every run, whatever the order of --run
    got = ndcg10(path)
    diff = np.array([got.get(q, 0.0) - base[q] for q in queries])
    means = diff[rng.integers(0, len(diff), (a.resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    print(f"{path}: {diff.mean():+.4f} (95 % interval {low:+.4f} .. {high:+.4f}); "
          f"queries up {int((diff > 0).sum())}, down {int((diff < 0).sum())}")
