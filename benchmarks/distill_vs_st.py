"""sentence-transformers' layer-reduction distillation recipe, the peer of `effir distill`, on the same texts.

The recipe of sentence-transformers' examples (distillation/model_distillation_layer_reduction.py): the student is
the teacher with some transformer layers removed, trained with MSELoss between its embeddings and the teacher's of
the same sentences. Here it sees exactly what `effir distill` sees: the texts `effir.distillation.read_texts` reads
from the same sources, the same query-side and document-side texts per step (the same seeded order), the same
batch size, steps, learning rate, warm-up, decay and clipping. The student is saved as a sentence-transformers folder
that `effir eval` (and anything else) loads.

    python benchmarks/distill_vs_st.py TEACHER_DIR --keep 0,2,4 --texts wiki beir:DIR --steps 400 --output OUT

TEACHER_DIR is a sentence-transformers folder of a BERT-style model (e.g. all-MiniLM-L6-v2: ``minilm-l6``'s files,
see effir.refs.BUILTINS). Measured figures: docs/results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("teacher", help="sentence-transformers folder (BERT-style)")
    p.add_argument("--keep", required=True, help="comma-separated indices of the layers the student keeps")
    p.add_argument("--texts", nargs="+", required=True, help="sources, as for effir distill --texts")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32, help="query-side and document-side texts per step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--passage-words", type=int, default=200)
    p.add_argument("--max-seq-length", type=int, default=None, help="tokens per text while training (default: "
                                                                     "the teacher folder's), for teacher and student")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)

    from sentence_transformers import SentenceTransformer

    from effir.distillation import read_texts
    from effir.training import batch_indices, steps_per_epoch
    from effir.utils import lr_schedule, seed_everything

    seed_everything(args.seed)
    texts = read_texts(args.texts, args.passage_words, None, args.seed)
    teacher = SentenceTransformer(args.teacher, device="cpu")
    if args.max_seq_length:
        teacher.max_seq_length = args.max_seq_length
    t0 = time.perf_counter()
    targets = {"query": teacher.encode(texts.queries, batch_size=64, convert_to_tensor=True),
               "document": teacher.encode(texts.documents, batch_size=64, convert_to_tensor=True)}
    teacher_s = time.perf_counter() - t0
    student = SentenceTransformer(args.teacher, device="cpu")
    max_seq_length = student.max_seq_length  # the saved student keeps the folder's length, as effir's does
    if args.max_seq_length:
        student.max_seq_length = args.max_seq_length
    keep = [int(i) for i in args.keep.split(",")]
    bert = student[0].auto_model
    bert.encoder.layer = torch.nn.ModuleList([bert.encoder.layer[i] for i in keep])
    bert.config.num_hidden_layers = len(keep)
    params = sum(p.numel() for n, p in bert.named_parameters() if not n.startswith("embeddings."))
    items = {"query": texts.queries, "document": texts.documents}
    per_epoch = {s: steps_per_epoch(len(v), args.batch_size, 1, 1, f"{s}-side texts") for s, v in items.items()}
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(args.warmup_ratio, "linear", args.steps))
    perms = {"query": {}, "document": {}}
    student.train()
    log, t0 = [], time.perf_counter()
    for step in range(args.steps):
        batch, target = [], []
        for side in ("query", "document"):
            _, idx = batch_indices(len(items[side]), step, 0, batch_size=args.batch_size, grad_accum=1, world=1, rank=0,
                                   per_epoch=per_epoch[side], seed=args.seed + (side == "document"), perms=perms[side])
            batch += [items[side][i] for i in idx]
            target.append(targets[side][idx])
        features = student.preprocess(batch)  # sentence-transformers 6's name for tokenize
        emb = student(features)["sentence_embedding"]
        loss = torch.nn.functional.mse_loss(emb, torch.cat(target))  # sentence-transformers' MSELoss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        log.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: mse {sum(log[-50:]) / 50:.6f}", file=sys.stderr, flush=True)
    out = Path(args.output)
    student.eval()
    student.max_seq_length = max_seq_length
    student.save(str(out / "model"))
    summary = {"teacher": args.teacher, "keep": keep, "parameters_without_embeddings": params, "steps": args.steps,
               "batch_size": args.batch_size, "lr": args.lr, "texts": args.texts, "query_texts": len(texts.queries),
               "document_texts": len(texts.documents), "teacher_encode_s": round(teacher_s, 1),
               "train_s": round(time.perf_counter() - t0, 1), "final_mse": log[-1]}
    (out / "st_distill.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
