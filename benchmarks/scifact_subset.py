"""Write a reduced SciFact test folder for quick CPU evaluation: every test-positive document + N random others.

    python benchmarks/scifact_subset.py /work/shared/data/scifact /tmp/scifact-small --others 1000 --seed 0

queries.jsonl is copied; qrels/test.tsv keeps the chosen queries (--queries N: a seeded random N, default all). Numbers measured on it are NOT
comparable with full-corpus SciFact figures (fewer distractors -> higher nDCG@10).
"""

import argparse
import json
import random
import shutil
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("src")
ap.add_argument("dst")
ap.add_argument("--others", type=int, default=1000)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--queries", type=int, default=0, help="keep only this many test queries (random, seeded); 0: all")
a = ap.parse_args()
src, dst = Path(a.src), Path(a.dst)
(dst / "qrels").mkdir(parents=True, exist_ok=True)
qrels = [line.split("\t") for line in (src / "qrels" / "test.tsv").read_text().splitlines()[1:] if line]
if a.queries:
    qids = sorted({q for q, _, _ in qrels})
    keep_q = set(random.Random(a.seed).sample(qids, min(a.queries, len(qids))))
    qrels = [row for row in qrels if row[0] in keep_q]
positives = {d for _, d, _ in qrels}
docs = [json.loads(line) for line in open(src / "corpus.jsonl")]
others = [d for d in docs if d["_id"] not in positives]
keep = positives | {d["_id"] for d in random.Random(a.seed).sample(others, a.others)}
with open(dst / "corpus.jsonl", "w") as f:
    for d in docs:
        if d["_id"] in keep:
            f.write(json.dumps(d) + "\n")
shutil.copy(src / "queries.jsonl", dst / "queries.jsonl")
(dst / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in qrels))
print(f"{dst}: {len(keep)} documents ({len(positives)} test positives + {a.others} others)")
