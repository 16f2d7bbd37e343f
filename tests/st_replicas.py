"""Tiny random-weight replicas of real sentence-transformers folders: the JSON files' structure of each model
(modules.json, 1_Pooling/config.json, config_sentence_transformers.json, sentence_bert_config.json,
tokenizer_config.json, the tokenizer.json post-processor), with a 4-layer model and a tokenizer trained on a few
hundred words in the model's own tokenizer family (byte-level BPE for Qwen, Metaspace BPE for Mistral, WordPiece
for BERT). Copied from the published folders:

- qwen3-embedding: Qwen/Qwen3-Embedding-0.6B: Qwen3, lasttoken (legacy keys), Normalize, left padding, a
  post-processor appending the pad token <|endoftext|> (eos is <|im_end|>), instruct query prompt, empty document
  prompt, max_seq_length 32768;
- gte-qwen2: Alibaba-NLP/gte-Qwen2-1.5B-instruct: Qwen2, lasttoken, Normalize, tokenizer appending its EOS
  <|endoftext|>, query prompt only;
- e5-mistral: intfloat/e5-mistral-7b-instruct: Mistral, lasttoken, Normalize, LlamaTokenizer with a BOS template
  (add_bos_token), task-named prompts only (web_search_query, sts_query, ...), max_seq_length 4096;
- bge: BAAI/bge-base-en-v1.5: BERT, cls, Normalize, query prompt, do_lower_case with an uncased tokenizer;
- kalm: a KaLM-style Qwen2 with mean pooling and no end token appended;
- no-normalize: a Phi3 embedder with mean pooling and no Normalize module;
- minilm: sentence-transformers/all-MiniLM-L6-v2: BERT, mean (legacy keys), Normalize, max_seq_length 256;
- st6: a Llama folder saved by sentence-transformers 6 itself (single-key "pooling_mode", ST 6 module paths,
  query_length / document_length unset).

Dense-headed layouts (:data:`DENSE_REPLICAS`, same machinery):

- embeddinggemma: google/embeddinggemma-300m: gemma3_text with use_bidirectional_attention and a sliding window
  (here 4 tokens, shorter than the test texts), mean pooling, 2_Dense (H -> 3H, no bias, Identity), 3_Dense
  (3H -> H, no bias, Identity), 4_Normalize, the query / document / task prompts, max_seq_length 2048, a Gemma
  tokenizer (<bos> ... <eos>; padded left here, the harder case for effir's explicit positions);
- labse-like: a BERT with cls pooling, one Dense (H -> 24, bias, Tanh), Normalize, the legacy module types and a
  pytorch_model.bin, as older sentence-transformers folders (LaBSE) are saved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from conftest import TINY_CORPUS, TINY_QUERIES, WORDS, build_tiny_tokenizer, tiny_config

WEB_SEARCH = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "
LEGACY = "sentence_transformers.models."


@dataclass(frozen=True)
class Replica:
    model_type: str
    tokenizer: str  # "qwen", "mistral", "bert" or "word" (conftest's word-level tokenizer)
    pooling: str  # the sentence-transformers pooling mode
    normalize: bool
    prompts: dict
    max_seq_length: int
    tokenizer_config: dict = field(default_factory=dict)
    post_processor: dict | None = None  # tokenizer.json post-processor; None keeps the trained one
    do_lower_case: bool = False
    st6: bool = False  # saved by sentence-transformers 6 itself
    dense: tuple = ()  # (out_features, bias, activation_function) per Dense module, in order
    model_config: dict = field(default_factory=dict)  # overrides of the tiny HF config
    dense_weights: str = "model.safetensors"  # or pytorch_model.bin, as older sentence-transformers saves


def _template(single: list[str], specials: dict[str, int]) -> dict:
    """A tokenizer.json TemplateProcessing; ``single`` like ["<s>", "$A"]; pair repeats it for $B."""
    def items(seq, type_id):
        return [{"Sequence": {"id": "A" if type_id == 0 else "B", "type_id": type_id}} if t == "$A" else
                {"SpecialToken": {"id": t, "type_id": type_id}} for t in seq]
    return {"type": "TemplateProcessing", "single": items(single, 0), "pair": items(single, 0) + items(single, 1),
            "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in specials.items()}}


QWEN_SPECIALS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
REPLICAS: dict[str, Replica] = {
    "qwen3-embedding": Replica(
        "qwen3", "qwen", "lasttoken", True,
        {"query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
         "document": ""}, 32768,
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "bos_token": None, "unk_token": None, "padding_side": "left", "model_max_length": 131072,
         "add_prefix_space": False, "errors": "replace", "split_special_tokens": False},
        _template(["$A", "<|endoftext|>"], {"<|endoftext|>": 0})),
    "gte-qwen2": Replica(
        "qwen2", "qwen", "lasttoken", True, {"query": WEB_SEARCH}, 32768,
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "bos_token": None, "unk_token": None, "model_max_length": 32768, "add_prefix_space": False},
        _template(["$A", "<|endoftext|>"], {"<|endoftext|>": 0})),
    "e5-mistral": Replica(
        "mistral", "mistral", "lasttoken", True,
        {"web_search_query": WEB_SEARCH, "sts_query": "Instruct: Retrieve semantically similar text.\nQuery: ",
         "summarization_query": "Instruct: Given a news summary, retrieve other semantically similar summaries\n"
                                "Query: ",
         "bitext_query": "Instruct: Retrieve parallel sentences.\nQuery: "}, 4096,
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "pad_token": "</s>", "add_bos_token": True, "add_eos_token": False, "legacy": True, "padding_side": "left",
         "model_max_length": 1000000000000000019884624838656},
        _template(["<s>", "$A"], {"<s>": 1})),
    "bge": Replica(
        "bert", "bert", "cls", True, {"query": "Represent this sentence for searching relevant passages: "}, 512,
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "cls_token": "[CLS]", "sep_token": "[SEP]",
         "pad_token": "[PAD]", "mask_token": "[MASK]", "unk_token": "[UNK]", "model_max_length": 512,
         "strip_accents": None, "tokenize_chinese_chars": True},
        _template(["[CLS]", "$A", "[SEP]"], {"[CLS]": 2, "[SEP]": 3}), do_lower_case=True),
    "kalm": Replica(
        "qwen2", "qwen", "mean", True,
        {"query": "Instruct: Given a query, retrieve documents that answer the query \nQuery: "}, 512,
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "bos_token": None, "unk_token": None, "model_max_length": 32768}),
    "no-normalize": Replica("phi3", "word", "mean", False, {}, 512),
    "minilm": Replica(
        "bert", "bert", "mean", True, {}, 256,
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "cls_token": "[CLS]", "sep_token": "[SEP]",
         "pad_token": "[PAD]", "mask_token": "[MASK]", "unk_token": "[UNK]", "model_max_length": 512},
        _template(["[CLS]", "$A", "[SEP]"], {"[CLS]": 2, "[SEP]": 3})),
    "st6": Replica("llama", "word", "lasttoken", True, {"query": "query: ", "document": "passage: "}, 512, st6=True),
}
GEMMA_PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: ",
                 "Retrieval": "task: search result | query: ", "Clustering": "task: clustering | query: ",
                 # per-side task prompts, as the real folder has: mteb prefers them to the bare task type
                 "Retrieval-query": "task: search result | query: ", "Retrieval-document": "title: none | text: ",
                 "STS": "task: sentence similarity | query: ", "CodeRetrieval": "task: code retrieval | query: "}
IDENTITY, TANH = "torch.nn.modules.linear.Identity", "torch.nn.modules.activation.Tanh"
GEMMA_SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
DENSE_REPLICAS: dict[str, Replica] = {
    "embeddinggemma": Replica(
        "gemma3_text", "gemma", "mean", True, GEMMA_PROMPTS, 2048,
        {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
         "unk_token": "<unk>", "padding_side": "left", "model_max_length": 1000000000000000019884624838656},
        _template(["<bos>", "$A", "<eos>"], {"<bos>": 2, "<eos>": 1}),
        dense=((96, False, IDENTITY), (32, False, IDENTITY)),
        model_config={"use_bidirectional_attention": True, "sliding_window": 4, "pad_token_id": 0,
                      "eos_token_id": 1, "bos_token_id": 2,
                      "layer_types": ["sliding_attention", "full_attention"] * 2}),
    "labse-like": Replica(
        "bert", "bert", "cls", True, {}, 512,
        {"tokenizer_class": "BertTokenizer", "do_lower_case": False, "cls_token": "[CLS]", "sep_token": "[SEP]",
         "pad_token": "[PAD]", "mask_token": "[MASK]", "unk_token": "[UNK]", "model_max_length": 512},
        _template(["[CLS]", "$A", "[SEP]"], {"[CLS]": 2, "[SEP]": 3}), dense=((24, True, TANH),),
        dense_weights="pytorch_model.bin"),
}
VOCAB_SIZE = 512  # every replica tokenizer fits; the tiny models get this many embeddings


def _training_text() -> list[str]:
    prompts = [p for r in {**REPLICAS, **DENSE_REPLICAS}.values() for p in r.prompts.values()]
    texts = [" ".join(WORDS)] + [f"{d['title']} {d['text']}" for d in TINY_CORPUS] + [q["text"] for q in TINY_QUERIES]
    return (texts + prompts) * 5


def _trained_backend(kind: str):
    """A ``tokenizers.Tokenizer`` of the family's kind, trained on the test texts, special tokens first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "qwen":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(QWEN_SPECIALS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind in ("mistral", "gemma"):
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        specials = ["<unk>", "<s>", "</s>"] if kind == "mistral" else list(GEMMA_SPECIALS)
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    else:  # bert
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=400, show_progress=False,
                                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(_training_text(), trainer)
    return tok


def _write_tokenizer(folder: Path, r: Replica) -> None:
    from transformers import PreTrainedTokenizerFast

    if r.tokenizer == "word":
        build_tiny_tokenizer().save_pretrained(folder)
        return
    PreTrainedTokenizerFast(tokenizer_object=_trained_backend(r.tokenizer)).save_pretrained(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    if r.post_processor is not None:
        data["post_processor"] = r.post_processor
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**saved, **r.tokenizer_config}, indent=2))


def _legacy_pooling_config(r: Replica, dim: int) -> dict:
    modes = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
             "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
             "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
    return {"word_embedding_dimension": dim, **{key: mode == r.pooling for mode, key in modes.items()},
            "include_prompt": True}


def _save_with_sentence_transformers(folder: Path, r: Replica, dim: int) -> None:
    """Let sentence-transformers 6 write its own files for the HF folder ``folder`` (in place)."""
    import shutil

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    hf = folder.with_name(folder.name + "-hf")
    shutil.move(folder, hf)
    modules = [Transformer(str(hf), max_seq_length=r.max_seq_length), Pooling(dim, pooling_mode=r.pooling)]
    model = SentenceTransformer(modules=modules + [Normalize()] * r.normalize, prompts=r.prompts, device="cpu")
    model.save(str(folder))
    shutil.rmtree(hf)


def _write_st_files(folder: Path, r: Replica, dim: int) -> None:
    if r.st6:
        _save_with_sentence_transformers(folder, r, dim)
        return
    types = {name: LEGACY + name for name in ("Transformer", "Pooling", "Dense", "Normalize")}
    kinds = ["Transformer", "Pooling"] + ["Dense"] * len(r.dense) + ["Normalize"] * r.normalize
    modules = [{"idx": i, "name": str(i), "path": f"{i}_{kind}" if i else "", "type": types[kind]}
               for i, kind in enumerate(kinds)]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    _write_dense(folder, r, dim)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(_legacy_pooling_config(r, dim), indent=2))
    st_config = {"__version__": {"sentence_transformers": "3.0.1"}, "prompts": r.prompts, "default_prompt_name": None,
                 "similarity_fn_name": "cosine"}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))
    sbert = {"max_seq_length": r.max_seq_length, "do_lower_case": r.do_lower_case}
    (folder / "sentence_bert_config.json").write_text(json.dumps(sbert, indent=2))


def _write_dense(folder: Path, r: Replica, dim: int) -> None:
    """Each Dense module's folder as sentence-transformers saves it: config.json and linear.weight / linear.bias."""
    import torch
    from safetensors.torch import save_file

    for i, (out, bias, activation) in enumerate(r.dense, start=2):
        where = folder / f"{i}_Dense"
        where.mkdir()
        config = {"in_features": dim, "out_features": out, "bias": bias, "activation_function": activation}
        (where / "config.json").write_text(json.dumps(config, indent=4))
        state = {"linear.weight": torch.randn(out, dim) / dim ** 0.5}
        if bias:
            state["linear.bias"] = torch.randn(out) * 0.1
        if r.dense_weights == "model.safetensors":
            save_file(state, str(where / "model.safetensors"))
        else:
            torch.save(state, where / "pytorch_model.bin")
        dim = out


def build_replica(name: str, folder: Path, st_files: bool = True) -> Path:
    """Write replica ``name`` into ``folder`` (random weights, seed 0); ``st_files=False`` leaves a plain HF folder."""
    import torch
    from transformers import AutoModel

    r = REPLICAS.get(name) or DENSE_REPLICAS[name]
    config = tiny_config(r.model_type)
    config.vocab_size = VOCAB_SIZE
    for key, value in r.model_config.items():
        setattr(config, key, value)
    if r.tokenizer == "qwen":  # Qwen's pad / eos ids are its special tokens
        config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, None, 0
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    _write_tokenizer(folder, r)
    if st_files:
        _write_st_files(folder, r, config.hidden_size)
    return folder


def run_without_effir(script: str, tmp_path: Path, job) -> dict:
    """Run ``script`` (it reads ``job`` as JSON from argv[1], writes JSON to argv[2]) in a fresh interpreter that
    cannot import effir, offline, stdin closed (no prompt); return what it wrote."""
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "script.py").write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "script.py"), str(tmp_path / "job.json"),
                           str(tmp_path / "out.json")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


# Embeds each job's folder with sentence-transformers (run it with :func:`run_without_effir`): encode_query /
# encode_document, the prompts, pooling, modules (of each route, for a Router) and truncate_dim it loaded, and, for
# compressed folders, whether it refuses them without trust_remote_code.
ST_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["effir"] = None  # effir is pip-installed (editable) in this venv: make any import of it fail
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    def refusal(load):
        try:
            load()
        except Exception as e:
            return f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
        return None

    results = {}
    for job in json.load(open(sys.argv[1])):
        model = SentenceTransformer(job["dir"], device="cpu", trust_remote_code=job["remote"],
                                    truncate_dim=job.get("truncate_dim"))
        kw = {"prompt_name": job["prompt_name"]} if job["prompt_name"] else {}
        out = {"query": model.encode_query(job["texts"], convert_to_tensor=True, **kw).tolist(),
               "document": model.encode_document(job["texts"], convert_to_tensor=True).tolist(),
               "prompts": {k: v for k, v in model.prompts.items() if v},
               "truncate_dim": model.truncate_dim}
        if type(model[0]).__name__ == "Router":  # a query-side folder: the modules of each route
            out["modules"] = {route: [type(m).__name__ for m in seq] for route, seq in model[0].sub_modules.items()}
        else:
            out.update(pooling=model[1].pooling_mode, normalize=type(model[-1]).__name__ == "Normalize",
                       modules=[type(m).__name__ for m in model])
        if job["remote"]:
            out["refusals"] = [refusal(lambda: SentenceTransformer(job["dir"], device="cpu")),
                               refusal(lambda: AutoModel.from_pretrained(job["dir"]))]
        results[job["name"]] = out
    json.dump(results, open(sys.argv[2], "w"))
""")


def assert_same_dense(source: Path, written: Path) -> None:
    """``written`` holds each Dense module of ``source`` unchanged: the same config.json and tensors."""
    import torch
    from safetensors.torch import load_file

    dense = sorted(p.name for p in source.glob("*_Dense"))
    assert dense and sorted(p.name for p in written.glob("*_Dense")) == dense, (source, written)
    for name in dense:
        assert json.loads((written / name / "config.json").read_text()) == \
            json.loads((source / name / "config.json").read_text())
        weights = (load_file(str(source / name / "model.safetensors")) if (source / name / "model.safetensors")
                   .exists() else torch.load(source / name / "pytorch_model.bin", weights_only=True))
        saved = load_file(str(written / name / "model.safetensors"))
        assert saved.keys() == weights.keys() and all(torch.equal(saved[k], weights[k]) for k in weights)
