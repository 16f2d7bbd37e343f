"""`effir run` end to end on the tiny model: every stage as its own process, markers, resume, report."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import TINY_QRELS, run_effir, write_beir

import effir
from effir.cli import main
from effir.stages.run import MARKER

FAST = {
    "analyze": {"samples": 2, "seq_len": 16, "device": "cpu"},
    "drop": {"mlp": 1},
    "slim": {"gate_steps": 2, "batch_size": 2, "num_negatives": 1, "width_multiple": 8, "device": "cpu",
             "no_progress": True},
    "finetune": {"max_steps": 3, "batch_size": 2, "num_negatives": 1, "negatives": "random", "device": "cpu",
                 "no_progress": True, "save_every": 1, "lr": 1e-3},
    "eval": {"device": "cpu"},
    "bench": {"query_length": 8, "doc_lengths": "16", "query_batch_sizes": "2", "doc_batch_sizes": "2",
              "warmup": 1, "repeats": 2, "min_time": 0, "device": "cpu"},
}


@pytest.fixture
def data(tmp_path):
    folder = write_beir(tmp_path / "beir", split="train")
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in TINY_QRELS))
    return folder


def _config(tmp_path, model, data, **over):
    cfg = {"model": str(model), "output": str(tmp_path / "run"), "train": str(data), "datasets": [str(data)],
           "analyze": {**FAST["analyze"], "calibration": f"beir:{data}"}, **{k: v for k, v in FAST.items()
                                                                             if k != "analyze"}}
    cfg.update(over)
    path = tmp_path / "run.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_full_pipeline_with_baselines_and_report(tiny_llama_dir, data, tmp_path):
    cfg = _config(tmp_path, tiny_llama_dir, data, baselines={"original": True, "full": True, "drop_last": 1})
    assert main(["run", str(cfg)]) == 0
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    variants = report["variants"]
    assert set(variants) == {"effir", "original", "full", "drop_last1"}
    for name in ("effir", "full", "drop_last1"):
        assert variants[name]["speed"]["document"]["speedup"] > 0
    assert variants["full"]["retention"] == pytest.approx(1.0)
    assert variants["effir"]["parameters"]["total"] < variants["full"]["parameters"]["total"]
    md = (run / "report.md").read_text()
    assert "EffiR (drop + slim)" in md and "Drop-Last1B" in md and "quality_vs_speed.png" in md
    assert (run / "quality_vs_speed.png").exists() and (run / "config.yaml").exists()
    # a second run skips every finished stage
    out = subprocess.run([sys.executable, "-m", "effir", "run", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.count("done, skipped") == len(list(run.rglob(MARKER)))


def test_training_and_eval_stages_run_as_one_job_under_the_launcher(tiny_llama_dir, data, tmp_path):
    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2"
    one = {"batch_size": 1}  # per process: 2 queries per step out of the 3 training queries
    cfg = _config(tmp_path, tiny_llama_dir, data, launcher=launcher, stages=["analyze", "drop", "slim", "finetune", "eval"],
                  slim={**FAST["slim"], **one, "recover_steps": 2}, finetune={**FAST["finetune"], **one})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "effir", "run", str(cfg)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    # one log line per step: the processes trained together (separately, each would log every step)
    slim_log = [json.loads(x) for x in next(run.rglob("slim_log.jsonl")).read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in slim_log] == [("gates", 1), ("gates", 2), ("recover", 1), ("recover", 2)]
    ft_log = [json.loads(x) for x in next(run.rglob("train_log.jsonl")).read_text().splitlines()]
    assert [r["step"] for r in ft_log] == [1, 2, 3]
    assert json.loads(next(run.rglob("results.json")).read_text())["processes"] == 2


def test_killed_mid_stage_then_rerun_gives_the_same_metrics(tiny_llama_dir, data, tmp_path):
    stages = {"stages": ["finetune", "eval"]}
    plain = _config(tmp_path / "a", tiny_llama_dir, data, **stages)
    # every run in a process of its own with the same thread count (like with like: see conftest.run_effir)
    assert run_effir(["run", plain]).returncode == 0
    killed = _config(tmp_path / "b", tiny_llama_dir, data, **stages)
    # stages run inside the `effir run` process, so finetune's SIGKILL after step 2 is a kill -9 of the whole run
    assert run_effir(["run", killed], EFFIR_TEST_KILL_AT_STEP="2").returncode == -9
    assert not (tmp_path / "b" / "run" / "finetune" / MARKER).exists()
    out = run_effir(["run", killed])
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = [json.loads((tmp_path / x / "run" / "eval" / "beir" / "results.json").read_text())["metrics"]
               for x in ("a", "b")]
    assert metrics[0] == metrics[1]


def test_from_stage_redoes_that_stage_only(tiny_llama_dir, data, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_llama_dir, data, stages=["drop", "eval"], drop={"mlp": 1, "strategy": "last"})
    assert main(["run", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["run", str(cfg), "--from", "eval"]) == 0
    printed = capsys.readouterr().out
    assert "drop: done, skipped" in printed and "eval:beir: done, skipped" not in printed


def test_slim_after_finetune_slims_the_retriever_and_reruns_downstream(tiny_llama_dir, data, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_llama_dir, data, stages=["drop", "finetune", "slim", "eval"],
                  drop={"mlp": 1, "strategy": "last"}, slim={**FAST["slim"], "method": "activation",
                                                            "calibration_samples": 2, "seq_len": 16},
                  slim_after_finetune=True)
    assert main(["run", str(cfg), "--dry-run"]) == 0
    commands = capsys.readouterr().out.splitlines()
    verbs = [c.split(" effir ", 1)[1].split()[0] for c in commands]
    assert verbs == ["drop", "finetune", "slim", "eval"]
    run = tmp_path / "run"
    assert f"slim {run / 'finetune' / 'model'} " in commands[2] and str(run / "slim" / "model") in commands[3]
    assert main(["run", str(cfg)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["variants"]["effir"]["label"] == "EffiR (drop, fine-tune, then slim)"
    assert report["variants"]["effir"]["widths"]
    capsys.readouterr()
    # redoing finetune redoes what consumes it (slim, eval), although slim comes after it in this order only
    assert main(["run", str(cfg), "--from", "finetune"]) == 0
    printed = capsys.readouterr().out
    assert "drop: done, skipped" in printed
    assert not any(f"{s}: done, skipped" in printed for s in ("finetune", "slim", "eval:beir"))


@pytest.mark.parametrize("over, message", [
    ({"slim_after_finetune": True, "stages": ["drop", "slim", "eval"], "drop": {"mlp": 1, "strategy": "last"}},
     "needs both stages 'finetune' and 'slim'"),
    ({"modle": "x"}, "unknown config key 'modle'"),
    ({"stages": ["eval", "drop"]}, "out of order"),
    ({"slim": {"ratoi": 0.3}}, "unknown option 'slim.ratoi'"),
    ({"stages": ["drop", "slim", "finetune", "distill"], "distill": {"texts": ["wiki"]}}, "list one of them"),
    ({"stages": ["drop", "slim", "distill"]}, "set distill.texts"),
    ({"query_side": True, "distill": {"texts": ["wiki"]}, "parent": "full"}, "set baselines.full: true"),
    ({"query_side": True, "distill": {"texts": ["wiki"]}}, "is not one"),  # a base LLM: no parent retriever
    ({"stages": ["analyze", "drop", "slim", "distill"], "distill": {"texts": ["wiki"], "query_side": True}},
     "'distill.query_side' is set by the pipeline"),
    ({"quantize": ["fp8"]}, "unknown quantisation 'fp8' in 'quantize'"),
    ({"quantize": ["onnx-int8"], "eval": {"quantize": "int8"}}, "'eval.quantize' would evaluate every variant"),
    ({"quantize": ["onnx-int8"], "export": {"int8": True}}, "'export.int8' is set by the pipeline"),
    ({"quantize": ["onnx-int8"], "export": {"calibraton": "wiki"}}, "unknown option 'export.calibraton'"),
    ({"quantize": ["onnx-int8"], "stages": ["drop", "slim", "finetune"]}, "add stage 'eval'"),
])
def test_bad_config_is_one_line_exit_2(tiny_llama_dir, data, tmp_path, capsys, over, message):
    cfg = _config(tmp_path, tiny_llama_dir, data, **over)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_missing_dataset_is_one_line_exit_2(tiny_llama_dir, data, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_llama_dir, data, stages=["eval"], datasets=[str(tmp_path / "nope")])
    assert main(["run", str(cfg)]) == 2
    assert "failed" in capsys.readouterr().err


def test_distillation_and_the_query_side_variant_from_a_retriever(data, tmp_path, monkeypatch):
    """A sentence-transformers retriever as the original: no labels, no fine-tuning; EffiR recovers by distilling
    from it, and the query-side variant keeps its documents (their cached embeddings are reused)."""
    from st_replicas import build_replica

    parent = build_replica("minilm", tmp_path / "minilm")
    texts = {"texts": [f"beir:{data}"], "max_steps": 2, "batch_size": 2, "device": "cpu", "no_progress": True}
    cfg = _config(tmp_path, parent, data, train=None, stages=["drop", "slim", "distill", "eval", "bench"],
                  drop={"mlp": 1, "strategy": "last"}, slim={"method": "magnitude", "width_multiple": 8,
                                                             "device": "cpu", "no_progress": True},
                  distill=texts, query_side=True, baselines={"original": True})
    assert main(["run", str(cfg)]) == 0
    run = tmp_path / "run"
    variants = json.loads((run / "report.json").read_text())["variants"]
    assert set(variants) == {"effir", "query_side", "original"}
    assert "distilled from the original model" in variants["effir"]["label"]
    query_side = variants["query_side"]
    assert query_side["speed"]["document"]["predicted_speedup"] == 1.0  # documents: the parent itself
    assert query_side["speed"]["query"]["predicted_speedup"] > 1.0
    first = json.loads((run / "query-side" / "eval" / "beir" / "results.json").read_text())
    later = json.loads((run / "baselines" / "original" / "eval" / "beir" / "results.json").read_text())
    # the query-side model embedded the parent's documents once; the original's evaluation reused them
    assert not first["corpus_cached"] and later["corpus_cached"]
    history = json.loads((run / "query-side" / "distill" / "model" / "effir.json").read_text())["history"]
    assert history[-1]["query_side"] and history[-1]["teacher"] == str(parent)
    assert "query-side: compressed queries" in (run / "report.md").read_text()


def test_the_2_4_baselines_are_planned_in_both_orders_and_timed_like_every_baseline(tiny_llama_dir, data, tmp_path):
    from effir.config import load_config
    from effir.run_plan import plan_baselines

    cfg = load_config(_config(tmp_path, tiny_llama_dir, data, stages=["finetune", "eval", "bench"],
                              prune={"seq_len": 16}, baselines={"full": True, "wanda_2_4": True}))
    run = tmp_path / "run"
    steps = plan_baselines(cfg, run)
    plan = [(s.variant, s.stage, s.argv[0]) for s in steps]
    tuned = str(run / "baselines" / "full" / "finetune" / "model")
    first = str(run / "baselines" / "wanda_2_4-prune_ft" / "prune" / "model")
    assert plan[3:] == [
        ("wanda_2_4-prune_ft", "prune", str(tiny_llama_dir)), ("wanda_2_4-prune_ft", "finetune", first),
        ("wanda_2_4-prune_ft", "eval", str(run / "baselines" / "wanda_2_4-prune_ft" / "finetune" / "model")),
        ("wanda_2_4-prune_ft", "bench", str(run / "baselines" / "wanda_2_4-prune_ft" / "finetune" / "model")),
        ("wanda_2_4-ft_prune", "prune", tuned),
        ("wanda_2_4-ft_prune", "eval", str(run / "baselines" / "wanda_2_4-ft_prune" / "prune" / "model")),
        ("wanda_2_4-ft_prune", "bench", str(run / "baselines" / "wanda_2_4-ft_prune" / "prune" / "model"))]
    prune = steps[3]
    assert prune.argv[1:] == ["--method", "wanda", "--pattern", "2:4", "--output", str(prune.folder), "--seq-len", "16"]
    assert steps[7].upstream == [steps[0]] and steps[0].stage == "finetune"  # re-pruned when the full model changes
    assert all(s.argv[s.argv.index("--baseline") + 1] == str(tiny_llama_dir) for s in steps if s.stage == "bench")


def test_the_2_4_baselines_in_both_orders(tiny_llama_dir, data, tmp_path):
    """The paper's Table 4 from the harness: Wanda and SparseGPT 2:4 pruned then fine-tuned, and the fine-tuned full
    model pruned; each evaluated like every baseline, with the pattern intact in what was evaluated."""
    pytest.importorskip("llmcompressor", reason="effir prune's kernels")
    from effir.sparsity import nonzeros_per_group, projections

    prune = {"calibration": f"beir:{data}", "calibration_samples": 2, "seq_len": 16, "device": "cpu",
             "no_progress": True}
    cfg = _config(tmp_path, tiny_llama_dir, data, stages=["finetune", "eval"], prune=prune,
                  baselines={"full": True, "wanda_2_4": True, "sparsegpt_2_4": True})
    assert main(["run", str(cfg)]) == 0
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    pruned = {f"{m}_2_4-{o}" for m in ("wanda", "sparsegpt") for o in ("prune_ft", "ft_prune")}
    assert set(report["variants"]) == {"effir", "full", *pruned}
    for name in pruned:
        v = report["variants"][name]
        assert v["sparsity"] == "2:4" and v["avg_ndcg10"] is not None
        final = run / "baselines" / name / ("finetune" if name.endswith("prune_ft") else "prune") / "model"
        enc = effir.load(final, device="cpu")
        assert all(bool((nonzeros_per_group(m.weight, 4) == 2).all())
                   for m in projections(enc.model, enc.adapter).values()), name
    # fine-tune then prune: the full baseline's fine-tuned model is what was pruned
    history = json.loads((run / "baselines" / "wanda_2_4-ft_prune" / "prune" / "model" / "effir.json").read_text())
    assert [h["stage"] for h in history["history"]] == ["finetune", "prune"]
    md = (run / "report.md").read_text()
    assert "Wanda 2:4: pruned, then fine-tuned" in md and "SparseGPT 2:4: the fine-tuned full model, pruned" in md
    assert "store their zeros densely" in md


def test_the_2_4_baselines_need_the_fine_tuned_full_model(tiny_llama_dir, data, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_llama_dir, data, stages=["finetune", "eval"], baselines={"sparsegpt_2_4": True})
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "baselines.sparsegpt_2_4 compares pruning before and after fine-tuning" in err and "\n" not in err
    assert not (tmp_path / "run").exists()
    cfg = _config(tmp_path, tiny_llama_dir, data, prune={"method": "wanda"},
                  baselines={"full": True, "wanda_2_4": True})
    assert main(["run", str(cfg)]) == 2
    assert "'prune.method' is set by the pipeline" in capsys.readouterr().err


def test_a_quantisation_this_machine_cannot_run_is_refused_before_the_first_stage(tiny_llama_dir, data, tmp_path,
                                                                                    capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("NF4 runs here")
    cfg = _config(tmp_path, tiny_llama_dir, data, quantize=["onnx-int8", "nf4"])
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("effir") and "quantize: nf4: --quantize nf4 needs a CUDA GPU" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_quantised_evaluations_beside_the_16_bit_ones(tiny_llama_dir, data, tmp_path):
    """The paper's Table 6 from the harness: every variant exported and its int8 graph evaluated beside it."""
    pytest.importorskip("onnxruntime", reason="the onnx backend (effir[serve])")
    from effir import serving

    cfg = _config(tmp_path, tiny_llama_dir, data, stages=["drop", "eval"], drop={"mlp": 1, "strategy": "last"},
                  baselines={"original": True}, quantize=["onnx-int8"])
    assert main(["run", str(cfg)]) == 0
    run = tmp_path / "run"
    variants = json.loads((run / "report.json").read_text())["variants"]
    md = (run / "report.md").read_text()
    assert "## Quantised (the paper's Table 6)" in md
    for name, base in (("effir", run), ("original", run / "baselines" / "original")):
        served = json.loads((base / "eval-onnx-int8" / "beir" / "results.json").read_text())
        assert (served["backend"], served["quantize"]) == ("onnx", "int8")
        graph = base / "export-onnx" / "model" / serving.SERVED_FILES[("onnx", True)]
        q = variants[name]["quantized"]["onnx-int8"]
        assert q["size"]["bytes_stored"] == graph.stat().st_size and q["avg_ndcg10"] == served["metrics"]["nDCG@10"]
        v = variants[name]
        assert v["size"]["bytes_16bit"] == 2 * v["size"]["parameters"] == 2 * q["size"]["parameters"]
        assert (f"| {v['label']} | {v['size']['bytes_16bit'] / 1e6:.1f} | {v['avg_ndcg10']:.3f} | "
                f"{q['size']['bytes_stored'] / 1e6:.1f} | {q['avg_ndcg10']:.3f} |") in md
    assert variants["effir"]["size"]["parameters"] < variants["original"]["size"]["parameters"]
    out = subprocess.run([sys.executable, "-m", "effir", "run", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 0 and "export:onnx: done, skipped" in out.stdout, out.stderr[-2000:]


def test_dry_run_lists_every_step_baselines_and_quantised_evaluations_included(tiny_llama_dir, data, tmp_path,
                                                                              capsys):
    cfg = _config(tmp_path, tiny_llama_dir, data, stages=["drop", "finetune", "eval"],
                  drop={"mlp": 1, "strategy": "last"}, quantize=["onnx-int8"],
                  baselines={"full": True, "drop_last": "auto"}, export={"calibration_samples": 4})
    assert main(["run", str(cfg), "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("# baselines: planned once the EffiR model exists")  # drop_last: auto
    verbs = [c.split(" effir ", 1)[1].split()[0] for c in printed[1:]]
    assert verbs == ["drop", "finetune", "eval", "export", "eval"]
    export, served = printed[4], printed[5]
    assert "--format onnx --int8" in export and export.endswith("--calibration-samples 4")
    assert "--backend onnx --quantize int8" in served and str(tmp_path / "run" / "export-onnx" / "model") in served
    cfg = _config(tmp_path, tiny_llama_dir, data, stages=["finetune", "eval"], baselines={"full": True})
    assert main(["run", str(cfg), "--dry-run"]) == 0
    verbs = [c.split(" effir ", 1)[1].split()[0] for c in capsys.readouterr().out.splitlines()]
    assert verbs == ["finetune", "eval", "finetune", "eval"]  # EffiR's, then the full baseline's
    assert not (tmp_path / "run").exists()


def _planned(tmp_path, model, data, **over):
    """The config and the EffiR steps of a drop -> distill run (no stage runs)."""
    from effir.config import load_config
    from effir.run_plan import main_steps

    over = {"stages": ["drop", "distill", "eval"], "drop": {"mlp": 1, "strategy": "last"},
            "distill": {"texts": ["wiki"]}, **over}
    cfg = load_config(_config(tmp_path, model, data, **over))
    return cfg, main_steps(cfg, tmp_path / "run")


@pytest.mark.parametrize("marker, overwrite", [(None, False), ({"key": "an older distill: option"}, True)],
                         ids=["unfinished-resumes", "changed-reruns"])
def test_distill_reruns_with_overwrite_and_resumes_without(tiny_llama_dir, data, tmp_path, monkeypatch, marker,
                                                           overwrite):
    """`effir distill` refuses a finished run without --overwrite: a changed distill option (or --from distill) must
    pass it, or the run stops there; an unfinished run continues from its checkpoints instead."""
    from effir.stages import run as run_stage

    cfg, steps = _planned(tmp_path, tiny_llama_dir, data)
    step = next(s for s in steps if s.stage == "distill")
    step.folder.mkdir(parents=True)
    if marker:
        (step.folder / MARKER).write_text(json.dumps(marker))
    started = []
    monkeypatch.setattr(run_stage, "_in_process", lambda argv: started.append(argv) or 0)
    run_stage.execute([step], cfg, None)
    assert started[0][0] == "distill" and ("--overwrite" in started[0]) == overwrite


def test_every_training_and_eval_stage_starts_under_the_launcher(tiny_llama_dir, data, tmp_path):
    cfg, steps = _planned(tmp_path, tiny_llama_dir, data, launcher="torchrun --nproc_per_node 8",
                          stages=["drop", "slim", "distill", "eval", "bench"])
    launched = {s.stage for s in steps if s.command(cfg)[:1] == ["torchrun"]}
    assert launched == {"slim", "distill", "eval"}  # bench times one process; drop has nothing to share out


def test_with_parent_full_effir_compresses_the_fine_tuned_full_model(tiny_llama_dir, data, tmp_path, capsys):
    """parent: full with stage distill: the full model is fine-tuned first and analyze, drop and slim start from it
    (the retriever is compressed, then distilled from itself), not from the base model; `demo` among distill's
    texts is the built-in data set."""
    cfg = _config(tmp_path, tiny_llama_dir, data, train="demo", datasets=["demo"], parent="full",
                  stages=["analyze", "drop", "slim", "distill", "eval"], drop={"mlp": 1},
                  slim={"method": "activation"}, distill={"texts": ["wiki", "demo"]}, baselines={"full": True})
    assert main(["run", str(cfg), "--dry-run"]) == 0
    commands = {c.split(" effir ", 1)[1].split()[0]: c.split(" effir ", 1)[1].split()
                for c in capsys.readouterr().out.splitlines()
                if " effir " in c and "/baselines/" not in c.split("--output ", 1)[1].split()[0]}  # EffiR's steps
    tuned = str(tmp_path / "run" / "baselines" / "full" / "finetune" / "model")
    for verb in ("analyze", "drop"):
        assert commands[verb][1] == tuned, commands[verb]
    commands = {verb: " ".join(argv) for verb, argv in commands.items()}
    assert f"--teacher {tuned}" in commands["distill"]
    assert f"--texts wiki,beir:{tmp_path / 'run' / 'data' / 'demo'}" in commands["distill"]
