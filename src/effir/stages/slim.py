"""Width reduction by self-slimming (EffiR step 3): learn neuron gates, cut the weakest fraction globally, slice.

    effir slim MODEL --train DATA --ratio 0.3 --output DIR
    effir slim MODEL --method activation --ratio 0.3 --output DIR     # calibration-based global ranking, no training
    effir slim MODEL --method magnitude --ratio 0.3 --output DIR      # the homogeneous-width baseline, no training

--method learned (default, the paper's): every kept MLP gets a gate vector z (init 1) applied as
``down(ReLU(z) * act(gate(x)) * up(x))``; z trains on InfoNCE (z alone by default, z with LoRA under
--gates-with-lora) while effir.gates.TargetSparsityAdam pushes gates down until the --ratio fraction of them is
closed, whatever the loss scale: no lambda to tune. The gates are ranked by z plus a prior, the activation ranking
below spread over GATE_PRIOR_SPREAD (--gate-prior): the task reorders neurons as far as its evidence carries, and
a short budget, whose few batches order the gates poorly, keeps close to the calibration ranking
(docs/results/minilm-gates-target-cpu.md). Gate training ends once the cut has settled (the set of neurons it would
remove stops changing; --no-early-stop runs all --gate-steps). The neurons are then ranked *globally* across all
kept MLPs (equal values by each gate's recorded task importance) and the lowest --ratio of them is masked, so
layers end up with different widths. Without --train the gates learn from the model itself (--gate-loss distill): the
gated model's embeddings of --calibration text against the unslimmed model's, as effir distill does, so width is
learned without labels. --lam L trains instead with the paper's fixed objective, InfoNCE + L * sum
sigmoid(beta |z|) and plain Adam, for --gate-steps steps (the paper's L is 1e-8). --recover-steps trains the
masked model with the retrieval loss (LoRA; after any --method), then the masked rows and columns are removed
physically.
--method activation ranks neurons globally by what each writes into the residual stream, relative to that stream,
on --calibration text (effir.redundancy.neuron_importance): one forward pass over 64 x 256 tokens, no training data.
--method magnitude cuts the same fraction of every layer by weight magnitude (Minitron-style), for comparison.
All three keep the few "super neurons" that write the model's massive activations (attention sinks), found on the
built-in prose in one forward pass (effir.probes.super_neurons; --super-neuron-factor 0 turns this off).
After the cut, whatever the method, --compensate lstsq (the default) refits every cut MLP's down projection by ridge
least squares so that its kept neurons reproduce the full MLP's output on --compensate-samples blocks of
--calibration text, layer by layer through the layers already compensated (effir.compensation); --compensate bias
adds the removed neurons' mean contribution to the down projection's bias (BERT-style MLPs); none keeps the weights.

Each layer's kept width is rounded to a multiple of --width-multiple, so the sliced matmuls keep shapes the
hardware runs fast (see benchmarks/width_multiple.py). Writes DIR/model (compressed-model format with per-layer
widths), DIR/widths.png, DIR/slim.json (written last) and, while training, DIR/slim_log.jsonl and
DIR/checkpoints/PHASE/step-N (every --save-every steps and at the end of each phase; removed when the run finishes).
Re-running the same command after a kill resumes from the newest checkpoint.

Training uses effir finetune's loop (effir.training): launch the same command with torchrun or accelerate launch
for several GPUs (DDP; documents gathered across processes for in-batch negatives, so N processes with
--batch-size b train like one with N*b), bf16 autocast on GPUs, --grad-accum, --gradient-checkpointing.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from .. import gate_training, options, training
from ..calibration import block_batches, calibration_blocks, load_texts, token_blocks
from ..checkpoint import fingerprint, load, save
from ..compensation import COMPENSATE_SAMPLES, check_width_method, slice_and_refit
from ..compensation import METHODS as COMPENSATIONS
from ..files import write_json
from ..gate_training import PAPER_GATE_LR, TARGET_GATE_LR
from ..gates import MlpGates, check_reachable, global_keep_masks, prior_offsets, uniform_magnitude_masks
from ..plots import width_plot
from ..probes import SUPER_NEURON_FACTOR, super_neurons
from ..redundancy import neuron_importance
from ..refs import check_refs
from ..surgery import count_parameters, slice_mlp, structure_of
from ..train_data import check_negatives, load_training_data, parse_rank_range, prepare_negatives
from ..utils import (
    DTYPE_CHOICES,
    EffirError,
    check_device,
    check_output_dir,
    finite_float,
    from_main_process,
    seed_everything,
)

DEFAULT_WIDTH_MULTIPLE = 32  # benchmarks/width_multiple.py on an H200 (bf16): see the --width-multiple help
GATE_PRIOR_SPREAD = 2.0
"""Width, in units of z, of the activation ranking's offsets (--gate-prior): gates start at 1 and move about one
gate lr per Adam step, so the task reverses the prior's order between its extremes only after 2 / lr steps of
consistent gradient (40 at the default gate lr), between neighbours at once. Chosen on all-MiniLM-L6-v2 against
0.5 and 1 (docs/results/minilm-gates-target-cpu.md)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name, model folder (e.g. the output of effir drop), .gguf or hub id")
    p.add_argument("--output", required=True, help="run folder: model/, widths.png, slim.json, log")
    p.add_argument("--ratio", type=finite_float, default=0.3, help="fraction of MLP neurons to remove, in (0, 1)")
    p.add_argument("--method", choices=["learned", "activation", "magnitude"], default="learned",
                   help="learned: gates trained on --train, ranked globally (paper); activation: each neuron's "
                        "contribution to the residual stream on --calibration text, ranked globally (no training); "
                        "magnitude: the same fraction of every layer by weight norm (baseline)")
    p.add_argument("--calibration", default="wiki", metavar="SOURCE",
                   help="text for --method activation, for the gates' prior (--gate-prior), for gates learned "
                        "without --train and for --compensate lstsq, as for effir analyze: wiki (built-in prose), "
                        "FILE.txt, FILE.jsonl or beir:DIR (default: wiki)")
    p.add_argument("--calibration-samples", type=int, default=64,
                   help="blocks of --seq-len tokens scored by --method activation and --gate-prior activation "
                        "(default: 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration block (default: 256)")
    p.add_argument("--width-multiple", type=int, default=DEFAULT_WIDTH_MULTIPLE,
                   help=f"round every kept width to a multiple of this (default {DEFAULT_WIDTH_MULTIPLE}): matmuls "
                        "run faster on such widths (benchmarks/width_multiple.py; figures in "
                        "docs/results/figures-behind-defaults.md)")
    p.add_argument("--compensate", choices=COMPENSATIONS, default="lstsq",
                   help="after the cut, lstsq (default): refit each MLP's down projection (and bias) by ridge least "
                        "squares so its kept neurons reproduce the full MLP on --calibration text, layer by layer on "
                        "the already compensated layers before it (effir.compensation; no training, any --method; "
                        "the default because it retained more than none at both ratios measured in "
                        "docs/results/minilm-compensation-cpu.md); bias: the removed neurons' mean contribution "
                        "joins the down projection's bias (BERT-style MLPs only: LLaMA-style ones have no bias); "
                        "none: keep the kept neurons' weights as they are")
    p.add_argument("--compensate-samples", type=int, default=COMPENSATE_SAMPLES,
                   help=f"blocks of --seq-len tokens of --calibration text --compensate fits on ({COMPENSATE_SAMPLES})")
    p.add_argument("--super-neuron-factor", type=finite_float, default=SUPER_NEURON_FACTOR,
                   help="always keep neurons whose peak activation x largest down weight reaches this multiple of "
                        f"their layer's median (the attention-sink writers; default {SUPER_NEURON_FACTOR:g}, 0: off)")
    options.add_train_data(p, required=False, purpose="; needed by --method learned and by --recover-steps")
    _training_arguments(p.add_argument_group("gate training"))
    p.add_argument("--device", default=None,
                   help="cpu forces CPU; default: each process's GPU (training under torchrun / accelerate launch "
                        "uses accelerate's device)")
    p.add_argument("--dtype", default="source", choices=DTYPE_CHOICES,
                   help="dtype to load and save the model in (default: source, the dtype it is stored in; auto: "
                        "bf16 where the hardware runs it natively); gates and LoRA train in fp32, computation "
                        "follows --precision")
    options.add_run(p.add_argument_group("run"), save_every=50, keep_checkpoints=False)


def _training_arguments(g) -> None:
    """Options of the gate and recovery phases."""
    g.add_argument("--gate-loss", choices=["infonce", "distill"], default=None,
                   help="what the gates learn from: infonce on --train (the paper), or distill: stay close to the "
                        "unslimmed model's own embeddings of --calibration text, no labels (default: infonce with "
                        "--train, else distill)")
    g.add_argument("--gate-prior", choices=["activation", "none"], default="activation",
                   help="the order the gates start from (default without --lam: activation, the --method activation "
                        "ranking on --calibration text, added to z as offsets the task has to out-learn; none: all "
                        "gates equal, as in the paper, whose objective --lam always uses)")
    g.add_argument("--gate-steps", type=int, default=500,
                   help="most steps of gate training (paper: 500); without --lam it ends earlier once the cut settles")
    g.add_argument("--no-early-stop", action="store_true",
                   help="train the gates for all --gate-steps even after the cut has settled")
    g.add_argument("--gate-lr", type=finite_float, default=None,
                   help=f"Adam lr for z (default {TARGET_GATE_LR:g}, up to 0.1 as 2.5 / --gate-steps for short budgets; "
                        f"{PAPER_GATE_LR:g} with --lam; the paper states none)")
    g.add_argument("--beta", type=finite_float, default=5.0,
                   help="sharpness of the paper's l0 surrogate sigmoid(beta*|z|) (with --lam)")
    g.add_argument("--lam", type=finite_float, default=None,
                   help="train the gates with the paper's fixed objective: InfoNCE + LAM * sum sigmoid(beta*|z|), "
                        "plain Adam, all --gate-steps (the paper's value is 1e-8; docs/results/"
                        "smollm2-slim-order-cpu.md shows how it behaves). Default: none, the gates are driven to "
                        "--ratio closed by themselves")
    g.add_argument("--gates-with-lora", action="store_true", help="train LoRA adapters together with z")
    g.add_argument("--recover-steps", type=int, default=0,
                   help="LoRA steps on the masked model before slicing, any --method (needs --train; 0: leave "
                        "recovery to effir finetune)")
    options.add_lora(g, full=False)
    options.add_steps(g, lr_help="LoRA lr, with --gates-with-lora / --recover-steps", batch_size=8,
                      batch_help="queries (or, learning without --train, texts a side) per process per micro-batch")
    options.add_contrastive(g, negatives="random", num_negatives=3, miner=False)
    options.add_lengths(g)


def run(args: argparse.Namespace) -> int:
    _check(args)
    # before the output folder and the model: a bad calibration source fails in a second and leaves nothing behind
    learns_from_text = (_ranks_by_activation(args) or (args.method == "learned" and _gate_loss(args) == "distill")
                        or args.compensate != "none")
    texts = load_texts(args.calibration).documents if learns_from_text else None
    return training.run_with_accelerator(args.device, args.precision, lambda acc: _run(args, acc, texts))


def _run(args, acc, texts: list[str] | None) -> int:
    out = Path(args.output)
    training.prepare_output(out, "slim.json", args.overwrite, acc)
    t0 = time.perf_counter()
    seed_everything(args.seed)
    learned = args.method == "learned"
    trains = learned or args.recover_steps > 0
    device = str(acc.device) if trains or acc.num_processes > 1 else args.device
    encoder = load(args.model, device=device, dtype=args.dtype, pooling=args.pooling)
    adapter = encoder.adapter
    before = count_parameters(encoder.model, adapter)
    structure = structure_of(encoder.model, adapter)
    layers = [i for i, w in enumerate(structure["mlp_widths"]) if w is not None]
    if not layers:
        raise EffirError(f"{args.model} has no MLP left to slim (all {structure['num_layers']} are dropped)")
    check_width_method(encoder.model, adapter, args.compensate, layers)
    widths_before = [structure["mlp_widths"][i] for i in layers]
    protect = from_main_process(_super_neurons(args, encoder, layers, acc.is_main_process))
    check_reachable(args.ratio, widths_before, [int(m.sum()) for m in protect], args.width_multiple)
    masks = z = None
    gate_info = {}
    if args.method == "activation":
        scores = _activation_scores(args, encoder, layers, texts, acc.is_main_process)
        masks = global_keep_masks(scores, args.ratio, args.width_multiple, protect)
    elif args.method == "magnitude":
        masks = uniform_magnitude_masks(encoder.model, adapter, layers, args.ratio, args.width_multiple, protect)
    # calibration statistics may differ in the last bits between GPUs: every process trains rank 0's masks
    masks = from_main_process(masks)
    offset = None
    if learned and _ranks_by_activation(args):  # before any gate or LoRA: the ranking of the model itself
        offset = prior_offsets(from_main_process(_activation_scores(args, encoder, layers, texts, acc.is_main_process)),
                               GATE_PRIOR_SPREAD)
    if trains:
        masks, z, gate_info = _trained_masks(args, acc, encoder, layers, out, protect, masks, offset)
    keeps = {i: torch.nonzero(mask).flatten() for i, mask in zip(layers, masks, strict=True)}
    compensation = _slice(args, encoder, keeps, texts, acc.is_main_process)
    encoder.model.eval()
    for p in encoder.model.parameters():
        p.requires_grad_(False)
    encoder.meta["structure"] = structure_of(encoder.model, adapter)
    if acc.is_main_process:
        _finish(args, encoder, out, layers, widths_before, before, protect, z, gate_info, compensation,
                time.perf_counter() - t0)
    return 0


def _slice(args, encoder, keeps: dict[int, torch.Tensor], texts: list[str] | None, main: bool) -> dict | None:
    """Cut every MLP to its ``keeps``; with --compensate lstsq, refit the down projections on the way
    (effir.compensation) and return what the refit did. Other processes only slice: they save nothing."""
    if args.compensate == "none" or not main:
        for i, keep in keeps.items():
            slice_mlp(encoder.model, encoder.adapter, i, keep)
        return None
    blocks = calibration_blocks(encoder, texts, args.compensate_samples, args.seq_len, seed=args.seed,
                                source=args.calibration, verb="slim")
    print(f"effir slim: refitting the down projections on {len(blocks)} block(s) of up to {args.seq_len} tokens of "
          f"{args.calibration}")
    stats = slice_and_refit(encoder.model, encoder.adapter, keeps, block_batches(blocks, 4, encoder.pad_id),
                            method=args.compensate, progress=not args.no_progress)
    before, after = (sum(stats[k]) / len(stats[k]) for k in ("error_unrepaired", "error_refit"))
    print(f"  output error of the cut MLPs (relative, on that text): {before:.4f} -> {after:.4f} after the refit "
          f"({stats['seconds']:.1f} s)")
    return stats


def _finish(args, encoder, out: Path, layers, widths_before, before, protect, z, gate_info: dict,
            compensation: dict | None, wall: float) -> None:
    after = count_parameters(encoder.model, encoder.adapter)
    widths_after = [encoder.meta["structure"]["mlp_widths"][i] for i in layers]
    stage = {"stage": "slim", "method": args.method, "ratio": args.ratio, "width_multiple": args.width_multiple,
             "gate_steps": args.gate_steps if args.method == "learned" else 0, "recover_steps": args.recover_steps,
             "train": args.train}
    if args.method == "learned":
        stage.update(gate_prior=_gate_prior(args))
    if _ranks_by_activation(args):
        stage.update(calibration=args.calibration, calibration_samples=args.calibration_samples, seq_len=args.seq_len)
    stage.update(compensate=args.compensate)
    if args.compensate != "none":
        stage.update(calibration=args.calibration, compensate_samples=args.compensate_samples, seq_len=args.seq_len)
    save(encoder, out / "model", stage=stage, overwrite=True)
    width_plot(layers, widths_before, widths_after, out / "widths.png",
               title=f"MLP widths after slimming ({args.method}, ratio {args.ratio})")
    removed = 1 - sum(widths_after) / sum(widths_before)
    summary = {**stage, "model": str(args.model), "output": str(out / "model"), "layers": layers,
               "widths_before": widths_before, "widths_after": widths_after, "removed_fraction": round(removed, 4),
               "parameters_before": before, "parameters_after": after,
               "super_neurons": {str(i): torch.nonzero(m).flatten().tolist() for i, m in zip(layers, protect, strict=True)
                                 if m.any()},
               "wall_s": round(wall, 1)}
    if compensation is not None:
        summary["compensation"] = compensation
    if z is not None:
        summary.update(gate_info, objective="paper" if args.lam is not None else "target")
        summary["gate_stats"] = [{"layer": i, "mean_relu_z": round(float(torch.relu(v).mean()), 4)}
                                 for i, v in zip(layers, z, strict=True)]
    write_json(out / "slim.json", summary)  # last: its presence marks a finished run
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    _print_summary(summary)


def _check(args) -> None:
    check_device(args.device)
    check_output_dir(args.output)
    check_refs({"MODEL": args.model})
    parse_rank_range(args.mine_range)  # else read only once the model is loaded and the masks ranked
    if not 0.0 < args.ratio < 1.0:
        raise EffirError(f"--ratio must be in (0, 1), got {args.ratio}")
    if args.width_multiple < 1:
        raise EffirError(f"--width-multiple must be >= 1, got {args.width_multiple}")
    if _ranks_by_activation(args) and (args.calibration_samples < 1 or args.seq_len < 2):
        raise EffirError("--calibration-samples must be >= 1 and --seq-len >= 2")
    if args.compensate != "none" and (args.compensate_samples < 1 or args.seq_len < 2):
        raise EffirError("--compensate-samples must be >= 1 and --seq-len >= 2")
    if args.recover_steps < 0:
        raise EffirError(f"--recover-steps must be >= 0, got {args.recover_steps}")
    if args.method == "learned" and not args.train and args.gate_loss == "infonce":
        raise EffirError("--gate-loss infonce trains the gates on labelled data and needs --train DATA (or use "
                         "--gate-loss distill or --method activation, which need none)")
    if args.recover_steps and not args.train:
        raise EffirError("--recover-steps trains the masked model and needs --train DATA")
    if args.method == "learned" or args.recover_steps:
        for name in ("gate_steps", "batch_size", "grad_accum", "num_negatives"):
            if getattr(args, name) < 1:
                raise EffirError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if (args.gate_lr is not None and args.gate_lr <= 0) or args.temperature <= 0:
            raise EffirError("--gate-lr and --temperature must be > 0")


# -- masks: super neurons, activation ranking, learned gates --------------------------------------------------------
def _super_neurons(args, encoder, layers: list[int], main: bool) -> list[torch.Tensor]:
    """Super-neuron masks from 4 blocks of 256 tokens of the built-in prose (any text shows the sink)."""
    factor = args.super_neuron_factor
    blocks = token_blocks(encoder.tokenizer, load_texts("wiki").documents, 4, 256, seed=args.seed) if factor > 0 else []
    encoder.model.eval()
    protect = super_neurons(encoder.model, encoder.adapter, layers, block_batches(blocks, 2, encoder.pad_id), factor)
    found = [f"{i}:{int(m.sum())}" for i, m in zip(layers, protect, strict=True) if m.any()]
    if main:
        print(f"effir slim: keeping {sum(int(m.sum()) for m in protect)} super neuron(s) (layer:count "
              f"{' '.join(found) or '-'})")
    return protect


def _activation_scores(args, encoder, layers: list[int], texts: list[str], main: bool) -> list[torch.Tensor]:
    """effir.redundancy.neuron_importance on --calibration-samples blocks of the --calibration ``texts``."""
    blocks = token_blocks(encoder.tokenizer, texts, args.calibration_samples, args.seq_len, seed=args.seed)
    if not blocks:
        raise EffirError(f"calibration source {args.calibration!r} tokenizes to nothing; give it real text")
    if main:
        print(f"effir slim: scoring neurons on {len(blocks)} block(s) of {args.seq_len} tokens of {args.calibration}")
    return neuron_importance(encoder.model, encoder.adapter, layers, block_batches(blocks, 4, encoder.pad_id))


RUN_KEYS = options.run_keys(add_arguments)
"""What a checkpoint must share with this run to be resumed: every option but effir.options.NOT_RUN_KEYS."""


def _trained_masks(args, acc, encoder, layers: list[int], out: Path, protect: list[torch.Tensor],
                   masks: list[torch.Tensor] | None, offset: list[torch.Tensor] | None):
    """Without ``masks`` (--method learned): train z (phase "gates") and rank z globally into masks. Then, with
    --recover-steps, train the masked model with LoRA (phase "recover", any method) and merge it. Returns (masks, z,
    what gate training did)."""
    saved = encoder.settings
    encoder.settings = replace(saved, query_max_length=args.query_max_length or saved.query_max_length,
                               document_max_length=args.document_max_length or saved.document_max_length)
    loop = options.typed(gate_training.LoopOptions, args)
    examples = _examples(args) if args.train else None
    gate_data = examples if _gate_loss(args) == "infonce" or masks is not None else gate_training.parent_targets(
        encoder, args.calibration, loop, args.gate_steps)
    key = {**{k: getattr(args, k) for k in RUN_KEYS}, "model_fingerprint": fingerprint(encoder),
           "processes": acc.num_processes,
           "masks": None if masks is None else hashlib.sha256(torch.cat(masks).numpy().tobytes()).hexdigest()}
    base = encoder.model
    for p in base.parameters():
        p.requires_grad_(False)
    if args.gradient_checkpointing:
        training.set_activation_checkpointing(base, True)
    lora = args.gates_with_lora or args.recover_steps > 0
    lora_params = training.add_lora(encoder, args.lora_r, args.lora_alpha) if lora else []
    paper = args.lam is not None
    # hooks on the (LoRA-wrapped) down projections
    gates = MlpGates(base, encoder.adapter, layers, straight_through=not paper).to(encoder.device)
    z, info = None, {}
    if masks is None:
        z, masks, info = gate_training.train_gates(options.typed(gate_training.GateOptions, args), loop, acc, encoder,
                                                   gate_data, gates, lora_params, protect, out, key, offset)
    gates.set_hard_masks([m.to(encoder.device) for m in masks])
    if args.recover_steps:
        gate_training.set_trainable(lora_params, True)
        gate_training.run_phase(loop, acc, encoder, examples, "recover", [{"params": lora_params, "lr": args.lr}],
                                args.recover_steps, out, key, penalty=None)
    gates.remove()
    if args.gradient_checkpointing:
        training.set_activation_checkpointing(base, False)
    if lora:
        encoder.model = encoder.model.merge_and_unload()
    encoder.settings = saved
    return masks, z, info


def _ranks_by_activation(args) -> bool:
    """--method activation, or learned gates that start from that ranking: both score neurons on calibration text."""
    return args.method == "activation" or (args.method == "learned" and _gate_prior(args) == "activation")


def _gate_prior(args) -> str:
    return "none" if args.lam is not None else args.gate_prior


def _gate_loss(args) -> str:
    return args.gate_loss or ("infonce" if args.train else "distill")


def _examples(args):
    examples, corpus = load_training_data(args.train, args.split)
    prepare_negatives(examples, corpus, args.negatives, args.num_negatives, parse_rank_range(args.mine_range),
                      args.seed)
    check_negatives(examples, args.num_negatives)
    return examples


def _print_summary(s: dict) -> None:
    pb, pa = s["parameters_before"]["without_embeddings"], s["parameters_after"]["without_embeddings"]
    print(f"effir slim ({s['method']}): removed {100 * s['removed_fraction']:.1f}% of MLP neurons; parameters "
          f"without embeddings {pb:,} -> {pa:,} ({pa / pb:.1%})")
    print("  widths: " + " ".join(f"{i}:{w}" for i, w in zip(s["layers"], s["widths_after"], strict=True)))
    print(f"  model saved to {s['output']}")
