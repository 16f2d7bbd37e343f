"""Bad input, every verb and the ``effir run`` config: exactly one line on stderr, exit code 2, no traceback, and
nothing left behind that looks finished (results.json, scores.json, slim.json, finetune.json, a model folder, a
stage's completion marker).

Each case is a command line run in this process through ``effir.cli.main``; ``{name}`` placeholders are the files
of the module's ``world`` fixture and ``{out}`` the test's own folder. Most cases fail before any model is loaded;
the two divergence cases train a few steps of the tiny model.
"""

from __future__ import annotations

import os
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from conftest import TINY_CORPUS, TINY_QRELS, TINY_QUERIES, write_beir

from effir.cli import main

NON_UTF8 = b'{"_id": "d9", "title": "caf\xe9", "text": "latin-1, not utf-8"}\n'


def _corrupt(src: Path, dst: Path, how: str) -> Path:
    """A copy of the model folder ``src`` with its weights truncated, replaced by noise, or its config broken."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if how == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    elif how == "noise":
        weights.write_bytes(os.urandom(4096))
    elif how == "config":
        (dst / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    return dst


def _beir_with(folder: Path, name: str, line: bytes) -> Path:
    """The tiny BEIR folder with ``line`` appended to one of its files (``qrels`` = the test split)."""
    write_beir(folder)
    path = folder / ("qrels/test.tsv" if name == "qrels" else f"{name}.jsonl")
    path.write_bytes(path.read_bytes() + line)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-input")
    cache = root / "cache"
    os.environ["EFFIR_CACHE"] = str(cache)  # the fixture's own drop run must not touch the user's cache
    compressed = root / "compressed" / "model"
    assert main(["drop", str(tiny_llama_dir), "--strategy", "last", "--blocks", "1", "--output", str(compressed.parent),
                 "--device", "cpu", "--dtype", "fp32"]) == 0
    (root / "a-file").write_text("not a folder\n")
    (root / "fake.gguf").write_text("a text file named .gguf\n")
    (root / "train.jsonl").write_bytes(b'{"query": "q", "pos": ["p"], "neg": ["n"]}\n' + NON_UTF8)
    (root / "calib.txt").write_bytes(b"plain text\n\n" + "caf\xe9".encode("latin-1") + b"\n")
    paths = {
        "llama": tiny_llama_dir,
        "beir": write_beir(root / "beir"),
        "compressed": compressed,
        "truncated": _corrupt(tiny_llama_dir, root / "truncated", "truncated"),
        "noise": _corrupt(tiny_llama_dir, root / "noise", "noise"),
        "badconfig": _corrupt(tiny_llama_dir, root / "badconfig", "config"),
        "truncated_compressed": _corrupt(compressed, root / "truncated-compressed", "truncated"),
        "latin1_corpus": _beir_with(root / "latin1-corpus", "corpus", NON_UTF8),
        "latin1_queries": _beir_with(root / "latin1-queries", "queries", b'{"_id": "q9", "text": "caf\xe9"}\n'),
        "latin1_qrels": _beir_with(root / "latin1-qrels", "qrels", b"q1\td\xe9\t1\n"),
        "dup_docs": write_beir(root / "dup-docs", corpus=[*TINY_CORPUS, {"_id": "d2", "title": "x", "text": "other"}]),
        "dup_queries": write_beir(root / "dup-queries", queries=[*TINY_QUERIES, {"_id": "q1", "text": "again"}]),
        "unknown_queries": write_beir(root / "unknown-queries", qrels=[("x" + q, d, s) for q, d, s in TINY_QRELS]),
        "unknown_docs": write_beir(root / "unknown-docs", qrels=[(q, "x" + d, s) for q, d, s in TINY_QRELS]),
        # 12 judged query ids, of which queries.jsonl holds one: the qrels belong to another queries file
        "few_queries": write_beir(root / "few-queries", qrels=[*TINY_QRELS[:1], *((f"x{i}", "d1", 1) for i in range(11))]),
        "fake_gguf": root / "fake.gguf",
        "file": root / "a-file",
        "train_jsonl": root / "train.jsonl",
        "calib": root / "calib.txt",
    }
    yield {k: str(v) for k, v in paths.items()}
    os.environ.pop("EFFIR_CACHE", None)


EVAL = "eval {llama} --data {beir} --output {out}/ev --device cpu"
# the base command lines run as they are (in seconds): each case breaks one thing
FT = ("finetune {llama} --train {beir} --split test --output {out}/ft --device cpu --no-progress --max-steps 2 "
      "--batch-size 2 --num-negatives 1 --negatives random")
SLIM = ("slim {llama} --train {beir} --split test --output {out}/sl --device cpu --no-progress --gate-steps 2 "
        "--batch-size 2 --num-negatives 1 --width-multiple 8")
ANALYZE = "analyze {llama} --output {out}/an --device cpu --samples 2 --seq-len 16"
DROP = "drop {llama} --strategy last --blocks 1 --output {out}/dr --device cpu"
BENCH = ("bench {llama} --output {out}/be --device cpu --repeats 1 --max-repeats 1 --doc-lengths 16 "
         "--query-batch-sizes 1 --doc-batch-sizes 1")
PRUNE = "prune {llama} --method wanda --output {out}/pr --device cpu --calibration-samples 2 --seq-len 16 --no-progress"
EVAL_DONE = ["ev/results.json", "ev/run.trec"]
FT_DONE = ["ft/finetune.json", "ft/model"]
SLIM_DONE = ["sl/slim.json", "sl/model"]

# (id, command line, paths under {out} that must not exist afterwards, words the error line must contain)
CASES = [
    # -- non-finite numbers, refused by the shared argparse type (issue 13 item 4) --
    ("finetune-lr-nan", FT + " --lr nan", FT_DONE, "--lr"),
    ("finetune-lr-inf", FT + " --lr inf", FT_DONE, "--lr"),
    ("finetune-temperature-nan", FT + " --temperature nan", FT_DONE, "--temperature"),
    ("finetune-weight-decay-inf", FT + " --weight-decay inf", FT_DONE, "--weight-decay"),
    ("finetune-warmup-nan", FT + " --warmup-ratio nan", FT_DONE, "--warmup-ratio"),
    ("finetune-warmup-above-1", FT + " --warmup-ratio 2", FT_DONE, "--warmup-ratio must be in [0, 1]"),
    ("finetune-epochs-inf", FT + " --epochs inf", FT_DONE, "--epochs"),
    ("finetune-max-grad-norm-nan", FT + " --max-grad-norm nan", FT_DONE, "--max-grad-norm"),
    ("finetune-kl-weight-inf", FT + " --teacher {llama} --kl-weight inf", FT_DONE, "--kl-weight"),
    ("slim-gate-lr-nan", SLIM + " --gate-lr nan", SLIM_DONE, "--gate-lr"),
    ("slim-lam-inf", SLIM + " --lam inf", SLIM_DONE, "--lam"),
    ("slim-beta-nan", SLIM + " --beta nan", SLIM_DONE, "--beta"),
    ("slim-ratio-nan", SLIM + " --ratio nan", SLIM_DONE, "--ratio"),
    ("slim-lr-inf", SLIM + " --recover-steps 2 --lr inf", SLIM_DONE, "--lr"),
    ("slim-super-neuron-inf", SLIM + " --super-neuron-factor inf", SLIM_DONE, "--super-neuron-factor"),
    ("bench-min-time-nan", BENCH + " --min-time nan", ["be/bench.json"], "--min-time"),
    ("verify-atol-nan", "verify {compressed} --atol nan", [], "--atol"),
    # -- training that diverges with finite arguments stops at the step, keeping the last good checkpoint --
    ("finetune-diverges", FT + " --lr 1e30 --max-steps 4 --save-every 1", FT_DONE, "step 2"),
    ("slim-diverges", SLIM + " --method magnitude --recover-steps 4 --lr 1e30 --save-every 1", SLIM_DONE, "step 2"),
    ("slim-gates-overflow", SLIM + " --lam 1e37 --gate-steps 4 --save-every 1",
     [*SLIM_DONE, "sl/checkpoints/gates/step-0000001"], "step 1: the loss is inf"),
    # -- bugs found in review (issue 18 item 6) --
    ("slim-corpus-smaller-than-negatives", SLIM + " --num-negatives 20", SLIM_DONE, "fewer than --num-negatives 20"),
    ("finetune-zero-negatives", FT + " --num-negatives 0", FT_DONE, "--num-negatives must be >= 1"),
    ("bench-two-query-lengths", BENCH + " --query-length 8,16", ["be/bench.json"], "--query-length takes one length"),
    # -- a GPU asked for on a machine without one --
    ("analyze-cuda", ANALYZE + " --device cuda", ["an/scores.json"], "CUDA"),
    ("drop-cuda", DROP + " --device cuda", ["dr"], "CUDA"),
    ("slim-cuda", SLIM + " --device cuda", SLIM_DONE, "CUDA"),
    ("finetune-cuda", FT + " --device cuda", FT_DONE, "CUDA"),
    ("eval-cuda", EVAL + " --device cuda", EVAL_DONE, "CUDA"),
    ("bench-cuda", BENCH + " --device cuda", ["be/bench.json"], "CUDA"),
    ("verify-cuda", "verify {compressed} --device cuda", [], "CUDA"),
    ("eval-nf4-on-cpu", EVAL + " --quantize nf4 --device cpu", EVAL_DONE, "--quantize nf4 needs a CUDA GPU"),
    ("bench-nf4-on-cpu", BENCH + " --quantize nf4 --device cpu", ["be/bench.json"], "--quantize nf4 needs a CUDA GPU"),
    ("analyze-not-a-device", ANALYZE + " --device gpu0", ["an/scores.json"], "not a device"),
    # -- an output folder that cannot be created --
    ("analyze-output-under-file", "analyze {llama} --output {file}/an --samples 2", [], "is a file"),
    ("drop-output-under-file", "drop {llama} --strategy last --blocks 1 --output {file}/dr", [], "is a file"),
    ("slim-output-under-file", "slim {llama} --method magnitude --output {file}/sl", [], "is a file"),
    ("finetune-output-under-file", "finetune {llama} --train {beir} --output {file}/ft", [], "is a file"),
    ("eval-output-under-file", "eval {llama} --data {beir} --output {file}/ev", [], "is a file"),
    ("bench-output-under-file", "bench {llama} --output {file}/be", [], "is a file"),
    ("export-output-under-file", "export {llama} --format onnx --output {file}/ex", [], "is a file"),
    ("eval-output-is-file", "eval {llama} --data {beir} --output {file}", [], "not a folder"),
    # -- damaged model folders: one line that says the folder is damaged, not a hub download failure --
    ("eval-truncated-safetensors", "eval {truncated} --data {beir} --output {out}/ev --device cpu", EVAL_DONE,
     "damaged"),
    ("analyze-noise-safetensors", "analyze {noise} --output {out}/an --samples 2", ["an/scores.json"], "damaged"),
    ("drop-truncated-compressed", "drop {truncated_compressed} --strategy last --blocks 1 --output {out}/dr",
     ["dr"], "damaged"),
    ("bench-truncated-compressed", BENCH.replace("{llama}", "{truncated_compressed}"), ["be/bench.json"], "damaged"),
    ("slim-truncated-compressed", "slim {truncated_compressed} --method magnitude --output {out}/sl", SLIM_DONE,
     "damaged"),
    ("eval-corrupt-config", "eval {badconfig} --data {beir} --output {out}/ev --device cpu", EVAL_DONE,
     "is damaged"),
    # -- data files --
    ("eval-corpus-not-utf8", EVAL.replace("{beir}", "{latin1_corpus}"), EVAL_DONE, "corpus.jsonl:7: not UTF-8"),
    ("eval-queries-not-utf8", EVAL.replace("{beir}", "{latin1_queries}"), EVAL_DONE, "queries.jsonl:4: not UTF-8"),
    ("eval-qrels-not-utf8", EVAL.replace("{beir}", "{latin1_qrels}"), EVAL_DONE, "test.tsv:6: not UTF-8"),
    ("finetune-corpus-not-utf8", FT.replace("{beir}", "{latin1_corpus}"), FT_DONE, "corpus.jsonl:7"),
    ("finetune-jsonl-not-utf8", FT.replace("{beir}", "{train_jsonl}"), FT_DONE, "train.jsonl:2: not UTF-8"),
    ("analyze-beir-not-utf8", ANALYZE + " --calibration beir:{latin1_corpus}", ["an/scores.json"], "corpus.jsonl:7"),
    ("slim-calibration-not-utf8", "slim {llama} --method activation --calibration {calib} --output {out}/sl",
     SLIM_DONE, "calib.txt:3"),
    ("eval-duplicate-doc-ids", EVAL.replace("{beir}", "{dup_docs}"), EVAL_DONE, "'d2' repeats line 2"),
    ("eval-duplicate-query-ids", EVAL.replace("{beir}", "{dup_queries}"), EVAL_DONE, "'q1' repeats line 1"),
    ("eval-qrels-unknown-queries", EVAL.replace("{beir}", "{unknown_queries}"), EVAL_DONE, "none of the"),
    ("eval-qrels-unknown-documents", EVAL.replace("{beir}", "{unknown_docs}"), EVAL_DONE, "none of the"),
    # -- effir prune: a pattern that is not N:M, or that the model's widths cannot take --
    ("prune-pattern-backwards", PRUNE + " --pattern 4:2", ["pr"], "--pattern '4:2' is not N:M"),
    ("prune-group-not-dividing", PRUNE + " --pattern 2:5", ["pr"], "not a multiple of 5"),
    ("prune-dampening-nan", PRUNE + " --dampening nan", ["pr"], "--dampening"),
    ("prune-cuda", PRUNE + " --device cuda", ["pr"], "CUDA"),
    ("prune-calibration-not-utf8", PRUNE + " --calibration {calib}", ["pr"], "calib.txt:3"),
    ("prune-output-under-file", "prune {llama} --method wanda --output {file}/pr", [], "is a file"),
    ("prune-truncated-compressed", "prune {truncated_compressed} --method wanda --output {out}/pr", ["pr"], "damaged"),
    # -- the last that slipped (issue 25 item 7): each refused before any work, with nothing written --
    ("eval-fake-gguf", EVAL.replace("{llama}", "{fake_gguf}"), EVAL_DONE, "fake.gguf is not a GGUF file"),
    ("finetune-resume-missing", FT + " --resume {out}/nope", [*FT_DONE, "ft/train_data.jsonl", "ft/train_data.meta.json"],
     "--resume"),
    ("finetune-model-missing", FT.replace("{llama}", "{out}/nope"), ["ft"], "MODEL: model"),
    ("finetune-teacher-missing", FT + " --teacher {out}/nope", ["ft"], "--teacher: model"),
    ("distill-teacher-missing", "distill {llama} --teacher {out}/nope --texts wiki --output {out}/di --device cpu",
     ["di"], "--teacher: model"),
    ("slim-mine-range-not-a-range", SLIM + " --mine-range ten", ["sl"], "rank range 'ten'"),
    ("eval-qrels-few-queries", EVAL.replace("{beir}", "{few_queries}"), EVAL_DONE, "only 1 of the 12 query ids"),
    ("eval-device-cpu-1", EVAL + " --device cpu:1", EVAL_DONE, "--device cpu:1: this machine has no such device"),
    ("analyze-device-cpu-1", ANALYZE + " --device cpu:1", ["an"], "use one of cpu"),
]

RUN_BASE = """model: {llama}
output: {out}/run
train: {beir}
datasets: [{beir}]
split: test
stages: [analyze, drop, eval]
analyze: {{samples: 2, seq_len: 16, device: cpu}}
drop: {{mlp: 1, device: cpu}}
eval: {{device: cpu}}
"""
RUN_DONE = ["run/analyze", "run/drop", "run/eval", "run/config.yaml"]
# (id, YAML lines added to (or replacing keys of) RUN_BASE, words the error line must contain)
YAML_CASES = [
    ("stages-number", "stages: 5", "'stages' must be a list"),
    ("stages-list-of-numbers", "stages: [1, 2]", "'stages' must be a list"),
    ("section-is-list", "stages: [analyze, drop, slim]\nslim: [1, 2]", "'slim' must be a mapping"),
    ("section-is-text", "eval: fast", "'eval' must be a mapping"),
    ("slim-ratio-text", "stages: [analyze, drop, slim]\nslim: {{ratio: abc, method: magnitude}}", "--ratio"),
    ("finetune-lr-nan", "stages: [analyze, drop, finetune]\nfinetune: {{lr: .nan}}", "--lr"),
    ("eval-batch-size-text", "eval: {{batch_size: many}}", "--batch-size"),
    ("slim-device-cuda", "stages: [analyze, drop, slim]\nslim: {{method: magnitude, device: cuda}}", "CUDA"),
    ("drop-strategy-unknown", "drop: {{mlp: 1, strategy: random}}", "--strategy"),
    ("baseline-count-text", "baselines: {{drop_last: abc}}", "baselines.drop_last"),
    ("baseline-flag-text", "baselines: {{full: maybe}}", "baselines.full"),
    ("baseline-2-4-count", "baselines: {{full: true, sparsegpt_2_4: 3}}", "baselines.sparsegpt_2_4"),
    ("baseline-2-4-without-full", "baselines: {{wanda_2_4: true}}", "baselines.wanda_2_4 compares pruning"),
    ("prune-section-seq-len-text", "prune: {{seq_len: many}}", "section 'prune' of the config: argument --seq-len"),
    ("demo-unknown-key", "train: demo\ndemo: {{foo: 1}}", "demo.foo"),
    ("demo-wrong-type", "train: demo\ndemo: {{train_queries: lots}}", "demo.train_queries"),
    ("slim-after-finetune-maybe", "slim_after_finetune: maybe", "'slim_after_finetune' must be true or false"),
    ("datasets-number", "datasets: 5", "'datasets' must be a list"),
    ("model-missing-value", "model:", "'model' must be a string"),
    ("output-is-file", "output: {file}", "not a folder"),
    ("output-under-file", "output: {file}/run", "is a file"),
]


def _merge(base: str, extra: str) -> str:
    """RUN_BASE with the keys of ``extra`` replaced (top-level YAML keys, one per line)."""
    keys = {line.split(":")[0] for line in extra.splitlines()}
    kept = [line for line in base.splitlines() if line.split(":")[0] not in keys]
    return "\n".join(kept + extra.splitlines()) + "\n"


def _outcome(argv: list[str], capsys) -> tuple[object, str]:
    """(exit code, stderr) of ``effir ARGV`` as the shell would see them; an escaping exception is a traceback."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    except Exception:  # noqa: BLE001 - the shell would print this as a traceback: the case failed
        return "traceback", capsys.readouterr().err + traceback.format_exc()
    return code, capsys.readouterr().err


def _check(argv: list[str], out: Path, leftovers: list[str], words: str, capsys) -> str:
    code, err = _outcome(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, f"exit {code}, stderr:\n{err[-3000:]}"
    assert words in lines[0], lines[0]
    assert lines[0].startswith(f"effir {argv[0]}: error: "), lines[0]
    left = [p for p in leftovers if (out / p).exists()]
    assert not left, f"left behind: {left}"
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the --device cuda cases need a machine without a GPU")
@pytest.mark.parametrize("name, command, leftovers, words", CASES, ids=[c[0] for c in CASES])
def test_bad_command_line(name, command, leftovers, words, world, tmp_path, capsys):
    argv = command.format(out=tmp_path, **world).split()
    _check(argv, tmp_path, leftovers, words, capsys)
    if name.endswith("-diverges"):  # the last good state stays: the checkpoint of step 1, not one of step 2
        root = tmp_path / ("ft/checkpoints" if name.startswith("finetune") else "sl/checkpoints/recover")
        assert sorted(p.name for p in root.iterdir()) == ["step-0000001"]


@pytest.mark.parametrize("name, extra, words", YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_bad_run_config(name, extra, words, world, tmp_path, capsys):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    config = tmp_path / "run.yaml"
    config.write_text(_merge(RUN_BASE, extra).format(out=tmp_path, **world))
    line = _check(["run", str(config)], tmp_path, RUN_DONE, words, capsys)
    assert "fix" in line or "choose another" in line, line  # the line says what to do


@pytest.mark.parametrize("command", [ANALYZE, EVAL, FT, SLIM, DROP, BENCH, PRUNE], ids=lambda c: c.split()[0])
def test_read_only_output_is_refused_before_any_work(command, world, tmp_path, capsys, monkeypatch):
    """A folder without write permission (as the check sees it: root writes anywhere, so the permission answer is
    faked here for that one folder; the real chmod case is test_read_only_folder_for_real)."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))
    argv = command.format(out=read_only, **world).split()
    assert "is not writable" in _check(argv, tmp_path, [f"ro/{d}" for d in ("an", "ev", "ft", "sl", "dr", "be", "pr")],
                                       "ro", capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_for_real(world, tmp_path, capsys):
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    argv = f"eval {world['llama']} --data {world['beir']} --output {read_only}/ev".split()
    assert "is not writable" in _check(argv, tmp_path, ["ro/ev"], "ro", capsys)


@pytest.mark.parametrize("command", [EVAL, FT, SLIM, ANALYZE, DROP, BENCH, PRUNE, "verify {compressed}",
                                     "run {config}"],
                         ids=["eval", "finetune", "slim", "analyze", "drop", "bench", "prune", "verify", "run"])
def test_the_base_command_lines_work(command, world, tmp_path, capsys):
    """Each case above breaks one thing of a command line that runs: without it, the command succeeds."""
    config = tmp_path / "run.yaml"
    config.write_text(RUN_BASE.format(out=tmp_path, **world))
    argv = command.format(out=tmp_path, config=config, **world).split()
    assert _outcome(argv, capsys)[0] == 0


def test_verify_reports_damaged_weights_as_a_failed_check(world, capsys):
    """verify's answer about a damaged folder is its FAIL line (exit 1), not a traceback."""
    assert main(["verify", world["truncated_compressed"]]) == 1
    captured = capsys.readouterr()
    assert "FAIL reload: model folder" in captured.out and "is damaged" in captured.out
    assert "Traceback" not in captured.err
