"""Which MLP widths run fast? Times one SwiGLU MLP (gate, up, down) at every width in a window, interleaved.

Justifies `effir slim --width-multiple`: the default multiple is the smallest one whose widths are never slower
than their neighbours. Usage:
    python benchmarks/width_multiple.py [--hidden 576] [--center 1075] [--span 40] [--tokens 2048] [--device cpu]
Prints, for each width, the median time per token, and for multiples 1/8/16/32/64/128 the mean slowdown of
widths that are *not* such a multiple relative to the cost predicted by the best multiple's time per neuron.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def mlp_time(x, gate, up, down, repeats):
    times = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        down(torch.nn.functional.silu(gate(x)) * up(x))
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--center", type=int, default=1075, help="30%% of SmolLM2's 1536 removed leaves ~1075")
    p.add_argument("--span", type=int, default=40)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, device=args.device, dtype=dtype)
    widths = list(range(args.center - args.span, args.center + args.span + 1))
    mods = {}
    for w in widths:
        mods[w] = [torch.nn.Linear(args.hidden, w, bias=False), torch.nn.Linear(args.hidden, w, bias=False),
                   torch.nn.Linear(w, args.hidden, bias=False)]
        mods[w] = [m.to(args.device, dtype) for m in mods[w]]
    results = {w: [] for w in widths}
    with torch.inference_mode():
        for w in widths:  # warm-up
            mlp_time(x, *mods[w], 2)
        for _ in range(args.rounds):  # interleave widths so machine noise hits them all alike
            for w in widths:
                results[w].append(mlp_time(x, *mods[w], args.repeats))
    per = {w: statistics.median(v) for w, v in results.items()}
    for w in widths:
        tags = " ".join(f"x{m}" for m in (8, 16, 32, 64, 128) if w % m == 0)
        print(f"width {w:5d}  {per[w] * 1e6 / args.tokens:8.3f} us/token  {tags}")
    # Cost per neuron at the fastest-per-neuron width; how much slower is each class of widths than that?
    best = min(per[w] / w for w in widths)
    for m in (1, 8, 16, 32, 64, 128):
        cls = [w for w in widths if w % m == 0]
        if cls:
            excess = statistics.mean(per[w] / w / best for w in cls)
            print(f"multiple {m:3d}: {len(cls):3d} widths, mean time/neuron {excess:.3f}x the best")


if __name__ == "__main__":
    main()
