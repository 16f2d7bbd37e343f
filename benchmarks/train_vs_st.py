"""Training throughput: ``effir finetune`` against sentence-transformers' MultipleNegativesRankingLoss, same model,
batch, data, sequence lengths, temperature and optimiser, in one process.

    python benchmarks/train_vs_st.py                       # minilm-l6, SciFact train pairs, batch 16, 8 steps x 2
    python benchmarks/train_vs_st.py --steps 30 --rounds 3 --batch-size 64 --max-length 256

Both sides: full fine-tuning, fp32, AdamW lr 2e-5, in-batch negatives only (query, positive) pairs, temperature 0.05
(= MNRL's scale 20), queries and documents cut at --max-length tokens, the same queries in the same order. The ST side
is a plain loop over ``SentenceTransformer`` + ``MultipleNegativesRankingLoss`` (tokenize, loss, backward, step), so
no Trainer/datasets overhead is counted against it. Throughput = non-pad tokens (queries + documents) per second of
training steps, the first step of each side excluded (warm-up). Rounds alternate ST / effir; the median is reported.
Writes ``--output`` (JSON) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def pairs_from(data: Path, n: int) -> list[tuple[str, str]]:
    from effir.train_data import load_training_data

    examples, _ = load_training_data(data, "train")
    return [(ex.query, ex.pos[0]) for ex in examples[:n]]


def st_round(model_path: str, pairs, args) -> float:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    torch.manual_seed(0)
    model = SentenceTransformer(model_path, device="cpu")
    model.max_seq_length = args.max_length
    loss_fn = MultipleNegativesRankingLoss(model, scale=1 / args.temperature)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    # effir's batch order: a permutation seeded by seed + epoch (seed 0, epoch 0)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    tokens, seconds = 0, 0.0
    for step in range(args.steps):
        batch = [pairs[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
        t = time.perf_counter()
        prep = getattr(model, "preprocess", model.tokenize)  # ST 6 renamed tokenize -> preprocess
        features = [prep([q for q, _ in batch]), prep([d for _, d in batch])]
        n_tok = sum(int(f["attention_mask"].sum()) for f in features)
        loss = loss_fn(features, labels=None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # first step = warm-up
            seconds += time.perf_counter() - t
            tokens += n_tok
    return tokens / seconds


def effir_round(model_ref: str, data: Path, args, work: Path, r: int) -> float:
    from effir.cli import main

    out = work / f"effir-{r}"
    rc = main(["finetune", model_ref, "--train", str(data), "--output", str(out), "--full", "--device", "cpu",
               "--num-negatives", "0", "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
               "--lr", str(args.lr), "--warmup-ratio", "0", "--schedule", "constant", "--temperature",
               str(args.temperature), "--query-max-length", str(args.max_length), "--document-max-length",
               str(args.max_length), "--precision", "fp32", "--no-progress", "--overwrite", "--seed", "0"])
    if rc:
        sys.exit(f"effir finetune failed with exit code {rc}")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()][1:]
    return sum(r["tokens"] for r in log) / sum(r["tokens"] / r["tokens_per_s"] for r in log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm-l6", help="effir reference of a sentence-transformers folder")
    ap.add_argument("--data", default=str(SCIFACT), help="BEIR folder with qrels/train.tsv")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--output", default="benchmarks/results/train_vs_st.json")
    args = ap.parse_args()

    from effir.refs import resolve
    from effir.train_data import TrainExample, write_flag_jsonl

    kind, where = resolve(args.model)
    if kind != "dir":
        sys.exit(f"{args.model} must resolve to a sentence-transformers folder")
    pairs = pairs_from(Path(args.data), args.batch_size * args.steps)
    if len(pairs) < args.batch_size * args.steps:
        sys.exit(f"{args.data} has only {len(pairs)} training pairs; lower --steps or --batch-size")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_flag_jsonl([TrainExample(query=q, pos=[d]) for q, d in pairs], work / "pairs.jsonl")
        st, ef = [], []
        for r in range(args.rounds):
            st.append(st_round(str(where), pairs, args))
            ef.append(effir_round(args.model, data, args, work, r))
            print(f"round {r + 1}: sentence-transformers {st[-1]:.0f} tok/s, effir {ef[-1]:.0f} tok/s", flush=True)
    result = {"model": args.model, "batch_size": args.batch_size, "steps": args.steps, "max_length": args.max_length,
              "rounds": args.rounds, "threads": torch.get_num_threads(),
              "st_tokens_per_s": st, "effir_tokens_per_s": ef,
              "ratio_median": statistics.median(ef) / statistics.median(st)}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"effir / sentence-transformers training tokens/s (median of {args.rounds}): {result['ratio_median']:.2f}")


if __name__ == "__main__":
    main()
