"""Small shared helpers: the user-facing error type, device/dtype choice, seeding, distributed helpers."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
from pathlib import Path

import torch


class EffirError(Exception):
    """A problem with the user's input. The CLI prints it as one line and exits with code 2."""


def finite_float(text: str) -> float:
    """The argparse ``type`` of every float option: nan and inf are refused at parse time, because they train or
    score garbage that looks finished (an inf lr saves an all-NaN model; a nan tolerance compares False)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a real value")
    return value


def check_device(name: str | None, flag: str = "--device") -> None:
    """Refuse a device this machine lacks, before any work: torch would fail deep inside a stage, accelerate
    would silently train on the CPU instead of the GPU asked for, and torch runs ``cpu:1`` on the one CPU device
    while the user believes they chose another.

    Raises:
        EffirError: ``name`` is not a torch device, or names one this machine does not have (the line lists those
            it has).
    """
    if not name:
        return
    have = device_counts()
    listed = ", ".join(f"{kind}:{i}" if n > 1 else kind for kind, n in have.items() for i in range(n))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EffirError(f"{flag} {name!r} is not a device; use one of {listed}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EffirError(f"{flag} {name} asked for CUDA, but torch sees no CUDA GPU here; use --device cpu")
    if (device.index or 0) >= have.get(device.type, 0):
        raise EffirError(f"{flag} {name}: this machine has no such device; use one of {listed}")


def device_counts() -> dict[str, int]:
    """How many devices of each kind this machine runs: one ``cpu`` (torch has a single CPU device, ``cpu:0``),
    each CUDA GPU torch sees, and one ``mps`` on Apple silicon."""
    counts = {"cpu": 1}
    if torch.cuda.is_available():
        counts["cuda"] = torch.cuda.device_count()
    if torch.backends.mps.is_available():
        counts["mps"] = 1
    return counts


def check_output_dir(path: str | os.PathLike, flag: str = "--output", siblings: bool = False) -> Path:
    """Refuse an output folder that cannot be written, before any work: a path that is a file, a parent that is a
    file, or a folder without write permission. ``siblings``: the stage also writes next to the folder (a
    temporary folder renamed into place), so its parent must be writable too.

    Raises:
        EffirError: naming the flag and what is in the way.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise EffirError(f"{flag} {out} exists and is not a folder; choose another {flag}")
    need = [out.parent] if siblings else []
    need.append(out)
    for target in need:
        existing = target
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise EffirError(f"{flag} {out} cannot be created: {existing} is a file; choose another {flag}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise EffirError(f"{flag} {out} cannot be written: {existing} is not writable; fix its permissions or "
                             f"choose another {flag}")
    return out


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else cuda when available, else cpu (under torchrun: this process's local GPU).

    Raises:
        EffirError: ``device`` is not a device this machine has (see :func:`check_device`).
    """
    if device:
        check_device(device)
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


CPU_BF16_ENV = "EFFIR_CPU_BF16"  # "1" / "0" force the CPU's bf16 path on / off; unset: read the CPU's flags


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (avx512_bf16 / amx), where bf16 is much faster than fp32.

    ``EFFIR_CPU_BF16=1`` or ``0`` overrides the detection (the test suite runs both paths on any CPU).
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


DTYPE_CHOICES = ("source", "auto", "fp32", "bf16", "fp16")


def pick_dtype(dtype: str | None, device: torch.device, stored: torch.dtype = torch.float32) -> torch.dtype:
    """Resolve ``dtype``: ``source`` = ``stored`` (the dtype the weights are kept in on disk), ``auto`` = bf16 where
    the hardware runs it natively (a compute choice), or an explicit ``fp32`` / ``bf16`` / ``fp16``."""
    if dtype == "source":
        return stored
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    if dtype not in _DTYPES:
        raise EffirError(f"unknown dtype {dtype!r}; use one of source, auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def floating_dtype(name) -> torch.dtype | None:
    """fp32 / bf16 / fp16 from a torch dtype or its name in any usual spelling ('float32', 'BF16', ...), else None."""
    if isinstance(name, torch.dtype):
        return name if name in (torch.float32, torch.bfloat16, torch.float16) else None
    key = str(name).lower().removeprefix("torch.")
    return _DTYPES.get({"f32": "fp32", "f16": "fp16"}.get(key, key))


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of the initialised torch.distributed group, or (0, 1) when running alone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed_from_env(device: str | None = None) -> bool:
    """Join the process group that torchrun / accelerate launch describe in the environment, if any.

    nccl only moves CUDA tensors, so the group uses gloo when ``device`` is the CPU, even on a GPU machine.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return torch.distributed.is_initialized()
    on_cpu = device is not None and torch.device(device).type == "cpu"
    backend = "nccl" if torch.cuda.is_available() and not on_cpu else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return True


def from_main_process(obj):
    """Rank 0's ``obj`` (anything picklable) on every rank; ``obj`` itself when running alone."""
    if dist_info()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def is_main_process() -> bool:
    return dist_info()[0] == 0


SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""--precision of the training verbs: the autocast dtype, or auto (bf16 where the hardware runs it natively)."""


def check_schedule(warmup_ratio: float, schedule: str) -> None:
    """Refuse a schedule :func:`lr_schedule` cannot follow (stages call it before any work).

    Raises:
        EffirError: ``schedule`` is not one of :data:`SCHEDULES`, or ``warmup_ratio`` is not in [0, 1].
    """
    if schedule not in SCHEDULES:
        raise EffirError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not 0 <= warmup_ratio <= 1:
        raise EffirError(f"--warmup-ratio must be in [0, 1], got {warmup_ratio}")


def lr_schedule(warmup_ratio: float, schedule: str, total: int):
    """Multiplier of the peak lr at each step: linear warm-up over ``warmup_ratio`` of ``total`` steps, then
    linear or cosine decay to 0, or constant (shared with effir slim's recovery phase).

    Raises:
        EffirError: as :func:`check_schedule`, or ``total`` is below 1.
    """
    check_schedule(warmup_ratio, schedule)
    if total < 1:
        raise EffirError(f"a learning-rate schedule needs at least 1 step, got {total}")
    warmup = int(warmup_ratio * total)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return f
