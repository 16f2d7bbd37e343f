"""A retrieval data set built from package-shipped prose, so the whole pipeline runs with no download.

Inverse cloze task (ICT, Lee et al. 2019): cut Wikipedia articles into passages, take one sentence of a passage as
the query and the passage *without* that sentence as its only relevant document. Train and test queries come from
disjoint articles; the corpus holds the passages of both, so test retrieval also has to reject train passages.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from .files import atomic_path
from .utils import EffirError

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str) -> list[str]:
    """The sentences of one paragraph of prose."""
    return [s for s in _SENTENCE.split(text.strip()) if s.strip()]


def passages(article: str, words: int) -> list[list[str]]:
    """Split an article into passages of about ``words`` words, each a list of whole sentences."""
    out, current, count = [], [], 0
    for paragraph in article.split("\n"):
        for sentence in _SENTENCE.split(paragraph.strip()):
            if not sentence:
                continue
            current.append(sentence)
            count += len(sentence.split())
            if count >= words:
                out.append(current)
                current, count = [], 0
    if count >= words // 2:
        out.append(current)
    return out


def build_ict_beir(articles: list[str], out: str | os.PathLike, train_queries: int = 400, test_queries: int = 100,
                   passage_words: int = 64, max_passages: int = 1200, test_fraction: float = 0.3,
                   seed: int = 0) -> Path:
    """Write a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/{train,test}.tsv``) built by ICT.

    Raises:
        EffirError: the articles hold too few usable passages for the requested numbers of queries.
    """
    rng = random.Random(seed)
    order = list(range(len(articles)))
    rng.shuffle(order)
    n_test_articles = max(1, round(test_fraction * len(order)))
    splits = {"test": order[:n_test_articles], "train": order[n_test_articles:]}
    per_split_cap = {"test": round(max_passages * test_fraction), "train": max_passages}
    corpus, queries, qrels = [], [], {"train": [], "test": []}
    wanted = {"train": train_queries, "test": test_queries}
    for split, idx in splits.items():
        pool = [(a, p) for a in idx for p in passages(articles[a], passage_words)]
        rng.shuffle(pool)
        pool = pool[: per_split_cap[split]]
        usable = [i for i, (_, p) in enumerate(pool) if len(p) >= 3 and _query_candidates(p)]
        if len(usable) < wanted[split]:
            raise EffirError(f"only {len(usable)} usable {split} passages for {wanted[split]} queries; "
                             "lower the number of queries or use more text")
        chosen = set(rng.sample(usable, wanted[split]))
        for i, (article, sentences) in enumerate(pool):
            doc_id = f"{split[:2]}{article:03d}-{i:04d}"
            if i in chosen:
                q = rng.choice(_query_candidates(sentences))
                sentences = [s for s in sentences if s != q]
                qid = f"q-{doc_id}"
                queries.append({"_id": qid, "text": q})
                qrels[split].append((qid, doc_id))
            corpus.append({"_id": doc_id, "title": "", "text": " ".join(sentences)})
    return _write(out, corpus, queries, qrels)


def _query_candidates(sentences: list[str]) -> list[str]:
    return [s for s in sentences if 6 <= len(s.split()) <= 30]


def _write(out, corpus, queries, qrels) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        (tmp / "qrels").mkdir(parents=True)
        (tmp / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
        (tmp / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
        for split, pairs in qrels.items():
            lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t1" for q, d in pairs]
            (tmp / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return out
