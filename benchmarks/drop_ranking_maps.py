"""Which MLPs should a fitted map replace? Importance (1 - cos) against how linear each MLP is, before any training.

`effir drop --compensate lstsq` replaces each dropped MLP by a linear map of its normalised input, but picks the MLPs
by importance alone. An MLP that a map reproduces well (low relative map error) might be the better one to replace.
This compares three rankings of the MLPs (massive-activation sources and layer 0 never dropped): importance,
importance x map error (the damage a replaced MLP leaves, to first order), and map error alone. Each drop set is
replaced by full-rank maps fitted on the same calibration text, and scored by the mean cosine of its embeddings to
the parent's on held-out queries and documents of a BEIR folder. Usage:
    python benchmarks/drop_ranking_maps.py MODEL --scores scores.json --data BEIR_DIR [--mlp 8] [--samples 32]
MODEL and scores.json as for `effir drop` (scores from `effir analyze MODEL`).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from effir.arch import layer_list
from effir.calibration import block_batches, calibration_blocks, load_texts
from effir.checkpoint import load
from effir.compensation import branch_stats, fit_map, map_error, replace_and_fit
from effir.data import load_beir


@torch.no_grad()
def map_errors(encoder, batches) -> list[float]:
    """Relative error of the best full-rank map of each MLP, each fitted on the untouched model's inputs."""
    layers = layer_list(encoder.model, encoder.adapter)
    errors, inputs, start = [], None, 0
    for i in range(len(layers)):
        stats, inputs = branch_stats(encoder.model, layers, encoder.adapter, i, batches, start=start, inputs=inputs)
        start = i
        bias, maps = fit_map(stats, encoder.model.config.hidden_size)
        errors.append(map_error(stats, bias, maps))
    return errors


@torch.no_grad()
def cosine_to_parent(encoder, drops, batches, texts, parent) -> tuple[float, float]:
    student = copy.deepcopy(encoder)
    replace_and_fit(student.model, student.adapter, dict.fromkeys(drops, student.model.config.hidden_size),
                    batches, progress=False)
    sims = [torch.nn.functional.cosine_similarity(encode(student, texts[side]).float(), parent[side].float()).mean()
            for side in ("query", "document")]
    return round(float(sims[0]), 4), round(float(sims[1]), 4)


def encode(encoder, texts):
    return encoder.encode_queries(texts["queries"]) if "queries" in texts else encoder.encode_documents(texts["docs"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--scores", required=True)
    p.add_argument("--data", required=True, help="BEIR folder: its first --holdout test queries and documents")
    p.add_argument("--mlp", type=int, default=8)
    p.add_argument("--samples", type=int, default=32, help="calibration blocks of 256 tokens of wiki")
    p.add_argument("--holdout", type=int, default=64)
    args = p.parse_args()
    encoder = load(args.model, device="cpu", dtype="fp32")
    blocks = calibration_blocks(encoder, load_texts("wiki").documents, args.samples, 256, seed=0, source="wiki",
                                verb="drop")
    batches = list(block_batches(blocks, 4, encoder.pad_id))
    errors = map_errors(encoder, batches)
    report = json.load(open(args.scores))
    importance = report["scores"]["mlp"]
    candidates = [i for i in range(len(errors)) if i not in set(report["massive"]["mlp"]) | {0}]
    data = load_beir(args.data, "test")
    texts = {"query": {"queries": list(data.queries.values())[:args.holdout]},
             "document": {"docs": list(data.corpus.values())[:args.holdout]}}
    parent = {side: encode(encoder, texts[side]) for side in texts}
    print(json.dumps({"map_error": [round(e, 4) for e in errors]}))
    for name, key in (("importance", lambda i: importance[i]), ("importance x map error",
                                                               lambda i: importance[i] * errors[i]),
                      ("map error", lambda i: errors[i])):
        drops = sorted(sorted(candidates, key=key)[:args.mlp])
        q, d = cosine_to_parent(encoder, drops, batches, texts, parent)
        print(json.dumps({"ranking": name, "drops": drops, "cosine_query": q, "cosine_document": d}), flush=True)


if __name__ == "__main__":
    main()
