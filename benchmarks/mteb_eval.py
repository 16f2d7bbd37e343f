"""Evaluate an effir model folder with mteb, through sentence-transformers, on a local BEIR folder (or an mteb task).

    python benchmarks/mteb_eval.py --model runs/drop16 --beir ../shared/data/scifact            # local, offline
    python benchmarks/mteb_eval.py --model runs/drop16 --beir ../shared/data/scifact --compare-effir --json out.json
    python benchmarks/mteb_eval.py --model runs/drop16 --task SciFact   # an mteb task: needs the hub for the data

Every folder ``effir.checkpoint.save`` writes also carries sentence-transformers files (``effir/export.py``), so mteb
evaluates it with its stock ``SentenceTransformerEncoderWrapper``: queries go through ``encode_query`` and documents
through ``encode_document``, with the folder's prompts and per-side token budgets, exactly as effir embeds them.
Compressed folders load with ``trust_remote_code=True`` (their ``modeling_effir.py``). ``--compare-effir`` also runs
effir's own encoder + exact search + ir-measures on the same data, so the two nDCG@10 can be set side by side.

mteb normally downloads its tasks from the Hugging Face hub. ``--beir`` instead wraps a local BEIR folder
(``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``) in a one-off mteb retrieval task whose data is loaded
from disk, so it runs with ``HF_HUB_OFFLINE=1``; results are not cached (``cache=None``). Needs ``pip install mteb``
(checked with mteb 2.26 and sentence-transformers 6.2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        import mteb
    except ImportError:
        sys.exit("mteb is not installed: pip install mteb")
    from sentence_transformers import SentenceTransformer

    if args.beir:
        from effir.data import load_beir

        data = load_beir(args.beir, split=args.split)
        task = local_retrieval_task(data.name, args.split, data.corpus, data.queries, data.qrels)
    else:
        task = mteb.get_task(args.task)
    st = SentenceTransformer(str(args.model), device=args.device, trust_remote_code=True)
    model = mteb.models.SentenceTransformerEncoderWrapper(st)
    start = time.perf_counter()
    result = mteb.evaluate(model, task, cache=None, encode_kwargs={"batch_size": args.batch_size},
                           show_progress_bar=False)
    scores = result.task_results[0].scores
    split = args.split if args.split in scores else next(iter(scores))
    main_scores = scores[split][0]
    out = {"model": str(args.model), "task": task.metadata.name, "split": split,
           "mteb": {k: main_scores[k] for k in ("ndcg_at_10", "recall_at_100", "mrr_at_10") if k in main_scores},
           "mteb_seconds": round(time.perf_counter() - start, 2)}
    if args.compare_effir:
        if not args.beir:
            sys.exit("--compare-effir needs --beir (effir reads BEIR folders, not mteb tasks)")
        out["effir"] = effir_scores(args.model, data, args.device, args.batch_size)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an effir model folder (any folder effir saved)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--beir", help="a local BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    src.add_argument("--task", help="an mteb task name, e.g. SciFact (mteb downloads its data from the hub)")
    p.add_argument("--split", default="test")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: what sentence-transformers picks)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--compare-effir", action="store_true", help="also score the folder with effir's own pipeline")
    p.add_argument("--json", help="also write the result here")
    return p.parse_args(argv)


def local_retrieval_task(name: str, split: str, corpus: dict[str, dict], queries: dict[str, str],
                         qrels: dict[str, dict[str, int]]):
    """An mteb retrieval task over in-memory BEIR data (no hub access). Documents keep title and text separate;
    mteb joins them as ``title + " " + text``, as effir does."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    metadata = TaskMetadata(
        name=f"Local{name}", description=f"The local BEIR folder {name!r}, split {split!r}.",
        reference=None, dataset={"path": f"local/{name}", "revision": "local"}, type="Retrieval", category="t2t",
        modalities=["text"], eval_splits=[split], eval_langs=["eng-Latn"], main_score="ndcg_at_10", date=None,
        domains=None, task_subtypes=None, license=None, annotations_creators=None, dialect=None,
        sample_creation=None, bibtex_citation="",
    )
    split_data = {
        "corpus": Dataset.from_list([{"id": i, "title": d.get("title") or "", "text": d.get("text") or ""}
                                     for i, d in corpus.items()]),
        "queries": Dataset.from_list([{"id": i, "text": t} for i, t in queries.items()]),
        "relevant_docs": qrels,
        "top_ranked": None,
    }

    def load_data(self, *args, **kwargs):
        self.dataset = {"default": {split: split_data}}
        self.data_loaded = True

    cls = type(f"Local{name.title().replace('-', '')}Retrieval", (AbsTaskRetrieval,),
               {"metadata": metadata, "load_data": load_data})
    return cls()


def effir_scores(model_dir, data, device, batch_size: int) -> dict:
    """effir's own nDCG@10 / R@100 / RR@10 on the same data: encode, exact search, ir-measures."""
    import torch

    import effir
    from effir.metrics import evaluate
    from effir.search import exact_search

    enc = effir.load(model_dir, device=device, dtype="fp32")
    doc_ids, qids = list(data.corpus), list(data.queries)
    d = enc.encode_documents([data.corpus[i] for i in doc_ids], batch_size=batch_size)
    q = enc.encode_queries([data.queries[i] for i in qids], batch_size=batch_size)
    if enc.settings.similarity == "cosine":  # as effir eval scores (the same on normalised embeddings)
        d, q = torch.nn.functional.normalize(d, dim=-1), torch.nn.functional.normalize(q, dim=-1)
    # BEIR (and effir) never return a document whose id is the query's own id
    index = {doc: n for n, doc in enumerate(doc_ids)}
    exclude = torch.tensor([index.get(qid, -1) for qid in qids])
    scores, idx = exact_search(q, d, k=min(100, len(doc_ids)), exclude=exclude)
    run = {qid: {doc_ids[j]: float(s) for s, j in zip(scores[n].tolist(), idx[n].tolist(), strict=True) if j >= 0}
           for n, qid in enumerate(qids)}
    return {k: round(v, 5) for k, v in evaluate(data.qrels, run).items()}


if __name__ == "__main__":
    main()
