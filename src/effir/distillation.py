"""Label-free distillation from a parent retriever: the texts it learns from, its losses, and the training
micro-batches that `effir distill` (and `effir slim`'s gates, without labels) run through effir.training.

Texts come from sources without labels (``wiki``, ``.txt``, ``.jsonl``, ``beir:DIR``): documents longer than a
passage are cut into passages of whole sentences; query-side texts are a source's queries, or one sentence of each
passage when it has none. The loss is the distance between the student's and the parent's embeddings of the same
texts (cosine or MSE, both sides) plus, optionally, the distance between their block outputs on the same tokens (the
residual stream after each block: effir's cuts keep every block and the residual width, so each block of the student
has its counterpart in the parent) and the KL between their in-batch similarity distributions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import training
from .arch import layer_list
from .calibration import load_texts, sample_texts
from .encoder import Encoder
from .losses import embedding_match, gather_with_grad, hidden_match, similarity_kl
from .synthetic import passages, split_sentences
from .utils import EffirError


@dataclass(frozen=True)
class Texts:
    """What the student learns from: query-side and document-side texts, and a short key of both."""

    queries: list[str]
    documents: list[str]

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps([self.queries, self.documents]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Loss:
    """The distillation loss's options (module docstring): embedding distance kind and weight, KL weight and
    temperatures, block-output distance weight and kind (:func:`effir.losses.hidden_match`)."""

    embedding: str
    embedding_weight: float
    kl_weight: float
    temperature: float
    teacher_temperature: float
    hidden_weight: float = 0.0
    hidden: str = "cosine"


def read_texts(sources: list[str], passage_words: int, max_texts: int | None, seed: int) -> Texts:
    """Query-side and document-side texts from ``sources`` (see the module docstring), deduplicated, in order.

    Raises:
        EffirError: a source is missing or empty (``load_texts``), or the sources hold fewer than 2 texts a side.
    """
    queries, documents = [], []
    for source in sources:
        found = load_texts(source)
        own = [p for text in found.documents for p in split_passages(text, passage_words)]
        documents += own
        has_queries = found.queries is not found.documents and found.queries != found.documents
        queries += found.queries if has_queries else pseudo_queries(own, seed)
    queries, documents = list(dict.fromkeys(queries)), list(dict.fromkeys(documents))
    if max_texts:
        queries, documents = sample_texts(queries, max_texts, seed), sample_texts(documents, max_texts, seed + 1)
    if len(queries) < 2 or len(documents) < 2:
        raise EffirError(f"text source(s) {' '.join(sources)} hold {len(queries)} query-side and {len(documents)} "
                         "document-side texts; distillation needs at least 2 of each: give more text")
    return Texts(queries, documents)


def split_passages(text: str, words: int) -> list[str]:
    """``text`` itself when it has at most ``words`` words, else its passages of about ``words`` words."""
    if len(text.split()) <= words:
        return [text.strip()] if text.strip() else []
    return [" ".join(sentences) for sentences in passages(text, words)] or [text.strip()]


def pseudo_queries(documents: list[str], seed: int) -> list[str]:
    """One sentence of each document (of 4 to 40 words where it has one) as a query-side text."""
    rng, out = random.Random(seed), []
    for doc in documents:
        sentences = split_sentences(doc)
        fitting = [s for s in sentences if 4 <= len(s.split()) <= 40]
        pick = rng.choice(fitting or sentences or [doc])
        out.append(" ".join(pick.split()[:40]))
    return out


def micro_batches(acc, student: Encoder, texts: Texts, targets: dict, loss: Loss, *, batch_size: int, grad_accum: int,
                  per_epoch: dict, seed: int, query_side: bool = False, parent: Encoder | None = None,
                  penalty: Callable[[], torch.Tensor] | None = None) -> training.MicroBatch:
    """The :data:`effir.training.MicroBatch` of distillation: each side's texts in their own seeded order, the
    student's embeddings against ``targets`` (the parent's, ``{"query": (Nq, H), "document": (Nd, H)}``); queries
    only with ``query_side``; with ``loss.hidden_weight``, the student's block outputs against those of ``parent``
    (frozen, run on the same tokens each step); ``penalty()`` (slim's l0 term) added and logged when given."""
    perms = {"query": {}, "document": {}}
    items = {"query": texts.queries, "document": texts.documents}
    forward = student_pass(acc, student, parent if loss.hidden_weight else None, loss.hidden)

    def indices(side: str, step: int, micro: int):
        return training.batch_indices(len(items[side]), step, micro, batch_size=batch_size,
                                      grad_accum=grad_accum, world=acc.num_processes, rank=acc.process_index,
                                      per_epoch=per_epoch[side], seed=seed + (side == "document"),
                                      perms=perms[side])

    def tokenized(side: str, idx: list[int]) -> dict:
        return {k: v.to(acc.device) for k, v in student.tokenize([items[side][i] for i in idx], side).items()}

    def micro_batch(step: int, micro: int):
        total, parts, epoch = (query_side_micro_batch if query_side else both_sides)(step, micro)
        if penalty is not None:
            extra = penalty()
            total, parts["penalty"] = total + extra, extra.detach()
        return total, parts, epoch

    def both_sides(step: int, micro: int):
        _, qi = indices("query", step, micro)
        epoch, di = indices("document", step, micro)
        q_batch, d_batch = tokenized("query", qi), tokenized("document", di)
        (sq, hq), (sd, hd) = forward(q_batch), forward(d_batch)
        tq, td = targets["query"][qi].to(acc.device), targets["document"][di].to(acc.device)
        total, parts = distillation_loss(sq.float(), sd.float(), tq, td, loss, offset=acc.process_index * len(di))
        if hq is not None:
            total, parts = add_hidden(total, parts, 0.5 * (hq + hd), loss)
        tokens = int(q_batch["attention_mask"].sum() + d_batch["attention_mask"].sum())
        parts.update(doc_cos=training.mean_pairwise_cosine(sd.detach()),
                     tokens=torch.tensor(float(tokens), device=acc.device))
        return total, parts, epoch

    def query_side_micro_batch(step: int, micro: int):
        epoch, qi = indices("query", step, micro)
        q_batch = tokenized("query", qi)
        sq, hq = forward(q_batch)
        td = None
        if loss.kl_weight:  # the parent's documents: the index the student's queries will be searched against
            td = targets["document"][indices("document", step, micro)[1]].to(acc.device)
        total, parts = query_side_loss(sq.float(), targets["query"][qi].to(acc.device), td, loss)
        if hq is not None:
            total, parts = add_hidden(total, parts, hq, loss)
        parts.update(doc_cos=training.mean_pairwise_cosine(sq.detach()),  # collapse watch, on the only side trained
                     tokens=q_batch["attention_mask"].sum().float())
        return total, parts, epoch

    return micro_batch


def student_pass(acc, student: Encoder, parent: Encoder | None, kind: str):
    """``batch -> (the student's embeddings (B, H), hidden)``: ``hidden`` is None without a ``parent``, else the
    :func:`effir.losses.hidden_match` of the student's block outputs against the parent's on the same tokens. The
    parent runs under the same autocast, without gradients, so it holds no activation past its own pass."""
    if parent is None:
        def embed_only(batch: dict):
            with acc.autocast():
                return student.embed(**batch), None
        return embed_only
    mine = layer_list(acc.unwrap_model(student.model), student.adapter)  # the layers, under LoRA and DDP wrappers
    theirs = layer_list(parent.model, parent.adapter)

    def embed_and_match(batch: dict):
        with acc.autocast(), block_outputs(mine) as s_states:
            emb = student.embed(**batch)
        with acc.autocast(), torch.no_grad(), block_outputs(theirs) as p_states:
            parent.embed(**batch)
        return emb, hidden_match(s_states, p_states, batch["attention_mask"], kind)
    return embed_and_match


@contextlib.contextmanager
def block_outputs(layers) -> Iterator[list[torch.Tensor]]:
    """The output of each of ``layers`` (the residual stream after that block, ``(B, T, H)``), in order, for the
    forward pass run inside. The hooks are gone on exit, so activation checkpointing's recomputation in the backward
    pass adds nothing to the list."""
    states: list[torch.Tensor] = []

    def keep(module, args, output):
        states.append(output[0] if isinstance(output, tuple) else output)  # some layers return (states, weights)

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


def add_hidden(total: torch.Tensor, parts: dict, hidden: torch.Tensor, loss: Loss) -> tuple[torch.Tensor, dict]:
    """``total`` plus the weighted block-output distance, logged as ``hidden``."""
    parts["hidden"] = hidden.detach()
    return total + loss.hidden_weight * hidden, parts


def distillation_loss(sq: torch.Tensor, sd: torch.Tensor, tq: torch.Tensor, td: torch.Tensor, loss: Loss,
                      offset: int = 0) -> tuple[torch.Tensor, dict]:
    """The student's query / document embeddings ``sq``, ``sd`` against the parent's ``tq``, ``td`` of the same texts
    (module docstring). Documents of every process enter the in-batch distributions; ``offset`` is this process's
    first document among them. Returns the loss and its detached parts."""
    sd_all, td_all = gather_with_grad(sd.contiguous()), gather_with_grad(td.contiguous())
    parts = {}
    total = torch.zeros((), device=sq.device)
    if loss.embedding_weight:
        emb = 0.5 * (embedding_match(sq, tq, loss.embedding) + embedding_match(sd, td, loss.embedding))
        total, parts["embedding"] = total + loss.embedding_weight * emb, emb.detach()
    if loss.kl_weight:
        t_s, t_t = loss.temperature, loss.teacher_temperature
        kl_qd = similarity_kl(sq, sd_all, tq, td_all, t_s, t_t)
        kl_dd = similarity_kl(sd, sd_all, td, td_all, t_s, t_t, self_offset=offset)
        total = total + loss.kl_weight * 0.5 * (kl_qd + kl_dd)
        parts.update(kl_qd=kl_qd.detach(), kl_dd=kl_dd.detach())
    return total, parts


def query_side_loss(sq: torch.Tensor, tq: torch.Tensor, td: torch.Tensor | None, loss: Loss) -> tuple[torch.Tensor,
                                                                                                    dict]:
    """The student's query embeddings ``sq`` against the parent's ``tq`` of the same texts, and (``td``: the parent's
    embeddings of a batch of documents) the KL between each query's similarities over those documents, the student's
    query against the parent's. Returns the loss and its detached parts."""
    parts = {}
    total = torch.zeros((), device=sq.device)
    if loss.embedding_weight:
        emb = embedding_match(sq, tq, loss.embedding)
        total, parts["embedding"] = total + loss.embedding_weight * emb, emb.detach()
    if loss.kl_weight:
        kl_qd = similarity_kl(sq, td, tq, td, loss.temperature, loss.teacher_temperature)
        total, parts["kl_qd"] = total + loss.kl_weight * kl_qd, kl_qd.detach()
    return total, parts
