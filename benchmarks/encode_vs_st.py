"""effir's document-encoding throughput against sentence-transformers' ``encode``, like with like.

    python benchmarks/encode_vs_st.py          # minilm-l6 (256 SciFact docs) and smollm2-135m (32 docs)
    python benchmarks/encode_vs_st.py --models minilm-l6 --n-texts 512 --repeats 5 --json out.json

Same weights, dtype (fp32), texts, max length and batch size on both sides. For smollm2-135m the
sentence-transformers model is built from the safetensors folder ``effir.refs.gguf_to_folder`` caches, with
a ``lasttoken`` Pooling module and Normalize, and its texts are effir's truncated token sequences decoded back to text
with the EOS token appended, so both sides run and pool the same tokens. After a one-batch warm-up each, the two sides run interleaved (the side that goes first
alternates) and the median of ``--repeats`` timings is reported, with the min cosine between both sides' embeddings.
Texts: the first ``--n-texts`` documents (title + " " + text) of ``--data`` (default SciFact), else built-in text.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import effir
from effir.data import load_corpus
from effir.encoder import document_text
from effir.refs import gguf_to_folder, resolve

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
ENCODER_TEXTS, LLM_TEXTS = 256, 32  # keeps the default run (both models) under ~5 min on 2 idle CPU cores
BUILTIN = ("Dense retrieval embeds queries and documents into one vector space and ranks documents by inner product. "
           "Large language models make strong embedders, but they are slow; removing redundant MLP sub-layers and "
           "narrowing the rest keeps most of the quality at a fraction of the cost. ")


def texts_for(data: Path, n: int) -> tuple[list[str], str]:
    if (data / "corpus.jsonl").is_file():
        corpus = load_corpus(data / "corpus.jsonl")
        return [document_text(d) for d in list(corpus.values())[:n]], f"{data.name} documents"
    # varied lengths, like a real corpus: 1..12 repetitions of a paragraph, with an index so no two are equal
    return [f"{i}: " + BUILTIN * (1 + i % 12) for i in range(n)], "built-in text"


def st_model(name: str, enc, max_length: int):
    """The sentence-transformers twin of effir's encoder ``enc`` for built-in model ``name``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    kind, path = resolve(name)
    if kind == "gguf":
        folder = gguf_to_folder(path)
        pooling = {"last": "lasttoken", "mean": "mean", "cls": "cls"}[enc.settings.pooling]
        tr = Transformer(str(folder), max_seq_length=max_length, model_kwargs={"dtype": torch.float32})
        # sentence-transformers 5+ renders plain text through the tokenizer's chat template when it has one (for
        # SmolLM2-Instruct: a ~20-token system prompt around every text); pin plain text, as effir embeds it
        tr.modality_config = {k: v for k, v in tr.modality_config.items() if k != "message"}
        if tr.tokenizer.pad_token is None:
            tr.tokenizer.pad_token = tr.tokenizer.eos_token
        model = SentenceTransformer(modules=[tr, Pooling(enc.dim, pooling_mode=pooling), Normalize()], device="cpu")
    else:
        model = SentenceTransformer(str(path), device="cpu", model_kwargs={"dtype": torch.float32})
        model.max_seq_length = max_length
    return model.eval()


def bench(name: str, data: Path, n_texts: int | None, batch_size: int, repeats: int) -> dict:
    enc = effir.load(name, device="cpu", dtype="fp32")
    texts, source = texts_for(data, n_texts or (LLM_TEXTS if enc.adapter.is_decoder else ENCODER_TEXTS))
    max_length = enc.settings.document_max_length
    st = st_model(name, enc, max_length)
    st_texts = texts
    if enc.settings.append_eos:  # effir truncates to max_length - 1 and appends EOS: give ST that same sequence
        eos = enc.tokenizer.eos_token
        st_texts = [enc.tokenizer.decode(ids[:-1]) + eos for ids in enc.token_ids(texts, "document")]

    def run_effir():
        return enc.encode(texts, "document", batch_size=batch_size)

    def run_st():
        return torch.from_numpy(st.encode(st_texts, batch_size=batch_size, convert_to_numpy=True))

    enc.encode(texts[:batch_size], "document", batch_size=batch_size)  # warm-up: one batch each
    st.encode(st_texts[:batch_size], batch_size=batch_size)
    times = {"effir": [], "sentence-transformers": []}
    emb = {}
    for r in range(repeats):
        order = [("effir", run_effir), ("sentence-transformers", run_st)]
        for side, fn in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            emb[side] = fn()
            times[side].append(time.perf_counter() - t)
    cos = torch.nn.functional.cosine_similarity(emb["effir"], emb["sentence-transformers"], dim=1)
    rate = {side: len(texts) / statistics.median(ts) for side, ts in times.items()}
    return {"model": name, "source": source, "max_length": max_length, "pooling": enc.settings.pooling, "dtype": "fp32",
            "texts": len(texts), "batch_size": batch_size, "repeats": repeats, "texts_per_s": rate,
            "times_s": times, "ratio": rate["effir"] / rate["sentence-transformers"],
            "min_cosine_effir_vs_st": float(cos.min())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BEIR folder for texts (default: SciFact)")
    p.add_argument("--n-texts", type=int, default=None,
                   help=f"texts per model (default: {ENCODER_TEXTS} for encoders, {LLM_TEXTS} for decoder LLMs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"batch {args.batch_size}, {args.repeats} interleaved repeats, fp32, torch threads "
          f"{torch.get_num_threads()}", file=sys.stderr)
    results = []
    print(f"{'model':<14} {'texts':>5} {'max_len':>7} {'effir/s':>9} {'ST/s':>9} {'ratio':>6} {'min cos':>8}")
    for name in args.models:
        r = bench(name, args.data, args.n_texts, args.batch_size, args.repeats)
        results.append(r)
        print(f"{name:<14} {r['texts']:>5} {r['max_length']:>7} {r['texts_per_s']['effir']:>9.1f} "
              f"{r['texts_per_s']['sentence-transformers']:>9.1f} {r['ratio']:>6.2f} "
              f"{r['min_cosine_effir_vs_st']:>8.5f}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
