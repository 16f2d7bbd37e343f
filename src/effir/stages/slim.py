"""Width reduction by self-slimming (EffiR step 3): learn neuron gates, cut the weakest fraction globally, slice.

    effir slim MODEL --train DATA --ratio 0.3 --output DIR
    effir slim MODEL --method activation --ratio 0.3 --output DIR     # calibration-based global ranking, no training
    effir slim MODEL --method magnitude --ratio 0.3 --output DIR      # the homogeneous-width baseline, no training

--method learned (default, the paper's): every kept MLP gets a gate vector z (init 1) applied as
``down(ReLU(z) * act(gate(x)) * up(x))``; z trains for --gate-steps steps on InfoNCE + lambda * sum sigmoid(beta |z|)
(z alone by default, z with LoRA under --gates-with-lora). ReLU(z) is then ranked *globally* across all kept MLPs
and the lowest --ratio of neurons is masked, so layers end up with different widths. --recover-steps trains the
masked model with the retrieval loss (LoRA; after any --method), then the masked rows and columns are removed
physically.
--method activation ranks neurons globally by what each writes into the residual stream, relative to that stream,
on --calibration text (effir.redundancy.neuron_importance): one forward pass over 64 x 256 tokens, no training data.
--method magnitude cuts the same fraction of every layer by weight magnitude (Minitron-style), for comparison.
All three keep the few "super neurons" that write the model's massive activations (attention sinks), found on the
built-in prose in one forward pass (effir.gates.super_neurons; --super-neuron-factor 0 turns this off).

Each layer's kept width is rounded to a multiple of --width-multiple, so the sliced matmuls keep shapes the
hardware runs fast (see benchmarks/width_multiple.py). Writes DIR/model (compressed-model format with per-layer
widths), DIR/widths.png, DIR/slim.json (written last) and, while training, DIR/checkpoint.pt for resuming.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch

from ..calibration import block_batches, load_texts, token_blocks
from ..checkpoint import fingerprint, load, save
from ..gates import SUPER_NEURON_FACTOR, MlpGates, global_keep_masks, super_neurons, uniform_magnitude_masks
from ..losses import info_nce
from ..plots import width_plot
from ..redundancy import neuron_importance
from ..surgery import count_parameters, slice_mlp, structure_of
from ..train_data import load_training_data, mine_bm25, parse_rank_range, random_negatives
from ..utils import EffirError, lr_schedule, seed_everything, write_json

DEFAULT_WIDTH_MULTIPLE = 32  # benchmarks/width_multiple.py on an H200 (bf16): see the --width-multiple help


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name, model folder (e.g. the output of effir drop), .gguf or hub id")
    p.add_argument("--output", required=True, help="run folder: model/, widths.png, slim.json, log")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of MLP neurons to remove, in (0, 1)")
    p.add_argument("--method", choices=["learned", "activation", "magnitude"], default="learned",
                   help="learned: gates trained on --train, ranked globally (paper); activation: each neuron's "
                        "contribution to the residual stream on --calibration text, ranked globally (no training); "
                        "magnitude: the same fraction of every layer by weight norm (baseline)")
    p.add_argument("--calibration", default="wiki", metavar="SOURCE",
                   help="text for --method activation, as for effir analyze: wiki (built-in prose), FILE.txt, "
                        "FILE.jsonl or beir:DIR (default: wiki)")
    p.add_argument("--calibration-samples", type=int, default=64,
                   help="blocks of --seq-len tokens scored by --method activation (default: 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration block (default: 256)")
    p.add_argument("--width-multiple", type=int, default=DEFAULT_WIDTH_MULTIPLE,
                   help=f"round every kept width to a multiple of this (default {DEFAULT_WIDTH_MULTIPLE}). Measured on "
                        "an H200 in bf16 (benchmarks/width_multiple.py, widths 1005-1145): widths that are not a "
                        "multiple of 8 cost 3.6x more time per neuron; multiples of 8/16/32/64 cost 1.08/1.06/1.04/"
                        "1.06x the best. 32 also keeps fp32 rows whole AVX-512 vectors on CPUs")
    p.add_argument("--super-neuron-factor", type=float, default=SUPER_NEURON_FACTOR,
                   help="always keep neurons whose peak activation x largest down weight reaches this multiple of "
                        f"their layer's median (the attention-sink writers; default {SUPER_NEURON_FACTOR:g}, 0: off)")
    p.add_argument("--train", help="training data (BEIR folder / Tevatron / FlagEmbedding jsonl); needed by --method "
                                   "learned and by --recover-steps")
    p.add_argument("--split", default="train")
    g = p.add_argument_group("gate training")
    g.add_argument("--gate-steps", type=int, default=500, help="steps of gate training (paper: 500)")
    g.add_argument("--gate-lr", type=float, default=1e-2, help="Adam lr for z (not stated by the paper)")
    g.add_argument("--beta", type=float, default=5.0, help="sharpness of the l0 surrogate sigmoid(beta*|z|)")
    g.add_argument("--lam", type=float, default=1e-8, help="weight lambda of the l0 surrogate")
    g.add_argument("--gates-with-lora", action="store_true", help="train LoRA adapters together with z")
    g.add_argument("--recover-steps", type=int, default=0,
                   help="LoRA steps on the masked model before slicing, any --method (needs --train; 0: leave "
                        "recovery to effir finetune)")
    g.add_argument("--lr", type=float, default=1e-4, help="LoRA lr (with --gates-with-lora / --recover-steps)")
    g.add_argument("--lora-r", type=int, default=32)
    g.add_argument("--lora-alpha", type=int, default=64)
    g.add_argument("--batch-size", type=int, default=8, help="queries per step")
    g.add_argument("--negatives", choices=["random", "bm25", "data"], default="random",
                   help="hard negatives: the data's own, BM25-mined (ranks --mine-range) or random")
    g.add_argument("--num-negatives", type=int, default=3, help="negatives per query")
    g.add_argument("--mine-range", default="10-100")
    g.add_argument("--temperature", type=float, default=0.02)
    g.add_argument("--pooling", choices=["last", "mean", "cls"], default=None,
                   help="train (and save) with this pooling (default: the model's)")
    g.add_argument("--query-max-length", type=int, default=None, help="training query length (default: model's)")
    g.add_argument("--document-max-length", type=int, default=None, help="training document length")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (0: never)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", help="model dtype when no training is done (training uses fp32)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace a finished DIR")


def run(args: argparse.Namespace) -> int:
    _check(args)
    # before the output folder and the model: a bad calibration source fails in a second and leaves nothing behind
    texts = load_texts(args.calibration).documents if args.method == "activation" else None
    out = Path(args.output)
    _prepare_output(out, args.overwrite)
    t0 = time.perf_counter()
    seed_everything(args.seed)
    learned = args.method == "learned"
    trains = learned or args.recover_steps > 0
    encoder = load(args.model, device=args.device, dtype="fp32" if trains else args.dtype, pooling=args.pooling)
    adapter = encoder.adapter
    before = count_parameters(encoder.model, adapter)
    structure = structure_of(encoder.model, adapter)
    layers = [i for i, w in enumerate(structure["mlp_widths"]) if w is not None]
    if not layers:
        raise EffirError(f"{args.model} has no MLP left to slim (all {structure['num_layers']} are dropped)")
    widths_before = [structure["mlp_widths"][i] for i in layers]
    protect = _super_neurons(args, encoder, layers)
    masks = z = None
    if args.method == "activation":
        scores = _activation_scores(args, encoder, layers, texts)
        masks = global_keep_masks(scores, args.ratio, args.width_multiple, protect)
    elif args.method == "magnitude":
        masks = uniform_magnitude_masks(encoder.model, adapter, layers, args.ratio, args.width_multiple, protect)
    if trains:
        masks, z = _trained_masks(args, encoder, layers, out, protect, masks)
    for i, mask in zip(layers, masks, strict=True):
        slice_mlp(encoder.model, adapter, i, torch.nonzero(mask).flatten())
    encoder.model.eval()
    for p in encoder.model.parameters():
        p.requires_grad_(False)
    encoder.meta["structure"] = structure_of(encoder.model, adapter)
    after = count_parameters(encoder.model, adapter)
    widths_after = [encoder.meta["structure"]["mlp_widths"][i] for i in layers]
    stage = {"stage": "slim", "method": args.method, "ratio": args.ratio, "width_multiple": args.width_multiple,
             "gate_steps": args.gate_steps if learned else 0, "recover_steps": args.recover_steps,
             "train": args.train}
    if args.method == "activation":
        stage.update(calibration=args.calibration, calibration_samples=args.calibration_samples, seq_len=args.seq_len)
    save(encoder, out / "model", stage=stage, overwrite=True)
    width_plot(layers, widths_before, widths_after, out / "widths.png",
               title=f"MLP widths after slimming ({args.method}, ratio {args.ratio})")
    removed = 1 - sum(widths_after) / sum(widths_before)
    summary = {**stage, "model": str(args.model), "output": str(out / "model"), "layers": layers,
               "widths_before": widths_before, "widths_after": widths_after, "removed_fraction": round(removed, 4),
               "parameters_before": before, "parameters_after": after,
               "super_neurons": {str(i): torch.nonzero(m).flatten().tolist() for i, m in zip(layers, protect, strict=True)
                                 if m.any()},
               "wall_s": round(time.perf_counter() - t0, 1)}
    if z is not None:
        summary["gate_stats"] = [{"layer": i, "mean_relu_z": round(float(torch.relu(v).mean()), 4)}
                                 for i, v in zip(layers, z, strict=True)]
    write_json(out / "slim.json", summary)  # last: its presence marks a finished run
    (out / "checkpoint.pt").unlink(missing_ok=True)
    _print_summary(summary)
    return 0


def _check(args) -> None:
    if not 0.0 < args.ratio < 1.0:
        raise EffirError(f"--ratio must be in (0, 1), got {args.ratio}")
    if args.width_multiple < 1:
        raise EffirError(f"--width-multiple must be >= 1, got {args.width_multiple}")
    if args.method == "activation" and (args.calibration_samples < 1 or args.seq_len < 2):
        raise EffirError("--calibration-samples must be >= 1 and --seq-len >= 2")
    if args.recover_steps < 0:
        raise EffirError(f"--recover-steps must be >= 0, got {args.recover_steps}")
    if args.method == "learned" and not args.train:
        raise EffirError("--method learned trains gates and needs --train DATA (or use --method activation, "
                         "which needs none)")
    if args.recover_steps and not args.train:
        raise EffirError("--recover-steps trains the masked model and needs --train DATA")
    if args.method == "learned" or args.recover_steps:
        for name in ("gate_steps", "batch_size", "num_negatives"):
            if getattr(args, name) < 1:
                raise EffirError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.gate_lr <= 0 or args.temperature <= 0:
            raise EffirError("--gate-lr and --temperature must be > 0")


def _prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EffirError(f"--output {out} exists and is not a folder")
    if overwrite and out.exists():
        shutil.rmtree(out)
    if (out / "slim.json").exists():
        raise EffirError(f"{out} already holds a finished slim run; pass --overwrite or choose another --output")
    out.mkdir(parents=True, exist_ok=True)


# -- masks: super neurons, activation ranking, learned gates --------------------------------------------------------
def _super_neurons(args, encoder, layers: list[int]) -> list[torch.Tensor]:
    """Super-neuron masks from 4 blocks of 256 tokens of the built-in prose (any text shows the sink)."""
    factor = args.super_neuron_factor
    blocks = token_blocks(encoder.tokenizer, load_texts("wiki").documents, 4, 256, seed=args.seed) if factor > 0 else []
    encoder.model.eval()
    protect = super_neurons(encoder.model, encoder.adapter, layers, block_batches(blocks, 2, encoder.pad_id), factor)
    found = [f"{i}:{int(m.sum())}" for i, m in zip(layers, protect, strict=True) if m.any()]
    print(f"effir slim: keeping {sum(int(m.sum()) for m in protect)} super neuron(s) (layer:count "
          f"{' '.join(found) or '-'})")
    return protect


def _activation_scores(args, encoder, layers: list[int], texts: list[str]) -> list[torch.Tensor]:
    """effir.redundancy.neuron_importance on --calibration-samples blocks of the --calibration ``texts``."""
    blocks = token_blocks(encoder.tokenizer, texts, args.calibration_samples, args.seq_len, seed=args.seed)
    if not blocks:
        raise EffirError(f"calibration source {args.calibration!r} tokenizes to nothing; give it real text")
    print(f"effir slim: scoring neurons on {len(blocks)} block(s) of {args.seq_len} tokens of {args.calibration}")
    return neuron_importance(encoder.model, encoder.adapter, layers, block_batches(blocks, 4, encoder.pad_id))


def _trained_masks(args, encoder, layers: list[int], out: Path, protect: list[torch.Tensor],
                   masks: list[torch.Tensor] | None):
    """Without ``masks`` (--method learned): train z (phase 1) and rank ReLU(z) globally into masks. Then, with
    --recover-steps, train the masked model with LoRA (phase 2, any method) and merge it. Returns (masks, z)."""
    from dataclasses import replace

    saved = encoder.settings
    encoder.settings = replace(saved, query_max_length=args.query_max_length or saved.query_max_length,
                               document_max_length=args.document_max_length or saved.document_max_length)
    examples = _examples(args)
    key = {"model": fingerprint(encoder), "train": str(args.train), "seed": args.seed, "ratio": args.ratio,
           "gate_steps": args.gate_steps if masks is None else 0, "recover_steps": args.recover_steps,
           "lora": args.gates_with_lora, "method": args.method,
           "masks": None if masks is None else hashlib.sha256(torch.cat(masks).numpy().tobytes()).hexdigest()}
    ckpt = _load_checkpoint(out / "checkpoint.pt", key)
    base = encoder.model
    lora = args.gates_with_lora or args.recover_steps > 0
    if lora:
        encoder.model = _with_lora(encoder, args)
    gates = MlpGates(base, encoder.adapter, layers)  # hooks on the (possibly LoRA-wrapped) down projections
    gates.to(encoder.device)
    for p in encoder.model.parameters():
        p.requires_grad_(False)
    lora_params = [p for n, p in encoder.model.named_parameters() if "lora_" in n]
    if ckpt:
        _restore(ckpt, encoder, gates)
        _truncate_log(out / "slim_log.jsonl", ckpt)
    phase1 = [{"params": list(gates.z), "lr": args.gate_lr}]
    if args.gates_with_lora:
        phase1.append({"params": lora_params, "lr": args.lr})

    def penalty():
        return args.lam * gates.penalty(args.beta)

    z = None
    if masks is None:
        _train(args, encoder, examples, gates, "gates", phase1, args.gate_steps, penalty, ckpt, out, key)
        z = [v.detach().clone() for v in gates.z]
        masks = global_keep_masks([torch.relu(v) for v in z], args.ratio, args.width_multiple, protect)
    gates.set_hard_masks([m.to(encoder.device) for m in masks])
    if args.recover_steps:
        _train(args, encoder, examples, gates, "recover", [{"params": lora_params, "lr": args.lr}],
               args.recover_steps, None, ckpt, out, key)
    gates.remove()
    if lora:
        encoder.model = encoder.model.merge_and_unload()
    encoder.settings = saved
    return masks, z


def _examples(args):
    examples, corpus = load_training_data(args.train, args.split)
    n = args.num_negatives
    if args.negatives == "bm25":
        mine_bm25(examples, corpus, parse_rank_range(args.mine_range), n, seed=args.seed)
    if args.negatives != "data" or any(len(ex.neg) < n for ex in examples):
        random_negatives(examples, corpus, n, seed=args.seed)
    if len(examples) < args.batch_size:
        raise EffirError(f"{len(examples)} training queries are fewer than --batch-size {args.batch_size}")
    return examples


def _with_lora(encoder, args):
    from peft import LoraConfig, get_peft_model

    names = [n for n, _ in encoder.model.named_modules()]
    targets = [t for t in encoder.adapter.lora_targets if any(n == t or n.endswith("." + t) for n in names)]
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets, bias="none")
    return get_peft_model(encoder.model, config)


def _train(args, encoder, examples, gates: MlpGates, phase: str, groups: list[dict], steps: int, extra_loss,
           ckpt: dict, out: Path, key: dict) -> None:
    """InfoNCE (+ ``extra_loss``) on the parameter ``groups`` for ``steps`` steps; resumable from DIR/checkpoint.pt.

    Phases run in the order gates -> recover; a checkpoint of a later phase means this one is finished.
    """
    from tqdm.auto import tqdm

    order = ["gates", "recover"]
    start = 0
    if ckpt:
        if order.index(ckpt["phase"]) > order.index(phase):
            return
        if ckpt["phase"] == phase:
            start = ckpt["step"]
    if start >= steps:
        return
    params = [p for g in groups for p in g["params"]]
    peak = [g["lr"] for g in groups]  # before the optimizer: a resumed state holds the last step's scaled lr
    optimizer = torch.optim.Adam(groups)
    if start:
        optimizer.load_state_dict(ckpt["optimizer"])
    # recovery fine-tunes a damaged model: warm up, decay and clip as effir finetune does (the lr is a function of
    # the step, so a resumed run follows the same curve); gate training keeps the paper's plain Adam
    factor = lr_schedule(0.1, "linear", steps) if phase == "recover" else (lambda _step: 1.0)
    for p in params:
        p.requires_grad_(True)
    encoder.model.train()
    g = args.num_negatives + 1
    bar = tqdm(total=steps, initial=start, desc=f"slim: {phase}", unit="step", disable=args.no_progress)
    for step in range(start, steps):
        idx = _batch_indices(len(examples), args.batch_size, step, args.seed)
        rng = random.Random(f"{args.seed}-{phase}-{step}")
        docs = []
        for i in idx:
            docs += [rng.choice(examples[i].pos)] + rng.sample(examples[i].neg, args.num_negatives)
        queries = encoder.tokenize([examples[i].query for i in idx], "query")
        documents = encoder.tokenize(docs, "document")
        q = encoder.embed(**{k: v.to(encoder.device) for k, v in queries.items()})  # (B, H)
        d = encoder.embed(**{k: v.to(encoder.device) for k, v in documents.items()})  # (B * G, H)
        nce = info_nce(q, d, g, args.temperature)
        loss = nce + extra_loss() if extra_loss else nce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if phase == "recover":
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # as effir finetune's default --max-grad-norm
        for group, lr in zip(optimizer.param_groups, peak, strict=True):
            group["lr"] = lr * factor(step)
        optimizer.step()
        with open(out / "slim_log.jsonl", "a") as f:
            f.write(json.dumps({"phase": phase, "step": step + 1, "loss": loss.item(), "info_nce": nce.item()}) + "\n")
        bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
        last = step + 1 == steps
        if last or (args.save_every and (step + 1) % args.save_every == 0):
            _save_checkpoint(out / "checkpoint.pt", key, phase, step + 1, encoder, gates, optimizer)
    bar.close()
    for p in params:
        p.requires_grad_(False)


def _batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Deterministic per step (so a resumed run sees the same batches): epoch permutation, then a slice."""
    per_epoch = n // batch
    epoch, within = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[within * batch:(within + 1) * batch].tolist()


def _trainable(encoder) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in encoder.model.named_parameters() if "lora_" in n}


def _save_checkpoint(path: Path, key, phase, step, encoder, gates, optimizer) -> None:
    state = {"key": key, "phase": phase, "step": step, "z": [v.detach().cpu() for v in gates.z],
             "lora": _trainable(encoder), "optimizer": optimizer.state_dict()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save keeps the previous checkpoint


def _load_checkpoint(path: Path, key: dict) -> dict:
    if not path.exists():
        return {}
    state = torch.load(path, weights_only=False)
    if state.get("key") != key:
        raise EffirError(f"{path} belongs to another slim run (different model, data or settings); pass "
                         "--overwrite to start over")
    print(f"effir slim: resuming {state['phase']} at step {state['step']}")
    return state


def _restore(ckpt: dict, encoder, gates: MlpGates) -> None:
    with torch.no_grad():
        for v, saved in zip(gates.z, ckpt["z"], strict=True):
            v.copy_(saved)
        params = dict(encoder.model.named_parameters())
        for n, saved in ckpt["lora"].items():
            params[n].copy_(saved)


def _truncate_log(path: Path, ckpt: dict) -> None:
    """Forget log lines written after the checkpoint, so a resumed run's log reads like an uninterrupted one."""
    if not path.exists():
        return
    order = ["gates", "recover"]
    keep = [line for line in path.read_text().splitlines()
            if (order.index(json.loads(line)["phase"]), json.loads(line)["step"])
            <= (order.index(ckpt["phase"]), ckpt["step"])]
    path.write_text("".join(line + "\n" for line in keep))


def _print_summary(s: dict) -> None:
    pb, pa = s["parameters_before"]["without_embeddings"], s["parameters_after"]["without_embeddings"]
    print(f"effir slim ({s['method']}): removed {100 * s['removed_fraction']:.1f}% of MLP neurons; parameters "
          f"without embeddings {pb:,} -> {pa:,} ({pa / pb:.1%})")
    print("  widths: " + " ".join(f"{i}:{w}" for i, w in zip(s["layers"], s["widths_after"], strict=True)))
    print(f"  model saved to {s['output']}")
