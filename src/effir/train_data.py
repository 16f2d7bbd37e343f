"""Training data for retrieval fine-tuning: sources, hard-negative mining, teacher scores, FlagEmbedding jsonl.

Sources (:func:`load_training_data`):
- a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``): positives from the qrels (score > 0);
  negatives are mined (:func:`mine_dense`, :func:`mine_bm25`) or drawn at random (:func:`random_negatives`);
- Tevatron jsonl: ``query_id``, ``query``, ``positive_passages`` / ``negative_passages`` (``[{docid, title, text}]``);
- FlagEmbedding jsonl: ``query``, ``pos``, ``neg`` and optionally ``pos_scores``, ``neg_scores``, ``prompt``.

Everything becomes a list of :class:`TrainExample`; :func:`write_flag_jsonl` writes them back as FlagEmbedding jsonl
(teacher scores included) so mined data can be reused. Documents are plain strings (BEIR: ``title + " " + text``).
A FlagEmbedding ``prompt`` is kept and written back, but training formats queries with the model's own query
template (``EmbeddingSettings.query_template``), so the saved model embeds exactly as it was trained.

Teachers (:func:`dense_teacher_scores`, :func:`cross_encoder_scores`) score each query's candidates once; the
caller caches the result as FlagEmbedding jsonl. This module imports no ``transformers``: a cross-encoder arrives
as an already-loaded model and tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import read_jsonl
from .encoder import Encoder, document_text
from .files import atomic_path
from .search import exact_search
from .utils import EffirError


@dataclass
class TrainExample:
    """One training query with its candidates. ``*_ids`` are BEIR doc ids or text hashes (used for exclusion)."""

    query: str
    pos: list[str]
    neg: list[str] = field(default_factory=list)
    pos_ids: list[str] = field(default_factory=list)
    neg_ids: list[str] = field(default_factory=list)
    pos_scores: list[float] | None = None
    neg_scores: list[float] | None = None
    prompt: str | None = None
    query_id: str | None = None

    def to_flag(self) -> dict:
        row = {"query": self.query, "pos": self.pos, "neg": self.neg}
        if self.pos_scores is not None and self.neg_scores is not None:
            row["pos_scores"], row["neg_scores"] = self.pos_scores, self.neg_scores
        if self.prompt:
            row["prompt"] = self.prompt
        if self.query_id is not None:
            row["query_id"] = self.query_id
        if self.pos_ids:
            row["pos_ids"], row["neg_ids"] = self.pos_ids, self.neg_ids
        return row


def text_id(text: str) -> str:
    """A stable id for a passage that came without one (FlagEmbedding data)."""
    return "h" + hashlib.sha1(text.encode()).hexdigest()[:16]


# -- sources --------------------------------------------------------------------------------------------------------
def load_training_data(ref: str | os.PathLike, split: str = "train") -> tuple[list[TrainExample], dict[str, str]]:
    """Read a BEIR folder (``split``), a Tevatron jsonl or a FlagEmbedding jsonl.

    Returns:
        ``(examples, corpus)``: ``corpus`` maps doc id -> document text, the pool negatives are mined from (BEIR:
        the whole corpus; jsonl: every passage in the file).

    Raises:
        EffirError: unreadable input, unknown jsonl layout, or no example with a positive.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        examples, corpus = _from_beir(path, split)
    elif path.is_file() and path.suffix in (".jsonl", ".json"):
        examples, corpus = _from_jsonl(path)
    else:
        raise EffirError(f"training data {ref!r} not found: pass a BEIR folder, a Tevatron jsonl or a FlagEmbedding "
                         "jsonl (.jsonl)")
    if not examples:
        raise EffirError(f"{ref}: no training query has a positive document (BEIR: qrels/{split}.tsv needs scores "
                         "> 0; jsonl: non-empty pos / positive_passages)")
    return examples, corpus


def _from_beir(folder: Path, split: str) -> tuple[list[TrainExample], dict[str, str]]:
    from .data import load_beir

    data = load_beir(folder, split)
    corpus = {doc_id: document_text(doc) for doc_id, doc in data.corpus.items()}
    examples = []
    for qid, query in data.queries.items():
        pos_ids = [d for d, s in data.qrels.get(qid, {}).items() if s > 0 and d in corpus]
        if pos_ids:
            examples.append(TrainExample(query=query, pos=[corpus[d] for d in pos_ids], pos_ids=pos_ids,
                                         query_id=qid))
    return examples, corpus


def _from_jsonl(path: Path) -> tuple[list[TrainExample], dict[str, str]]:
    examples, corpus = [], {}
    for lineno, row in read_jsonl(path, "pass a BEIR folder, a Tevatron or a FlagEmbedding jsonl"):
        if "positive_passages" in row:
            ex = _tevatron_row(row, path, lineno)
        elif "pos" in row and "query" in row:
            ex = _flag_row(row, path, lineno)
        else:
            raise EffirError(f"{path}:{lineno}: unknown layout (keys {sorted(row)}); expected FlagEmbedding "
                             "(query, pos, neg) or Tevatron (query_id, query, positive_passages)")
        for ids, texts in ((ex.pos_ids, ex.pos), (ex.neg_ids, ex.neg)):
            corpus.update(zip(ids, texts, strict=True))
        if ex.pos:
            examples.append(ex)
    return examples, corpus


def _tevatron_row(row: dict, path: Path, lineno: int) -> TrainExample:
    def passages(key):
        items = row.get(key) or []
        if not isinstance(items, list):
            raise EffirError(f"{path}:{lineno}: {key} must be a list of {{docid, title, text}}")
        texts = [document_text(p) for p in items]
        ids = [str(p["docid"]) if p.get("docid") is not None else text_id(t)
               for p, t in zip(items, texts, strict=True)]
        return texts, ids

    pos, pos_ids = passages("positive_passages")
    neg, neg_ids = passages("negative_passages")
    qid = row.get("query_id")
    return TrainExample(query=str(row.get("query", "")), pos=pos, neg=neg, pos_ids=pos_ids, neg_ids=neg_ids,
                        query_id=None if qid is None else str(qid))


def _flag_row(row: dict, path: Path, lineno: int) -> TrainExample:
    pos, neg = row.get("pos") or [], row.get("neg") or []
    if not all(isinstance(t, str) for t in pos + neg):
        raise EffirError(f"{path}:{lineno}: pos and neg must be lists of strings")
    ps, ns = row.get("pos_scores"), row.get("neg_scores")
    if (ps is None) != (ns is None) or (ps is not None and (len(ps) != len(pos) or len(ns) != len(neg))):
        raise EffirError(f"{path}:{lineno}: pos_scores/neg_scores must both be present with one score per passage")
    pos_ids = row.get("pos_ids") or [text_id(t) for t in pos]
    neg_ids = row.get("neg_ids") or [text_id(t) for t in neg]
    if len(pos_ids) != len(pos) or len(neg_ids) != len(neg):
        raise EffirError(f"{path}:{lineno}: pos_ids/neg_ids must have one id per passage")
    return TrainExample(query=row["query"], pos=list(pos), neg=list(neg), pos_ids=[str(i) for i in pos_ids],
                        neg_ids=[str(i) for i in neg_ids], pos_scores=ps, neg_scores=ns, prompt=row.get("prompt"),
                        query_id=None if row.get("query_id") is None else str(row["query_id"]))


def write_flag_jsonl(examples: list[TrainExample], path: str | os.PathLike) -> Path:
    """Write ``examples`` as FlagEmbedding jsonl (atomically: tmp file + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_flag(), ensure_ascii=False) + "\n")
    return path


# -- negatives ------------------------------------------------------------------------------------------------------
def _pick(ranked_ids: list[str], positives: set[str], lo: int, hi: int, n: int, rng: random.Random) -> list[str]:
    """``n`` ids drawn from ranks ``lo..hi-1`` (0-based) of ``ranked_ids`` after removing every positive."""
    pool = [d for d in ranked_ids if d not in positives][lo:hi]
    chosen = sorted(rng.sample(range(len(pool)), min(n, len(pool))))
    return [pool[i] for i in chosen]


def _attach(examples, ranked: list[list[str]], corpus, lo, hi, n, seed) -> list[TrainExample]:
    rng = random.Random(seed)
    for ex, ids in zip(examples, ranked, strict=True):
        positives = set(ex.pos_ids) | {text_id(t) for t in ex.pos}
        pos_texts = set(ex.pos)
        ids = [d for d in ids if corpus[d] not in pos_texts]  # a duplicate of a positive under another id
        ex.neg_ids = _pick(ids, positives, lo, hi, n, rng)
        ex.neg = [corpus[d] for d in ex.neg_ids]
        ex.pos_scores = ex.neg_scores = None  # new candidates: old teacher scores no longer apply
    return examples


def mine_dense(examples: list[TrainExample], corpus: dict[str, str], encoder: Encoder, rank_range=(10, 100),
               num_negatives: int = 7, seed: int = 0, batch_size: int = 32, show_progress: bool = False):
    """Replace each example's negatives by ``num_negatives`` documents drawn at random from ranks
    ``rank_range = (lo, hi)`` (0-based, hi exclusive) of ``encoder``'s retrieval over ``corpus``, counted after
    every positive is removed. Positives are never chosen (matched by id *and* by text)."""
    lo, hi = _check_range(rank_range, num_negatives)
    ids = list(corpus)
    docs = encoder.encode([corpus[d] for d in ids], "document", batch_size, show_progress, desc="mine: documents")
    queries = encoder.encode([ex.query for ex in examples], "query", batch_size, show_progress, desc="mine: queries")
    k = min(len(ids), hi + max(len(ex.pos) for ex in examples))
    _, idx = exact_search(queries.to(docs.dtype), docs, k)  # (Q, k)
    ranked = [[ids[i] for i in row if i >= 0] for row in idx.tolist()]
    return _attach(examples, ranked, corpus, lo, hi, num_negatives, seed)


def mine_bm25(examples: list[TrainExample], corpus: dict[str, str], rank_range=(10, 100), num_negatives: int = 7,
              seed: int = 0):
    """As :func:`mine_dense`, ranked by BM25 (the ``bm25s`` library, English stop words)."""
    try:
        import bm25s
    except ImportError:
        raise EffirError("BM25 mining needs the bm25s package: pip install bm25s") from None
    lo, hi = _check_range(rank_range, num_negatives)
    ids = list(corpus)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([corpus[d] for d in ids], stopwords="en", show_progress=False),
                    show_progress=False)
    k = min(len(ids), hi + max(len(ex.pos) for ex in examples))
    tokens = bm25s.tokenize([ex.query for ex in examples], stopwords="en", show_progress=False)
    idx, _ = retriever.retrieve(tokens, k=k, show_progress=False)
    ranked = [[ids[int(i)] for i in row] for row in idx]
    return _attach(examples, ranked, corpus, lo, hi, num_negatives, seed)


def random_negatives(examples: list[TrainExample], corpus: dict[str, str], num_negatives: int = 7, seed: int = 0):
    """Fill each example up to ``num_negatives`` negatives with random non-positive documents of ``corpus``."""
    rng = random.Random(seed)
    ids = list(corpus)
    for ex in examples:
        banned = set(ex.pos_ids) | set(ex.neg_ids) | set(ex.pos)
        tries = 0
        while len(ex.neg) < num_negatives and tries < 50 * num_negatives:
            d = ids[rng.randrange(len(ids))]
            tries += 1
            if d not in banned and corpus[d] not in banned:
                banned.add(d)
                ex.neg.append(corpus[d])
                ex.neg_ids.append(d)
                if ex.neg_scores is not None:
                    ex.pos_scores = ex.neg_scores = None
    return examples


NEGATIVES = ("auto", "data", "bm25", "dense", "random")
"""Where hard negatives come from (:func:`prepare_negatives`)."""
MINED_BY_MODEL = ("dense",)
"""The sources of :data:`NEGATIVES` that need a ``miner`` model."""


def prepare_negatives(examples: list[TrainExample], corpus: dict[str, str], how: str, num_negatives: int,
                      rank_range=(10, 100), seed: int = 0, miner: Encoder | None = None, batch_size: int = 32,
                      show_progress: bool = False) -> list[TrainExample]:
    """Give every example ``num_negatives`` negatives, in place.

    ``how``: ``data`` keeps the data's own negatives; ``bm25`` / ``dense`` replace them by documents mined with BM25
    or with ``miner`` (ranks ``rank_range``); ``random`` replaces them by random documents; ``auto`` is ``data``
    when every example has enough negatives, else ``bm25``. Short lists are then topped up at random; a corpus too
    small to fill them is left for :func:`check_negatives` to report.
    """
    if how == "auto":
        how = "data" if all(len(ex.neg) >= num_negatives for ex in examples) else "bm25"
    if how == "random":
        for ex in examples:
            ex.neg, ex.neg_ids = [], []
            ex.pos_scores = ex.neg_scores = None  # new candidates: old teacher scores no longer apply
    elif how == "bm25":
        mine_bm25(examples, corpus, rank_range, num_negatives, seed=seed)
    elif how == "dense":
        mine_dense(examples, corpus, miner, rank_range, num_negatives, seed, batch_size, show_progress)
    return random_negatives(examples, corpus, num_negatives, seed=seed)


def check_negatives(examples: list[TrainExample], num_negatives: int) -> None:
    """Raises :class:`EffirError` when an example has fewer than ``num_negatives`` negatives."""
    short = sum(len(ex.neg) < num_negatives for ex in examples)
    if short:
        raise EffirError(f"{short} training queries have fewer than --num-negatives {num_negatives} negatives "
                         "(the corpus is too small); lower --num-negatives")


def _check_range(rank_range, num_negatives: int) -> tuple[int, int]:
    lo, hi = int(rank_range[0]), int(rank_range[1])
    if lo < 0 or hi <= lo:
        raise EffirError(f"mining rank range {lo}-{hi} is empty; use LO-HI with 0 <= LO < HI, e.g. 10-100")
    if hi - lo < num_negatives:
        raise EffirError(f"mining rank range {lo}-{hi} holds fewer than --num-negatives {num_negatives} documents")
    return lo, hi


def parse_rank_range(text: str) -> tuple[int, int]:
    """``"10-100"`` -> ``(10, 100)``."""
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise EffirError(f"rank range {text!r} is not LO-HI (e.g. 10-100)") from None
    return lo, hi


# -- teachers -------------------------------------------------------------------------------------------------------
def candidates(ex: TrainExample) -> list[str]:
    return ex.pos + ex.neg


def _set_scores(ex: TrainExample, scores: list[float]) -> None:
    ex.pos_scores, ex.neg_scores = scores[:len(ex.pos)], scores[len(ex.pos):]


def dense_teacher_scores(examples: list[TrainExample], teacher: Encoder, batch_size: int = 32,
                         show_progress: bool = False) -> list[TrainExample]:
    """Score every example's candidates (positives + negatives) by cosine with ``teacher``, in place."""
    queries = teacher.encode([ex.query for ex in examples], "query", batch_size, show_progress, desc="teacher: queries")
    flat = [c for ex in examples for c in candidates(ex)]
    docs = teacher.encode(flat, "document", batch_size, show_progress, desc="teacher: documents")
    start = 0
    for i, ex in enumerate(examples):
        n = len(ex.pos) + len(ex.neg)
        _set_scores(ex, (docs[start:start + n] @ queries[i]).tolist())
        start += n
    return examples


@torch.inference_mode()
def cross_encoder_scores(examples: list[TrainExample], model, tokenizer, batch_size: int = 32, max_length: int = 512,
                         show_progress: bool = False) -> list[TrainExample]:
    """Score every (query, candidate) pair once with a sequence-classification reranker, in place.

    ``model`` is an ``AutoModelForSequenceClassification``-style module returning ``logits`` ``(B, 1)`` (or ``(B, 2)``,
    where the last column is the relevance logit).
    """
    from tqdm.auto import tqdm

    pairs = [(ex.query, c) for ex in examples for c in candidates(ex)]
    device = next(model.parameters()).device
    model.eval()
    scores: list[float] = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="teacher: rerank", disable=not show_progress,
                      leave=False):
        chunk = pairs[start:start + batch_size]
        batch = tokenizer([q for q, _ in chunk], [d for _, d in chunk], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        logits = model(**batch).logits.float()  # (b, 1) or (b, 2)
        scores.extend(logits[:, -1].cpu().tolist())
    start = 0
    for ex in examples:
        n = len(ex.pos) + len(ex.neg)
        _set_scores(ex, scores[start:start + n])
        start += n
    return examples
