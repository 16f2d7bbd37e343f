"""Exact top-k search by chunked matmul, in bounded memory (pure torch).

The corpus arrives in chunks (as it is encoded, or read from a memory-mapped cache); :class:`TopK` keeps the best
``k`` documents per query seen so far, so neither the full score matrix nor the whole corpus is ever held at once.
Memory per step is ``query_chunk x (k + corpus_chunk)`` scores.
"""

from __future__ import annotations

import torch


class TopK:
    """Running exact top-``k`` (inner product) of ``queries`` over corpus chunks added with :meth:`add`.

    Args:
        queries: ``(Q, H)`` query embeddings; the matmuls run on their device and in their dtype.
        k: how many documents to keep per query.
        exclude: ``(Q,)`` global document index each query must never retrieve (BEIR ignores a document whose id
            equals the query id), ``-1`` for none.
        query_chunk: queries scored per matmul (bounds the ``(query_chunk, corpus_chunk)`` score block).
        cosine: score by cosine similarity (queries and documents L2-normalised first) instead of inner product;
            the same when the embeddings are normalised already.
    """

    def __init__(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None, query_chunk: int = 1024,
                 cosine: bool = False):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.cosine = cosine
        self.queries = _unit(queries) if cosine else queries
        self.k = k
        self.query_chunk = query_chunk
        n = queries.shape[0]
        self.exclude = exclude.to(queries.device) if exclude is not None else None
        self.scores = torch.full((n, 0), float("-inf"), device=queries.device)  # (Q, <=k) best so far
        self.indices = torch.full((n, 0), -1, dtype=torch.long, device=queries.device)
        self.seen = 0

    def add(self, docs: torch.Tensor, offset: int | None = None) -> None:
        """Score the ``(C, H)`` chunk ``docs`` whose first row is global document ``offset`` (default: next)."""
        offset = self.seen if offset is None else offset
        docs = docs.to(device=self.queries.device, dtype=self.queries.dtype)
        if self.cosine:
            docs = _unit(docs)
        n_docs = docs.shape[0]
        self.seen = max(self.seen, offset + n_docs)
        new_scores, new_indices = [], []
        for start in range(0, self.queries.shape[0], self.query_chunk):
            q = self.queries[start:start + self.query_chunk]
            block = (q @ docs.T).float()  # (q, C)
            if self.exclude is not None:
                local = self.exclude[start:start + self.query_chunk] - offset  # (q,)
                rows = torch.nonzero((local >= 0) & (local < n_docs)).squeeze(1)
                block[rows, local[rows]] = float("-inf")
            cand_scores = torch.cat([self.scores[start:start + self.query_chunk], block], dim=1)
            cand_indices = torch.cat([
                self.indices[start:start + self.query_chunk],
                torch.arange(offset, offset + n_docs, device=block.device).expand(block.shape[0], -1)], dim=1)
            top = torch.topk(cand_scores, min(self.k, cand_scores.shape[1]), dim=1)
            new_scores.append(top.values)
            new_indices.append(torch.gather(cand_indices, 1, top.indices))
        self.scores = torch.cat(new_scores)
        self.indices = torch.cat(new_indices)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, indices)``, each ``(Q, min(k, docs seen))``, best first; excluded slots have index ``-1``."""
        indices = self.indices.masked_fill(torch.isinf(self.scores) & (self.scores < 0), -1)
        return self.scores, indices


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1).to(x.dtype)


def exact_search(queries: torch.Tensor, corpus: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
                 corpus_chunk: int = 50_000, query_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` inner-product search of ``queries`` ``(Q, H)`` over ``corpus`` ``(N, H)``, chunk by chunk.

    ``corpus`` may be anything sliceable into tensors or arrays (a tensor, a numpy memmap). Returns ``(scores,
    indices)`` as :meth:`TopK.result` does.
    """
    top = TopK(queries, k, exclude=exclude, query_chunk=query_chunk)
    for start in range(0, len(corpus), corpus_chunk):
        chunk = corpus[start:start + corpus_chunk]
        # torch.tensor copies: numpy memmaps are read-only
        top.add(chunk if isinstance(chunk, torch.Tensor) else torch.tensor(chunk), offset=start)
    return top.result()
