"""Shared fixtures: tiny random models of every architecture in the table, a word-level tokenizer, tiny BEIR data.

Nothing here touches the network: HF_HUB_OFFLINE is forced on so an accidental download fails at once.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from effir.arch import ADAPTERS  # noqa: E402

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
WORDS = ("the a of and to in is for on with that by as be are was it this from or an at which paris france capital "
         "city river water fish sun moon star planet cat dog bird tree leaf blue green red cell protein gene "
         "cancer drug study trial patient effect risk dose vaccine virus query document what how why who").split()


def tiny_config(model_type: str):
    from transformers import AutoConfig

    kw = dict(TINY)
    if model_type == "bert":  # BERT has no GQA / head_dim settings
        kw.pop("num_key_value_heads")
        kw.pop("head_dim")
        kw["type_vocab_size"] = 2
    return AutoConfig.for_model(model_type, **kw)


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(16)


# The CPU's bf16 path (``--dtype auto`` / ``--precision auto`` pick bf16 on CPUs with avx512_bf16 / AMX) is forced
# off and on by EFFIR_CPU_BF16, so no CPU hides a failure of either path. The stage tests and the load/save tests run
# under both (but those marked one_cpu_path: harness tests whose stages are tested under both); everything else under
# the fp32 path. EFFIR_TEST_CPU_BF16=0 or 1 runs the whole suite under one path.
CPU_BF16_TEST_ENV = "EFFIR_TEST_CPU_BF16"
BOTH_PATHS_MODULES = {"test_checkpoint", "test_checkpoint_refs", "test_encoder", "test_export"}


def _cpu_bf16_paths(path: Path) -> list[str]:
    forced = os.environ.get(CPU_BF16_TEST_ENV, "").strip()
    if forced in ("0", "1"):
        return [forced]
    return ["0", "1"] if "stages" in path.parts or path.stem in BOTH_PATHS_MODULES else ["0"]


def pytest_generate_tests(metafunc):
    paths = _cpu_bf16_paths(Path(str(metafunc.definition.fspath)))
    if metafunc.definition.get_closest_marker("one_cpu_path"):
        return
    if len(paths) > 1 and "cpu_bf16" in metafunc.fixturenames:
        metafunc.parametrize("cpu_bf16", paths, indirect=True, ids=lambda v: "cpu-bf16" if v == "1" else "cpu-fp32")


@pytest.fixture(autouse=True)
def cpu_bf16(request, monkeypatch) -> bool:
    """Whether this test runs with the CPU's bf16 path forced on (EFFIR_CPU_BF16=1) or off (=0)."""
    value = getattr(request, "param", None) or _cpu_bf16_paths(Path(str(request.node.fspath)))[0]
    monkeypatch.setenv("EFFIR_CPU_BF16", value)
    return value == "1"


@pytest.fixture
def encoded(monkeypatch) -> dict:
    """How many texts of each side any model embedded through ``Encoder.encode`` while the test runs."""
    from effir.encoder import Encoder

    counted = {"query": 0, "document": 0}
    encode = Encoder.encode

    def counting(self, texts, side, *a, **k):
        counted[side] += len(texts)
        return encode(self, texts, side, *a, **k)

    monkeypatch.setattr(Encoder, "encode", counting)
    return counted


@pytest.fixture(scope="session")
def _tiny_models():
    from transformers import AutoModel

    torch.manual_seed(0)
    models = {}
    for mt in ADAPTERS:
        m = AutoModel.from_config(tiny_config(mt), attn_implementation="eager")
        m.eval()
        models[mt] = m
    return models


@pytest.fixture(params=sorted(ADAPTERS))
def model_type(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(_tiny_models, model_type):
    """A fresh (deep-copied) tiny random model of ``model_type``, fp32, eval mode."""
    return copy.deepcopy(_tiny_models[model_type])


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_model, tiny_tokenizer) -> Path:
    """The tiny model and tokenizer saved with ``save_pretrained``, as a real run would find them on disk."""
    d = tmp_path / f"tiny-{tiny_model.config.model_type}"
    tiny_model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, _tiny_models) -> Path:
    """One saved tiny llama, shared by CLI tests that do not need every architecture."""
    d = tmp_path_factory.mktemp("tiny-llama")
    _tiny_models["llama"].save_pretrained(d)
    build_tiny_tokenizer().save_pretrained(d)
    return d


TINY_CORPUS = [
    {"_id": "d1", "title": "paris", "text": "paris is the capital of france"},
    {"_id": "d2", "title": "river", "text": "the river in the city is blue water"},
    {"_id": "d3", "title": "fish", "text": "a fish is in the water of the river"},
    {"_id": "d4", "title": "sun", "text": "the sun is a star and the moon is not"},
    {"_id": "d5", "title": "cell", "text": "a cell protein and a gene in cancer"},
    {"_id": "d6", "title": "vaccine", "text": "the vaccine trial in patient study of risk"},
]
TINY_QUERIES = [
    {"_id": "q1", "text": "what is the capital of france"},
    {"_id": "q2", "text": "what is in the river water"},
    {"_id": "q3", "text": "vaccine risk in a trial"},
]
TINY_QRELS = [("q1", "d1", 1), ("q2", "d2", 1), ("q2", "d3", 1), ("q3", "d6", 2)]


def write_beir(folder: Path, corpus=TINY_CORPUS, queries=TINY_QUERIES, qrels=TINY_QRELS, split="test") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels").mkdir(exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def tiny_beir(tmp_path) -> Path:
    """6 documents, 3 queries, a ``test`` split, in the BEIR folder layout."""
    return write_beir(tmp_path / "tiny-beir")


def needs_scifact():
    return pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").exists(), reason=f"SciFact not found at {SCIFACT}")


def flag_jsonl_with_negatives(path: Path, n: int = 8) -> Path:
    """A FlagEmbedding jsonl of ``n`` queries, each with one positive and one negative of its own."""
    rows = [{"query": f"q{i} " + WORDS[i], "pos": [f"positive {i} " + WORDS[i + 1]],
             "neg": [f"negative {i} " + WORDS[i + 2]]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
