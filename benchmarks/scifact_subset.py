"""Write a reduced SciFact test folder for quick CPU evaluation: every test-positive document + N random others.

    python benchmarks/scifact_subset.py /work/shared/data/scifact /tmp/scifact-small --others 1000 --seed 0

The queries and qrels/test.tsv are copied unchanged; only corpus.jsonl shrinks. Numbers measured on it are NOT
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
a = ap.parse_args()
src, dst = Path(a.src), Path(a.dst)
(dst / "qrels").mkdir(parents=True, exist_ok=True)
positives = {line.split("\t")[1] for line in (src / "qrels" / "test.tsv").read_text().splitlines()[1:] if line}
docs = [json.loads(line) for line in open(src / "corpus.jsonl")]
others = [d for d in docs if d["_id"] not in positives]
keep = positives | {d["_id"] for d in random.Random(a.seed).sample(others, a.others)}
with open(dst / "corpus.jsonl", "w") as f:
    for d in docs:
        if d["_id"] in keep:
            f.write(json.dumps(d) + "\n")
shutil.copy(src / "queries.jsonl", dst / "queries.jsonl")
shutil.copy(src / "qrels" / "test.tsv", dst / "qrels" / "test.tsv")
print(f"{dst}: {len(keep)} documents ({len(positives)} test positives + {a.others} others)")
