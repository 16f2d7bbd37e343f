"""`effir distill` end to end on tiny models: zero loss against itself (embeddings and block outputs), the parent
encoded once, resume after a kill, the saved student, and one-line errors on bad input."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_CORPUS, TINY_QUERIES, WORDS, run_effir, write_beir

import effir
from effir.cli import main
from effir.distillation import pseudo_queries, read_texts

EXTRA = [{"_id": f"x{i}", "title": "", "text": f"the {w} and the {v} in the city. a {v} is in the {w} water."}
         for i, (w, v) in enumerate(zip(WORDS[20:30], WORDS[30:40], strict=True))]
QUERIES = [*TINY_QUERIES, {"_id": "q4", "text": "the cat and the dog"}, {"_id": "q5", "text": "a gene in a cell"}]


@pytest.fixture
def texts_dir(tmp_path):
    return write_beir(tmp_path / "beir", corpus=TINY_CORPUS + EXTRA, queries=QUERIES, qrels=[])


def _args(student, teacher, texts, out, *extra):
    return ["distill", str(student), "--teacher", str(teacher), "--texts", str(texts), "--output", str(out),
            "--device", "cpu", "--no-progress", "--batch-size", "4", "--lr", "5e-3", "--precision", "fp32",
            "--teacher-dtype", "fp32", *map(str, extra)]


def _log(out):
    return [json.loads(line) for line in (Path(out) / "distill_log.jsonl").read_text().splitlines()]


def _dropped(src, out):
    assert main(["drop", str(src), "--strategy", "last", "--mlp", "1", "--output", str(out), "--device", "cpu"]) == 0
    return out / "model"


def test_a_student_equal_to_its_parent_has_zero_loss(tiny_llama_dir, texts_dir, tmp_path):
    out = tmp_path / "same"
    assert main(_args(tiny_llama_dir, tiny_llama_dir, f"beir:{texts_dir}", out, "--max-steps", 2,
                      "--kl-weight", 1)) == 0
    first = _log(out)[0]
    # LoRA starts as the identity: same embeddings, same in-batch distributions
    assert first["loss"] == pytest.approx(0.0, abs=1e-6)
    assert first["embedding"] == pytest.approx(0.0, abs=1e-6) and first["kl_qd"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mode, kind", [([], "cosine"), (["--query-side", "--hidden-loss", "nmse"], "nmse")],
                         ids=["both-sides", "query-side"])
def test_a_student_equal_to_its_parent_has_zero_hidden_loss(tiny_llama_dir, texts_dir, tmp_path, mode, kind):
    out = tmp_path / "same"
    assert main(_args(tiny_llama_dir, tiny_llama_dir, f"beir:{texts_dir}", out, "--max-steps", 2, "--hidden-weight",
                      0.5, *mode)) == 0
    first = _log(out)[0]  # LoRA starts as the identity: every block's output is the parent's, token for token
    assert first["hidden"] == 0.0 and first["hidden_weight"] == 0.5 and first["hidden_loss"] == kind
    assert json.loads((out / "distill.json").read_text())["args"]["hidden_weight"] == 0.5
    meta = json.loads((out / "model" / "effir.json").read_text())
    assert meta["history"][-1]["hidden_weight"] == 0.5 and meta["history"][-1]["hidden_loss"] == kind


def test_the_hidden_loss_trains_every_architecture(tiny_model_dir, texts_dir, tmp_path):
    student = _damaged(tiny_model_dir, tmp_path / "student")
    out = tmp_path / "run"
    assert main(_args(student, tiny_model_dir, f"beir:{texts_dir}", out, "--max-steps", 8, "--schedule", "constant",
                      "--hidden-weight", 1, "--embedding-weight", 0)) == 0
    hidden = [r["hidden"] for r in _log(out)]
    assert hidden[0] > 0 and max(hidden[-2:]) < 0.8 * hidden[0]
    assert "embedding" not in _log(out)[0]  # the block outputs alone: a loss of its own, not an add-on


def test_activation_checkpointing_does_not_change_the_hidden_loss(tiny_llama_dir, texts_dir, tmp_path):
    # the block outputs are taken by hooks that are gone before the backward pass recomputes the blocks
    student = _damaged(tiny_llama_dir, tmp_path / "student")
    runs = {"plain": [], "checkpointed": ["--gradient-checkpointing"]}
    for name, extra in runs.items():
        assert main(_args(student, tiny_llama_dir, f"beir:{texts_dir}", tmp_path / name, "--max-steps", 3,
                          "--hidden-weight", 1, *extra)) == 0
    plain, checkpointed = _log(tmp_path / "plain"), _log(tmp_path / "checkpointed")
    assert [r["hidden"] for r in checkpointed] == pytest.approx([r["hidden"] for r in plain], abs=1e-6)
    assert plain[-1]["hidden"] != plain[0]["hidden"]  # the steps trained: the later losses compare trained weights


def test_the_parent_encodes_each_text_once(tiny_llama_dir, texts_dir, tmp_path, encoded):
    student = _dropped(tiny_llama_dir, tmp_path / "student")
    texts = read_texts([f"beir:{texts_dir}"], 200, None, 42)
    assert main(_args(student, tiny_llama_dir, f"beir:{texts_dir}", tmp_path / "a", "--max-steps", 3)) == 0
    assert encoded == {"query": len(texts.queries), "document": len(texts.documents)}  # not once per step
    assert main(_args(student, tiny_llama_dir, f"beir:{texts_dir}", tmp_path / "b", "--max-steps", 3)) == 0
    assert encoded == {"query": len(texts.queries), "document": len(texts.documents)}  # the cache serves run 2
    assert [r["loss"] for r in _log(tmp_path / "a")] == [r["loss"] for r in _log(tmp_path / "b")]


def _damaged(parent, out):
    """A damaged copy of the parent: far from it, as a compressed model starts."""
    from effir.checkpoint import save

    enc = effir.load(parent, device="cpu", dtype="fp32")
    with torch.no_grad():
        for p in enc.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save(enc, out, {"stage": "drop", "model": str(parent)})


@pytest.mark.both_cpu_paths
def test_distillation_moves_the_student_towards_its_parent(tiny_llama_dir, texts_dir, tmp_path):
    student = _damaged(tiny_llama_dir, tmp_path / "student")
    out = tmp_path / "run"
    assert main(_args(student, tiny_llama_dir, f"beir:{texts_dir}", out, "--max-steps", 12, "--schedule",
                      "constant")) == 0
    parent = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    texts = read_texts([f"beir:{texts_dir}"], 200, None, 42).documents

    def distance(model_dir):
        enc = effir.load(model_dir, device="cpu", dtype="fp32")
        return (1 - (enc.encode(texts, "document") * parent.encode(texts, "document")).sum(-1)).mean().item()

    assert distance(out / "model") < 0.5 * distance(student)
    assert json.loads((out / "model" / "effir.json").read_text())["history"][-1]["stage"] == "distill"
    summary = json.loads((out / "distill.json").read_text())
    assert summary["steps"] == 12 and summary["teacher"] == str(tiny_llama_dir)


@pytest.mark.parametrize("mode", [[], ["--query-side"], ["--hidden-weight", 1]],
                         ids=["both-sides", "query-side", "hidden"])
@pytest.mark.both_cpu_paths
def test_kill_9_then_the_same_command_resumes_exactly(tiny_llama_dir, texts_dir, tmp_path, mode):
    student = _dropped(tiny_llama_dir, tmp_path / "student")
    common = ["--max-steps", 5, "--save-every", 2, "--kl-weight", 1, *mode]
    args = _args(student, tiny_llama_dir, f"beir:{texts_dir}", tmp_path / "ref", *common)
    killed = _args(student, tiny_llama_dir, f"beir:{texts_dir}", tmp_path / "k", *common)
    # every run in a process of its own with the same thread count: bit-identical losses, compared with ==
    assert run_effir(args).returncode == 0
    proc = run_effir(killed, EFFIR_TEST_KILL_AT_STEP="3")
    assert proc.returncode == -9, proc.stderr[-2000:]
    proc = run_effir(killed)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["step"] for r in _log(tmp_path / "k")] == list(range(1, 6))
    assert [r["loss"] for r in _log(tmp_path / "k")] == [r["loss"] for r in _log(tmp_path / "ref")]


def test_texts_without_queries_give_one_sentence_per_passage(tmp_path):
    prose = tmp_path / "prose.txt"
    prose.write_text("The river runs through the city. The fish swim in the blue water.\n\n"
                     "The sun is a star. The moon is not a star but it shines at night.\n")
    texts = read_texts([str(prose)], 200, None, 0)
    assert len(texts.documents) == 2 and len(texts.queries) == 2
    assert all(q in d for q, d in zip(texts.queries, texts.documents, strict=True))
    assert pseudo_queries(["One two three four five six. Seven"], 0) == ["One two three four five six."]


def _other_width_model(tmp_path, tokenizer_dir):
    from transformers import AutoConfig, AutoModel

    from effir.checkpoint import load as _  # noqa: F401  (effir's import side effects)

    other = tmp_path / "wide"
    AutoModel.from_config(AutoConfig.for_model("llama", **{**TINY, "hidden_size": 48, "head_dim": 12})).save_pretrained(
        other)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (other / f).write_bytes((tokenizer_dir / f).read_bytes())
    return other


def _other_depth_model(tmp_path, tokenizer_dir):
    from transformers import AutoConfig, AutoModel

    other = tmp_path / "deep"
    AutoModel.from_config(AutoConfig.for_model("llama", **{**TINY, "num_hidden_layers": 5})).save_pretrained(other)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (other / f).write_bytes((tokenizer_dir / f).read_bytes())
    return other


def _other_tokenizer_model(tmp_path, model_dir):
    """The same weights with a tokenizer whose ids mean other words: the same shapes, other tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = tmp_path / "retokenized"
    other.mkdir()
    for f in model_dir.iterdir():
        if f.suffix in (".json", ".safetensors") and not f.name.startswith("tokenizer"):
            (other / f.name).write_bytes(f.read_bytes())
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, **{w: i + 4 for i, w in enumerate(reversed(WORDS[:60]))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                            unk_token="[UNK]").save_pretrained(other)
    return other


HIDDEN_REFUSALS = {"hidden-depth": (_other_depth_model, "5 blocks of width 32"),
                   "hidden-width": (_other_width_model, "4 blocks of width 48"),
                   "hidden-tokenizer": (_other_tokenizer_model, "another tokenizer")}


@pytest.mark.parametrize("case", ["teacher-size", "empty-text", "missing-text", "bad-weights", *HIDDEN_REFUSALS])
def test_bad_input_is_one_line(tiny_llama_dir, texts_dir, tmp_path, capsys, case):
    texts, extra = f"beir:{texts_dir}", []
    teacher = tiny_llama_dir
    if case == "teacher-size":
        teacher = _other_width_model(tmp_path, tiny_llama_dir)
    elif case in HIDDEN_REFUSALS:
        teacher, extra = HIDDEN_REFUSALS[case][0](tmp_path, tiny_llama_dir), ["--hidden-weight", "1"]
    elif case == "empty-text":
        texts = tmp_path / "empty.txt"
        texts.write_text("\n")
    elif case == "missing-text":
        texts = tmp_path / "nope.txt"
    else:
        extra = ["--embedding-weight", "0", "--kl-weight", "0"]
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(_args(tiny_llama_dir, teacher, texts, out, "--max-steps", 1, *extra)) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not (out / "distill.json").exists() and not (out / "model").exists()
    if case == "teacher-size":
        assert "48 dimensions" in lines[0] and "--embedding-weight 0" in lines[0]
    if case in HIDDEN_REFUSALS:  # refused from configs and tokenizers, before the output folder is made
        assert HIDDEN_REFUSALS[case][1] in lines[0] and "--hidden-weight 0" in lines[0] and not out.exists()


def test_a_parent_of_another_size_trains_on_similarities_alone(tiny_llama_dir, texts_dir, tmp_path):
    teacher = _other_width_model(tmp_path, tiny_llama_dir)
    out = tmp_path / "out"
    assert main(_args(tiny_llama_dir, teacher, f"beir:{texts_dir}", out, "--max-steps", 2, "--embedding-weight",
                      "0", "--kl-weight", "1")) == 0
    assert "embedding" not in _log(out)[0] and _log(out)[0]["kl_dd"] > 0


def test_query_side_trains_queries_only_and_keeps_the_parents_documents(tiny_llama_dir, texts_dir, tmp_path,
                                                                       monkeypatch, encoded):
    same = tmp_path / "same"
    assert main(_args(tiny_llama_dir, tiny_llama_dir, f"beir:{texts_dir}", same, "--max-steps", 2, "--kl-weight", 1,
                      "--query-side")) == 0
    first = _log(same)[0]  # LoRA starts as the identity: the student's queries are the parent's
    assert first["loss"] == pytest.approx(0.0, abs=1e-6) and first["kl_qd"] == pytest.approx(0.0, abs=1e-6)
    assert "kl_dd" not in first

    encoded.update(query=0, document=0)
    monkeypatch.setenv("EFFIR_CACHE", str(tmp_path / "fresh-cache"))  # the run above cached the parent's queries
    student = _damaged(tiny_llama_dir, tmp_path / "student")
    out = tmp_path / "run"
    assert main(_args(student, tiny_llama_dir, f"beir:{texts_dir}", out, "--max-steps", 12, "--query-side",
                      "--schedule", "constant")) == 0
    texts = read_texts([f"beir:{texts_dir}"], 200, None, 42)
    assert encoded == {"query": len(texts.queries), "document": 0}  # the parent embeds no document for this loss
    model = effir.load(out / "model", device="cpu", dtype="fp32")
    parent = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    before = effir.load(student, device="cpu", dtype="fp32")
    assert torch.equal(model.encode_documents(texts.documents), parent.encode_documents(texts.documents))

    def distance(enc):
        return (1 - (enc.encode_queries(texts.queries) * parent.encode_queries(texts.queries)).sum(-1)).mean().item()

    assert distance(model) < 0.5 * distance(before)
    meta = json.loads((out / "model" / "effir.json").read_text())
    assert meta["routes"] and meta["history"][-1]["query_side"]


def test_query_side_needs_the_parents_space_even_without_the_embedding_loss(tiny_llama_dir, texts_dir, tmp_path,
                                                                            capsys):
    teacher = _other_width_model(tmp_path, tiny_llama_dir)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(_args(tiny_llama_dir, teacher, f"beir:{texts_dir}", out, "--max-steps", 1, "--query-side",
                      "--embedding-weight", 0, "--kl-weight", 1)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--query-side" in err and "same space" in err, err
    assert not (out / "model").exists()
