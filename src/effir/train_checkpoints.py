"""Resumable training checkpoints for :mod:`effir.training`'s loop: ``root/step-N`` holds the trainable weights, the
optimizer, the scheduler, the fp16 loss scaler and every process's RNG state, written atomically; resuming restores
them all and trims the step log, so a run killed at any moment continues as if it never stopped.

Checkpoint files are read with ``weights_only=True`` and the RNG states are plain JSON: nothing in a checkpoint
folder is ever run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .files import write_text
from .utils import EffirError


def checkpoint_dirs(root: Path) -> list[Path]:
    """Finished checkpoints ``root/step-N`` (those holding state.json), oldest first."""
    done = [d for d in root.glob("step-*") if (d / "state.json").exists() and "tmp" not in d.name]
    return sorted(done, key=lambda d: int(d.name.split("-")[1]))


def check_resume(path: str | None, flag: str = "--resume") -> None:
    """Refuse an explicit checkpoint that is not a finished one before any work: :func:`resume` reads it only once
    the model is loaded and the training data prepared, and that data would be left in the output folder.

    Raises:
        EffirError: ``path`` does not exist or holds no ``state.json``.
    """
    if path is None or (Path(path) / "state.json").is_file():
        return
    what = "is not a finished effir checkpoint (no state.json)" if Path(path).exists() else "does not exist"
    raise EffirError(f"{flag} {path} {what}; pass a checkpoint folder (OUTPUT/checkpoints/step-N), or leave {flag} "
                     "out to resume from the newest one in --output")


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(root: Path, acc, model, optimizer, scheduler, step: int, key: dict, keep: int = 0) -> None:
    """Atomically write ``root/step-N``: trainable weights, optimizer, scheduler, every process's RNG; then keep
    only the newest ``keep`` checkpoints (0: all)."""
    final = root / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    (tmp / f"rng-{acc.process_index}.json").write_text(json.dumps(rng_state()))
    acc.wait_for_everyone()
    if acc.is_main_process:
        torch.save(trainable_state(acc.unwrap_model(model)), tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if getattr(acc, "scaler", None) is not None:  # fp16 loss scaling
            torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "key": key}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def resume(root: Path, acc, model, optimizer, scheduler, key: dict, *, log_path: Path, log_match: dict | None = None,
           explicit: Path | None = None, restart_on_mismatch: bool = False) -> int:
    """Load the newest checkpoint under ``root`` (or ``explicit``) into model, optimizer and scheduler and return
    its step; 0 when there is none (log lines matching ``log_match`` are then dropped: the run starts over).

    Raises:
        EffirError: the checkpoint belongs to another run (its ``key`` differs), unless ``restart_on_mismatch``,
            which deletes ``root`` and starts over.
    """
    ckpt = explicit or (checkpoint_dirs(root) or [None])[-1]
    if ckpt is None:
        if acc.is_main_process:
            truncate_log(log_path, 0, log_match)
        return 0
    if not (ckpt / "state.json").exists():
        raise EffirError(f"--resume {ckpt} is not a finished effir checkpoint (no state.json)")
    state = json.loads((ckpt / "state.json").read_text())
    diff = [k for k in sorted(set(key) | set(state["key"])) if key.get(k) != state["key"].get(k)]
    if diff and restart_on_mismatch and explicit is None:
        if acc.is_main_process:
            shutil.rmtree(root, ignore_errors=True)
            truncate_log(log_path, 0, log_match)
        acc.wait_for_everyone()
        return 0
    if diff:
        shown = ", ".join(f"{k}: {state['key'].get(k)!r} -> {key.get(k)!r}" for k in diff[:4])
        raise EffirError(f"checkpoint {ckpt} belongs to another run ({shown}); use the same arguments, or "
                         "--overwrite / another --output to start a new run")
    weights = load_tensors(ckpt / "trainable.pt")
    missing = set(trainable_state(model)) ^ set(weights)
    if missing:
        raise EffirError(f"checkpoint {ckpt} does not match the model's trainable parameters ({len(missing)} differ)")
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(load_tensors(ckpt / "optimizer.pt"))
    scheduler.load_state_dict(load_tensors(ckpt / "scheduler.pt"))
    if (ckpt / "scaler.pt").exists() and getattr(acc, "scaler", None) is not None:
        acc.scaler.load_state_dict(load_tensors(ckpt / "scaler.pt"))
    set_rng_state(ckpt / f"rng-{acc.process_index}.json")
    step = int(state["step"])
    if acc.is_main_process:
        truncate_log(log_path, step, log_match)
    return step


def load_tensors(path: Path):
    """A checkpoint file of tensors and plain values, read with ``weights_only=True``: a pickle planted in a
    checkpoint folder is refused instead of run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EffirError(f"checkpoint file {path} is missing; resume from another checkpoint or pass --overwrite "
                         "to start over") from None
    except Exception as e:  # torch raises UnpicklingError / RuntimeError for code or damage; both mean "not ours"
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise EffirError(f"checkpoint file {path} is not a plain tensor file effir wrote ({first}); nothing in it "
                         "was run; delete the checkpoint or pass --overwrite to start over") from None


def rng_state() -> dict:
    """This process's RNG states as plain JSON (no pickle to run on resume)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"python": [version, list(internal), gauss_next],
            "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state().tolist(),
            "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None}


def set_rng_state(path: Path) -> None:
    try:
        rng = json.loads(path.read_text())
        version, internal, gauss_next = rng["python"]
        random.setstate((version, tuple(internal), gauss_next))
        name, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EffirError(f"checkpoint file {path} is missing or damaged ({type(e).__name__}); resume from another "
                         "checkpoint or pass --overwrite to start over") from None


def truncate_log(path: Path, step: int, match: dict | None = None) -> None:
    """Drop the log lines (those whose fields equal ``match``; all without it) past ``step``: a killed run may have
    logged steps it never checkpointed."""
    if not path.exists():
        return
    match = match or {}

    def keep(line: str) -> bool:
        record = json.loads(line)
        return any(record.get(k) != v for k, v in match.items()) or record["step"] <= step

    lines = [line for line in path.read_text().splitlines() if line.strip() and keep(line)]
    write_text(path, "".join(line + "\n" for line in lines))
