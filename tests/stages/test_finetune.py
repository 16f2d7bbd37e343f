"""``effir finetune`` end to end on tiny models: outputs, LoRA vs full, resume after kill -9, 2 processes, errors."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_CORPUS,
    build_tiny_tokenizer,
    effir_env,
    flag_jsonl_with_negatives,
    needs_scifact,
    run_effir,
    write_beir,
)
from safetensors.torch import load_file

import effir
from effir.cli import main

EXTRA = [{"_id": f"x{i}", "title": w, "text": f"the {w} and the {v} in the city"}
         for i, (w, v) in enumerate(zip("cat dog bird tree leaf star moon planet gene drug".split(),
                                        "sun fish water river blue green red cell protein risk".split(), strict=True))]
QUERIES = [{"_id": f"q{i}", "text": t} for i, t in enumerate(
    ["capital of france", "river water", "fish in water", "the sun star", "cell protein gene", "vaccine trial",
     "the cat", "a dog", "bird tree", "green leaf", "the moon", "drug risk"])]
QRELS = [("q0", "d1", 1), ("q1", "d2", 1), ("q2", "d3", 1), ("q3", "d4", 1), ("q4", "d5", 1), ("q5", "d6", 1),
         ("q6", "x0", 1), ("q7", "x1", 1), ("q8", "x2", 1), ("q9", "x4", 1), ("q10", "x6", 1), ("q11", "x9", 1)]
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def train_dir(tmp_path):
    return write_beir(tmp_path / "beir", corpus=TINY_CORPUS + EXTRA, queries=QUERIES, qrels=QRELS, split="train")


def _args(model, data, out, *extra):
    return ["finetune", str(model), "--train", str(data), "--output", str(out), "--device", "cpu", "--no-progress",
            "--num-negatives", "3", "--mine-range", "0-8", "--batch-size", "2", "--lr", "5e-3", *map(str, extra)]


def _log(out):
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def _one_error_line(capsys) -> str:
    """The CLI's error: exactly one line, the last on stderr (library progress bars may precede it), no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err[-2000:]
    return errors[0]


@pytest.mark.both_cpu_paths
def test_lora_run_writes_everything_and_changes_only_lora_parameters(tiny_llama_dir, train_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_llama_dir, train_dir, out, "--max-steps", 3, "--save-every", 2)) == 0
    assert {p.name for p in out.iterdir()} >= {"train_data.jsonl", "train_log.jsonl", "model", "finetune.json",
                                              "checkpoints"}
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["tokens"] > 0 and r["lr"] > 0 for r in log)
    # the checkpoint holds LoRA weights only; non-target weights of the merged model are untouched
    ckpt = torch.load(next((out / "checkpoints").iterdir()) / "trainable.pt")
    assert ckpt and all("lora_" in k for k in ckpt)
    before = load_file(tiny_llama_dir / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    targets = effir.load(tiny_llama_dir, device="cpu").adapter.lora_targets
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(f".{t}." in k for t in targets) for k in changed)
    enc = effir.load(out / "model", device="cpu")
    assert enc.meta["history"][-1]["stage"] == "finetune"
    assert enc.settings.document_max_length == 512  # training lengths do not leak into the saved model
    # the prepared data never holds a positive among the negatives
    for row in map(json.loads, (out / "train_data.jsonl").read_text().splitlines()):
        assert not set(row["neg_ids"]) & set(row["pos_ids"])
    assert main(_args(tiny_llama_dir, train_dir, out, "--max-steps", 3)) == 2  # finished: refuses to redo
    assert main(_args(tiny_llama_dir, train_dir, out, "--max-steps", 1, "--overwrite")) == 0
    assert len(_log(out)) == 1 and not (out / "checkpoints").exists()


def test_full_finetuning_changes_embeddings(tiny_llama_dir, train_dir, tmp_path):
    out = tmp_path / "full"
    assert main(_args(tiny_llama_dir, train_dir, out, "--max-steps", 2, "--full", "--lr", "1e-3")) == 0
    before = load_file(tiny_llama_dir / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert not torch.equal(before["embed_tokens.weight"], after["embed_tokens.weight"])


def test_dense_teacher_equal_to_student_gives_zero_kl_at_first_step(tiny_llama_dir, train_dir, tmp_path):
    out = tmp_path / "kl"
    assert main(_args(tiny_llama_dir, train_dir, out, "--max-steps", 2, "--teacher", tiny_llama_dir,
                      "--kl-weight", 0.5, "--precision", "fp32")) == 0
    log = _log(out)
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # LoRA starts as the identity: student == teacher
    assert log[0]["loss"] == pytest.approx(log[0]["info_nce"] + 0.5 * log[0]["kl"], rel=1e-5)
    assert log[1]["kl"] > 0


@pytest.mark.both_cpu_paths
def test_kill_9_then_same_command_resumes_exactly(tiny_llama_dir, train_dir, tmp_path):
    # every run in a process of its own with the same thread count (run_effir): the promise is bit-identity for the
    # same process layout, so losses and weights are compared with ==, not a tolerance
    ref = tmp_path / "ref"
    assert run_effir(_args(tiny_llama_dir, train_dir, ref, "--max-steps", 6, "--save-every", 2)).returncode == 0
    out = tmp_path / "killed"
    # --overwrite must not defeat resuming: it only replaces finished runs or checkpoints of other arguments
    args = _args(tiny_llama_dir, train_dir, out, "--max-steps", 6, "--save-every", 2, "--overwrite")
    proc = run_effir(args, EFFIR_TEST_KILL_AT_STEP="3")  # SIGKILL after step 3: one step past the step-2 checkpoint
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [r["step"] for r in _log(out)] == [1, 2, 3] and not (out / "model").exists()
    proc = run_effir(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, want = _log(out), _log(ref)
    assert [r["step"] for r in got] == list(range(1, 7))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    a, b = load_file(ref / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_llama_dir, train_dir, tmp_path):
    one = tmp_path / "one"
    exact = ["--max-steps", 2, "--precision", "fp32"]  # bf16 rounding differs with the batch's shape
    # the one process runs like each of the two (run_effir: same thread count): only the layout differs
    assert run_effir(_args(tiny_llama_dir, train_dir, one, *exact, "--batch-size", 4)).returncode == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "effir",
           *_args(tiny_llama_dir, train_dir, two, *exact, "--batch-size", 2)]
    proc = subprocess.run(cmd, env=effir_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _log(one), _log(two)
    assert a[0]["tokens"] == b[0]["tokens"]
    # step 1: same loss with in-batch negatives gathered; step 2: same gradients were applied in step 1 (to float
    # rounding: the two processes sum the batch in another order)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6, abs=1e-5)


@pytest.mark.parametrize("variant", [["--grad-accum", "2", "--batch-size", "2"], ["--gradient-checkpointing"]])
def test_accumulation_and_checkpointing_do_not_change_the_losses(tiny_llama_dir, train_dir, tmp_path, variant):
    # without in-batch negatives, 2 micro-batches of 2 queries are exactly one batch of 4
    exact = ["--max-steps", 2, "--no-in-batch", "--batch-size", 4, "--precision", "fp32"]  # pinned: bf16 rounds
    assert main(_args(tiny_llama_dir, train_dir, tmp_path / "a", *exact)) == 0  # differently per micro-batch
    assert main([*_args(tiny_llama_dir, train_dir, tmp_path / "b", *exact), *variant]) == 0
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-5)
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]


def test_train_split_without_positives(tiny_llama_dir, tmp_path, capsys):
    data = write_beir(tmp_path / "b", qrels=[("q1", "d1", 0), ("q2", "d2", 0)], split="train")
    assert main(_args(tiny_llama_dir, data, tmp_path / "o", "--max-steps", 1)) == 2
    err = _one_error_line(capsys)
    assert "no training query has a positive" in err


def test_teacher_with_another_tokenizer(tiny_llama_dir, train_dir, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModel, PreTrainedTokenizerFast

    other = tmp_path / "other"
    AutoModel.from_pretrained(tiny_llama_dir).save_pretrained(other)
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, "zebra": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                            unk_token="[UNK]").save_pretrained(other)
    assert main(_args(tiny_llama_dir, train_dir, tmp_path / "o", "--max-steps", 1, "--teacher", other)) == 2
    err = _one_error_line(capsys)
    assert "another tokenizer" in err


def test_lora_targets_not_in_the_model(tiny_llama_dir, train_dir, tmp_path, capsys):
    assert main(_args(tiny_llama_dir, train_dir, tmp_path / "o", "--max-steps", 1, "--lora-targets",
                      "q_proj,attn_c")) == 2
    err = _one_error_line(capsys)
    assert "attn_c" in err and "not in the model" in err


# --save-dtype sets the dtype LoRA's frozen base trains in: a resume key though no run key list ever named it
@pytest.mark.parametrize("other, key", [(["--lr", "1e-3"], "lr"), (["--save-dtype", "bf16"], "save_dtype")])
def test_resume_from_a_checkpoint_of_another_run(tiny_llama_dir, train_dir, tmp_path, capsys, other, key):
    a = tmp_path / "a"
    assert main(_args(tiny_llama_dir, train_dir, a, "--max-steps", 2, "--save-every", 1)) == 0
    ckpt = next((a / "checkpoints").iterdir())
    assert main(_args(tiny_llama_dir, train_dir, tmp_path / "b", "--max-steps", 2, *other, "--resume", ckpt)) == 2
    err = _one_error_line(capsys)
    assert "belongs to another run" in err and f"{key}:" in err


class _PlantedCode:
    """Pickled, it makes unpickling open (create) ``path``: a stand-in for any code planted in a checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("planted", ["rng-0.pt", "optimizer.pt", "trainable.pt", "scheduler.pt"])
def test_a_pickle_planted_in_a_checkpoint_never_runs(tiny_llama_dir, train_dir, tmp_path, capsys, planted):
    a = tmp_path / "a"
    assert main(_args(tiny_llama_dir, train_dir, a, "--max-steps", 2, "--save-every", 1)) == 0
    ckpt = sorted((a / "checkpoints").iterdir())[0]
    assert {"rng-0.json", "state.json", "optimizer.pt"} <= {p.name for p in ckpt.iterdir()}  # RNG state as JSON
    marker = tmp_path / "ran"
    torch.save({"state": _PlantedCode(marker)}, ckpt / planted)
    capsys.readouterr()
    rc = main(_args(tiny_llama_dir, train_dir, tmp_path / "b", "--max-steps", 2, "--save-every", 1, "--resume", ckpt))
    assert not marker.exists()
    if planted == "rng-0.pt":  # effir's RNG state was pickled there; now nothing reads a pickle for it
        assert rc == 0
    else:
        assert rc == 2 and "nothing in it was run" in _one_error_line(capsys)
        assert not (tmp_path / "b" / "finetune.json").exists()


@pytest.mark.parametrize("save_dtype, stored", [([], "F32"), (["--save-dtype", "bf16"], "BF16")])
@pytest.mark.both_cpu_paths
def test_the_saved_dtype_is_the_source_dtype_unless_asked(tiny_llama_dir, train_dir, tmp_path, save_dtype, stored,
                                                        cpu_bf16):
    """Under the CPU's bf16 path too: computing in bf16 never rounds the fp32 weights that are saved."""
    from safetensors import safe_open

    out = tmp_path / "run"
    assert main(_args(tiny_llama_dir, train_dir, out, "--max-steps", 1, *save_dtype)) == 0
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {stored}


def test_flag_jsonl_with_teacher_scores(tiny_llama_dir, tmp_path):
    rows = [{"query": f"what {w}", "pos": [f"the {w}"], "neg": ["a cat", "the sun", "blue water"],
             "pos_scores": [3.0], "neg_scores": [1.0, 0.0, -1.0]} for w in ("fish", "river", "dog", "tree")]
    data = tmp_path / "flag.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    assert main(_args(tiny_llama_dir, data, out, "--max-steps", 2, "--teacher", "data", "--num-negatives", 2,
                      "--no-in-batch")) == 0
    assert all(r["kl"] is not None and r["kl"] > 0 for r in _log(out))


def test_cross_encoder_teacher_scores_once_and_caches(tiny_llama_dir, train_dir, tmp_path):
    from conftest import tiny_config
    from transformers import AutoModelForSequenceClassification

    cfg = tiny_config("llama")
    cfg.num_labels = 1
    ce = tmp_path / "ce"
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(ce)
    build_tiny_tokenizer().save_pretrained(ce)
    out = tmp_path / "o"
    args = _args(tiny_llama_dir, train_dir, out, "--max-steps", 2, "--teacher", ce)
    assert main([*args, "--prepare-only"]) == 0
    rows = [json.loads(line) for line in (out / "train_data.jsonl").read_text().splitlines()]
    assert all(len(r["neg_scores"]) == len(r["neg"]) == 3 and len(r["pos_scores"]) == len(r["pos"]) for r in rows)
    stamp = (out / "train_data.jsonl").stat().st_mtime_ns
    assert main(args) == 0  # the cached scores are reused, not recomputed
    assert (out / "train_data.jsonl").stat().st_mtime_ns == stamp
    assert all(r["kl"] is not None for r in _log(out))


def _embeddings(enc) -> torch.Tensor:
    texts = ["capital of france", "the river water is blue", "a cat and a dog in the city"]
    return torch.cat([enc.encode(texts, "query"), enc.encode(texts, "document")])  # (6, H)


def test_every_architecture_lora_step(tiny_model_dir, train_dir, tmp_path, monkeypatch):
    """One LoRA step on every architecture: the saved (merged) model embeds as the trained, unmerged PEFT model did,
    and no longer as the base model."""
    from effir import training

    real, unmerged = training.finished_model, []

    def before_merging(model, **kwargs):  # finetune hands the trained PEFT model over to be merged
        enc = effir.load(tiny_model_dir, device="cpu", dtype="fp32")
        enc.model = model.eval()
        unmerged.append(_embeddings(enc))
        return real(model, **kwargs)

    monkeypatch.setattr(training, "finished_model", before_merging)
    # fp32: with bf16, accelerate.prepare left the PEFT model's forward in autocast; the saved model runs without it
    assert main(_args(tiny_model_dir, train_dir, tmp_path / "o", "--max-steps", 1, "--precision", "fp32")) == 0
    assert (tmp_path / "o" / "model" / "effir.json").exists()
    merged = _embeddings(effir.load(tmp_path / "o" / "model", device="cpu", dtype="fp32"))
    base = _embeddings(effir.load(tiny_model_dir, device="cpu", dtype="fp32"))
    # fp32 throughout: W + s*B@A applied at once differs from W x + s*B(A x) by rounding only
    torch.testing.assert_close(merged, unmerged[0], atol=1e-6, rtol=1e-5)
    assert (merged - base).abs().max() > 1e-3  # the step changed the model, far beyond that rounding


@pytest.mark.slow
@needs_scifact()
def test_scifact_minilm_finetune_smoke(tmp_path):
    from conftest import SCIFACT

    out = tmp_path / "minilm"
    assert main(["finetune", "minilm-l6", "--train", str(SCIFACT), "--output", str(out), "--device", "cpu",
                 "--max-steps", "3", "--batch-size", "4", "--document-max-length", "64", "--no-progress"]) == 0
    assert len(_log(out)) == 3
    rows = [json.loads(line) for line in (out / "train_data.jsonl").read_text().splitlines()]
    assert len(rows) == 809  # SciFact train queries with a positive
    assert all(len(r["neg"]) == 7 and not set(r["neg_ids"]) & set(r["pos_ids"]) for r in rows)


def test_tokenizer_fixture_is_shared():
    assert build_tiny_tokenizer().get_vocab() == build_tiny_tokenizer().get_vocab()


def test_collapse_is_logged_and_warned_once(tiny_llama_dir, train_dir, tmp_path, capsys):
    from effir.stages.finetune import COLLAPSE_STEPS, _watch_collapse

    out = tmp_path / "run"
    assert main(_args(tiny_llama_dir, train_dir, out, "--max-steps", 2)) == 0
    assert all(-1.0 <= r["doc_cos"] <= 1.0 for r in _log(out))
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["final_doc_cos"] == _log(out)[-1]["doc_cos"] and summary["collapsed"] is False
    capsys.readouterr()

    stats = {"collapsed_steps": 0, "collapse_warned": False}
    args = argparse.Namespace(lr=1e-3)
    cosines = [0.999] * (COLLAPSE_STEPS - 1) + [0.5] + [0.9995] * (COLLAPSE_STEPS + 3)
    warned_at = []
    for step, c in enumerate(cosines, 1):
        _watch_collapse(stats, {"step": step, "doc_cos": c, "info_nce": 2.77}, args, main=True)
        if "warning: the embeddings have collapsed" in capsys.readouterr().err:
            warned_at.append(step)
    # a dip below the threshold resets the count; then exactly one warning, COLLAPSE_STEPS steps in
    assert warned_at == [2 * COLLAPSE_STEPS] and stats["collapsed_steps"] == COLLAPSE_STEPS + 3


def test_random_negatives_replace_the_datas_own(tmp_path):
    """--negatives random draws every negative at random, also for data that brings its own."""
    from effir.stages import finetune

    data = flag_jsonl_with_negatives(tmp_path / "train.jsonl")
    args = argparse.Namespace(train=str(data), split="train", negatives="random", num_negatives=1, seed=0,
                              mine_range="10-100", mine_model=None, encode_batch_size=4, no_progress=True)
    examples = finetune._prepare_examples(args, None, None)
    assert [len(ex.neg) for ex in examples] == [1] * 8
    assert any(not ex.neg[0].startswith("negative") for ex in examples)
