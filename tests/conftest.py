"""Shared fixtures: tiny random models of every architecture in the table, a word-level tokenizer, tiny BEIR data.

Nothing here touches the network: HF_HUB_OFFLINE is forced on so an accidental download fails at once.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
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
# off and on by EFFIR_CPU_BF16, so no CPU hides a failure of either path. Tests run under the fp32 path; those where
# the dtype matters run under both: save/load (BOTH_PATHS_MODULES), and the tests marked ``both_cpu_paths``
# (exactness after a kill, one end-to-end test per stage). EFFIR_TEST_CPU_BF16=0 or 1 runs every test under one path.
CPU_BF16_TEST_ENV = "EFFIR_TEST_CPU_BF16"
BOTH_PATHS_MODULES = {"test_checkpoint", "test_checkpoint_refs"}


def _cpu_bf16_paths(node) -> list[str]:
    forced = os.environ.get(CPU_BF16_TEST_ENV, "").strip()
    if forced in ("0", "1"):
        return [forced]
    both = Path(str(node.fspath)).stem in BOTH_PATHS_MODULES or node.get_closest_marker("both_cpu_paths")
    return ["0", "1"] if both else ["0"]


# Every architecture of the table runs the component tests. The stage tests (end to end, seconds each) run one
# architecture per distinct adapter by default and the others under -m slow: the stages reach the model only
# through its adapter, so a second model of the same adapter repeats the same code path.
def _adapter_representatives() -> set[str]:
    first: dict[int, str] = {}
    for mt, adapter in ADAPTERS.items():
        first.setdefault(id(adapter), mt)
    return set(first.values())


def _model_type_params(node) -> list:
    if "stages" not in Path(str(node.fspath)).parts:
        return sorted(ADAPTERS)
    shown = _adapter_representatives()
    return [mt if mt in shown else pytest.param(mt, marks=pytest.mark.slow) for mt in sorted(ADAPTERS)]


def pytest_generate_tests(metafunc):
    if "model_type" in metafunc.fixturenames:
        metafunc.parametrize("model_type", _model_type_params(metafunc.definition))
    paths = _cpu_bf16_paths(metafunc.definition)
    if len(paths) > 1 and "cpu_bf16" in metafunc.fixturenames:
        metafunc.parametrize("cpu_bf16", paths, indirect=True, ids=lambda v: "cpu-bf16" if v == "1" else "cpu-fp32")


@pytest.fixture(autouse=True)
def cpu_bf16(request, monkeypatch) -> bool:
    """Whether this test runs with the CPU's bf16 path forced on (EFFIR_CPU_BF16=1) or off (=0)."""
    value = getattr(request, "param", None) or _cpu_bf16_paths(request.node)[0]
    monkeypatch.setenv("EFFIR_CPU_BF16", value)
    return value == "1"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test caches into its own folder (never the user's cache, never another test's or xdist worker's), and an
    accidental BEIR download goes to a closed local port, never the internet. A test may set either again."""
    monkeypatch.setenv("EFFIR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EFFIR_BEIR_URL", "http://127.0.0.1:9")


def pytest_configure(config):
    """Under pytest-xdist, each worker computes with its share of the cores: N workers of all the threads each would
    oversubscribe the CPU (the tiny models gain nothing from more than one thread anyway)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


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


SRC = Path(__file__).resolve().parents[1] / "src"
EXACT_THREADS = "1"
"""Threads of every process an exactness test compares: float sums split over more threads round differently (on
AMD EPYC, 2 threads against 1 moved a finetune loss by 4e-4 at step 3), so both sides must use the same number."""


def effir_env(**extra: str) -> dict[str, str]:
    """The environment of an ``effir`` process started by a test: this checkout's sources, no hub, one process
    (no inherited torchrun variables) and a fixed thread count, plus ``extra``."""
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS=EXACT_THREADS, HF_HUB_OFFLINE="1", **extra)
    env.pop("WORLD_SIZE", None)
    return env


def run_effir(argv: list, **extra_env: str) -> subprocess.CompletedProcess:
    """``python -m effir ARGV`` in a process of its own (see :func:`effir_env`). Exactness tests run every side of
    their comparison this way, never one side inside the pytest process, whose thread count differs."""
    return subprocess.run([sys.executable, "-m", "effir", *map(str, argv)], env=effir_env(**extra_env),
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def needs_scifact():
    return pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").exists(), reason=f"SciFact not found at {SCIFACT}")


def flag_jsonl_with_negatives(path: Path, n: int = 8) -> Path:
    """A FlagEmbedding jsonl of ``n`` queries, each with one positive and one negative of its own."""
    rows = [{"query": f"q{i} " + WORDS[i], "pos": [f"positive {i} " + WORDS[i + 1]],
             "neg": [f"negative {i} " + WORDS[i + 2]]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
