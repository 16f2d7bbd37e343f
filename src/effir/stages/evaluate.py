"""Evaluate a model on one split of a BEIR data set: nDCG@10, R@100 and RR@10, plus a TREC run file.

    effir eval MODEL --data DIR|ZIP|NAME --split test --output OUT

Documents are encoded chunk by chunk and searched exactly (chunked matmul) as they arrive, so memory stays bounded;
their embeddings are cached in ``embeddings/`` of the effir cache ($EFFIR_CACHE, default ~/.cache/effir), keyed by
the model fingerprint, the corpus hash and the dtype, so evaluating the same model again does not re-encode.
Under ``torchrun`` / ``accelerate launch`` each process encodes a shard of every chunk; rank 0 gathers, searches and
writes ``OUT/run.trec`` and, last, ``OUT/results.json``.
BEIR conventions: title + " " + text, qrels score 0 = non-relevant, a document whose id equals the query id is
never retrieved.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import embedding_cache, serving
from ..asymmetric import load
from ..checkpoint import fingerprint
from ..data import BeirData, load_beir
from ..encoder import POOLINGS, SIDES, AsymmetricEncoder, Encoder
from ..files import atomic_path, cache_dir, write_json
from ..metrics import DEFAULT_MEASURES, evaluate
from ..search import TopK
from ..utils import (
    DTYPE_CHOICES,
    EffirError,
    check_device,
    check_output_dir,
    dist_info,
    dtype_name,
    from_main_process,
    init_distributed_from_env,
    pick_device,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name (minilm-l6, smollm2-135m), model folder (a query-side one too: its "
                                 "documents reuse the parent's cached corpus embeddings), .gguf file or hub id")
    p.add_argument("--data", required=True, help="BEIR folder, .zip of one, or official BEIR name (downloaded once)")
    p.add_argument("--split", default="test", help="qrels split: qrels/<split>.tsv (default: test)")
    p.add_argument("--output", required=True, help="output folder for results.json and run.trec")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="dtype to compute in; auto = bf16 where the hardware runs it natively, else fp32; "
                        "source = the dtype the model is stored in")
    p.add_argument("--pooling", choices=POOLINGS, default=None, help="override the model's pooling")
    p.add_argument("--query-prompt", default=None,
                   help="query prompt preset (effir, e5, none) or a template with {text} (default: the model's)")
    p.add_argument("--task", default=None, help="task instruction filled into the query prompt's {task}")
    p.add_argument("--prompt-name", default=None,
                   help="named prompt of a sentence-transformers folder to use for queries, e.g. web_search_query "
                        "(default: its 'query' prompt)")
    p.add_argument("--query-max-length", type=int, default=None, help="query token budget (default: the model's)")
    p.add_argument("--document-max-length", type=int, default=None, help="document token budget (default: the model's)")
    p.add_argument("--truncate-dim", type=int, default=None,
                   help="keep the first N embedding dimensions (Matryoshka), as sentence-transformers' truncate_dim "
                        "(default: the model's, else all)")
    p.add_argument("--top-k", type=int, default=100, help="documents retrieved per query, >= 100 (default: 100)")
    p.add_argument("--chunk-size", type=int, default=50_000, help="documents encoded and searched per step")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the corpus-embedding cache")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/results.json")
    p.add_argument("--backend", default="torch", choices=serving.BACKENDS,
                   help="runtime: torch, or the onnx / openvino graph of a folder written by `effir export`")
    p.add_argument("--quantize", default="none", choices=serving.QUANTIZATIONS,
                   help="int8: torchao on torch, the exported int8 graph on onnx/openvino; nf4: bitsandbytes, "
                        "CUDA only (default: none)")


def run(args: argparse.Namespace) -> int:
    device = _device(args.device)  # first: the process group's backend follows it
    already = torch.distributed.is_available() and torch.distributed.is_initialized()
    owns_group = init_distributed_from_env(str(device)) and not already
    try:
        rc = _run(args, device)
        if owns_group:  # every rank leaves together: a rank tearing gloo down while rank 0 still works can abort
            torch.distributed.barrier()
        return rc
    finally:  # no barrier on errors: a failed process exits and the launcher stops the others
        if owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _device(name: str | None) -> torch.device:
    check_device(name)
    device = pick_device(name)
    if device.type == "cuda" and device.index is None:  # plain --device cuda: this process's local GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def _run(args, device: torch.device) -> int:
    rank, world = dist_info()
    out = Path(args.output)
    _check_args(args, out)
    if world > 1 and device.type == "cuda":
        torch.cuda.set_device(device)  # nccl collectives (barrier, broadcast_object_list) use the current device
    t0 = time.perf_counter()
    data = _load_data(args, rank, world)
    _warn_missing(data, rank)
    _warn_empty(data, rank)
    encoder = load(args.model, device=str(device), dtype=args.dtype, pooling=args.pooling,
                   query_prompt=args.query_prompt, prompt_name=args.prompt_name, task=args.task,
                   query_max_length=args.query_max_length,
                   document_max_length=args.document_max_length, truncate_dim=args.truncate_dim,
                   padding_side="right" if args.backend != "torch" else None)
    model_id, documents_id = fingerprint(encoder), fingerprint(encoder, documents_only=True)  # of the source model
    variant = serving.variant_name(args.backend, args.quantize)
    encoder = serving.apply_variant(encoder, args.backend, args.quantize)
    timing = {"load_s": time.perf_counter() - t0}
    if rank == 0 and args.overwrite:
        (out / "results.json").unlink(missing_ok=True)  # a crash below must not leave stale results looking fresh

    t = time.perf_counter()
    query_ids = list(data.queries)
    queries = encoder.encode([data.queries[q] for q in query_ids], "query", args.batch_size,
                             show_progress=rank == 0, desc="encode queries")
    timing["encode_queries_s"] = time.perf_counter() - t

    doc_ids = list(data.corpus)
    doc_index = {d: i for i, d in enumerate(doc_ids)}
    exclude = torch.tensor([doc_index.get(q, -1) for q in query_ids])  # BEIR: never retrieve doc id == query id
    def new_top() -> TopK:  # scored as the folder scores (cosine and dot agree on normalised vectors)
        return TopK(queries.to(encoder.device), args.top_k, exclude=exclude,
                    cosine=encoder.settings.similarity == "cosine")

    top = new_top()
    if variant:  # another runtime or precision gives other embeddings: its own cache entry and identity
        model_id, documents_id = f"{model_id}-{variant}", f"{documents_id}-{variant}"
    cache = None if args.no_cache else _cache_path(documents_id, encoder, data)
    t = time.perf_counter()
    cached = embedding_cache.read(cache, len(doc_ids), encoder.dim) if rank == 0 and cache is not None else None
    hit = from_main_process(cached is not None)
    if hit and rank == 0:
        for start in range(0, len(doc_ids), args.chunk_size):
            top.add(torch.from_numpy(np.array(cached[start:start + args.chunk_size])).to(encoder.device), offset=start)
    if not hit:
        top = new_top()  # nothing from a rejected cache
        _encode_and_search(encoder, data, doc_ids, top, cache, args.batch_size, args.chunk_size)
    timing["corpus_s" if not hit else "corpus_from_cache_s"] = time.perf_counter() - t
    if rank != 0:
        return 0

    t = time.perf_counter()
    scores, indices = top.result()
    run_ = _to_run(query_ids, doc_ids, scores.cpu(), indices.cpu())
    metrics = evaluate(data.qrels, run_, DEFAULT_MEASURES)
    timing["search_and_metrics_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t0
    timing["documents_per_s"] = None if hit else len(doc_ids) / max(timing["corpus_s"], 1e-9)
    _write_run(out / "run.trec", run_)
    results = {
        "model": str(args.model),
        "dataset": data.name,
        "split": data.split,
        "metrics": metrics,
        "timing": timing,
        "corpus_cached": hit,
        "processes": world,
        "device": str(encoder.device),
        "dtype": dtype_name(encoder.dtype),
        "top_k": args.top_k,
        "fingerprint": model_id,
        "embedding": encoder.settings.to_dict(),
        "backend": args.backend,
        "quantize": args.quantize,
        "size": ({side: serving.size_report(encoder.route(side)) for side in SIDES}
                 if isinstance(encoder, AsymmetricEncoder) else serving.size_report(encoder)),
        "data": {"path": str(data.path), **data.report},
    }
    write_json(out / "results.json", results)  # last: its presence means the run is complete
    _print_table(results, out)
    return 0


def _check_args(args, out: Path) -> None:
    if args.top_k < 100:
        raise EffirError(f"--top-k must be >= 100 (R@100 needs 100 documents per query), got {args.top_k}")
    if args.batch_size < 1 or args.chunk_size < 1:
        raise EffirError("--batch-size and --chunk-size must be >= 1")
    serving.check_variant(args.backend, args.quantize, args.device, args.dtype)
    check_output_dir(out)
    if (out / "results.json").exists() and not args.overwrite:
        raise EffirError(f"{out / 'results.json'} already exists; pass --overwrite or choose another --output")


def _load_data(args, rank: int, world: int) -> BeirData:
    """Rank 0 first (it may download or extract into the cache), then the others from the cache."""
    if world > 1 and rank != 0:
        torch.distributed.barrier()
    try:
        data = load_beir(args.data, args.split, progress=rank == 0)
    finally:
        if world > 1 and rank == 0:
            torch.distributed.barrier()
    return data


def _warn_missing(data: BeirData, rank: int) -> None:
    r = data.report
    if rank == 0 and (r["qrels_queries_missing"] or r["qrels_docs_missing"]):
        print(f"effir eval: warning: {data.split} qrels name {r['qrels_queries_missing']} query id(s) missing from "
              f"queries.jsonl (ignored) and {r['qrels_docs_missing']} document id(s) missing from corpus.jsonl",
              file=sys.stderr)


def _warn_empty(data: BeirData, rank: int, shown: int = 5) -> None:
    """A blank query embeds as the prompt alone and scores like any other: warned, not refused, so one blank line in
    a published set does not block its evaluation, and the scores stay those every other tool reports for it."""
    empty = [q for q, text in data.queries.items() if not text.strip()]
    if rank != 0 or not empty:
        return
    more = f" and {len(empty) - shown} more" if len(empty) > shown else ""
    print(f"effir eval: warning: {data.split} query ids with empty text in {data.path / 'queries.jsonl'}, embedded as "
          f"the prompt alone: {', '.join(empty[:shown])}{more}", file=sys.stderr)


def _cache_path(documents_id: str, encoder: Encoder, data: BeirData) -> Path:
    key = f"{documents_id}-{data.report['corpus_sha256'][:16]}-{dtype_name(encoder.dtype)}"
    return cache_dir() / "embeddings" / f"{key}.npy"


def _encode_and_search(encoder: Encoder, data: BeirData, doc_ids: list[str], top: TopK, cache: Path | None,
                       batch_size: int, chunk_size: int) -> None:
    """Encode the corpus chunk by chunk (sharded across processes), search each chunk, and fill the cache."""
    rank, world = dist_info()
    n = len(doc_ids)
    store = embedding_cache.Writer(cache, n, encoder.dim) if cache is not None and rank == 0 else None
    n_chunks = math.ceil(n / chunk_size)
    for c, start in enumerate(range(0, n, chunk_size)):
        chunk = [data.corpus[d] for d in doc_ids[start:start + chunk_size]]
        desc = f"encode corpus ({c + 1}/{n_chunks})" if n_chunks > 1 else "encode corpus"
        emb = _encode_sharded(encoder, chunk, batch_size, desc)
        if rank == 0:
            top.add(emb.to(top.queries.device), offset=start)
            if store is not None:
                store.put(emb.numpy())
    if store is not None:
        store.close()  # atomic, record last: a killed run never leaves an entry that is used


def _encode_sharded(encoder: Encoder, docs: list, batch_size: int, desc: str) -> torch.Tensor:
    """Each process encodes ``docs[rank::world]``; all gather -> ``(len(docs), H)`` float32 CPU, input order."""
    rank, world = dist_info()
    if world == 1:
        return encoder.encode(docs, "document", batch_size, show_progress=True, desc=desc)
    mine = encoder.encode(docs[rank::world], "document", batch_size, show_progress=rank == 0, desc=desc)
    width = math.ceil(len(docs) / world)
    comm_device = encoder.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros((width, encoder.dim), dtype=torch.float32, device=comm_device)
    padded[:len(mine)] = mine.to(comm_device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    full = torch.empty((len(docs), encoder.dim), dtype=torch.float32)
    for r, part in enumerate(parts):
        full[r::world] = part[:len(range(r, len(docs), world))].cpu()
    return full


def _to_run(query_ids, doc_ids, scores: torch.Tensor, indices: torch.Tensor) -> dict[str, dict[str, float]]:
    run_ = {}
    for qi, q in enumerate(query_ids):
        pairs = zip(scores[qi].tolist(), indices[qi].tolist(), strict=True)
        run_[q] = {doc_ids[j]: float(s) for s, j in pairs if j >= 0}
    return run_


def _write_run(path: Path, run_: dict[str, dict[str, float]]) -> None:
    """TREC run format: ``qid Q0 docid rank score effir``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for q, docs in run_.items():
            for rank, (d, s) in enumerate(sorted(docs.items(), key=lambda x: -x[1]), 1):
                f.write(f"{q} Q0 {d} {rank} {s:.6f} effir\n")


def _print_table(results: dict, out: Path) -> None:
    m, t = results["metrics"], results["timing"]
    print(f"{results['model']} on {results['dataset']} ({results['split']}, {results['data']['queries']} queries, "
          f"{results['data']['documents']} documents)")
    print("  ".join(f"{k:>8}" for k in m))
    print("  ".join(f"{v:8.4f}" for v in m.values()))
    corpus = "from cache" if results["corpus_cached"] else f"{t['documents_per_s']:.1f} docs/s"
    d = results["data"]
    print(f"corpus: {corpus}; total {t['total_s']:.1f}s; {d['queries']} of {d['judged_queries']} judged queries "
          f"evaluated; wrote {out / 'results.json'} and {out / 'run.trec'}")
