"""The files of a model folder besides ``effir.json``: the safetensors weights (listed, read, digested, and rebuilt
into a structurally compressed model) and, for compressed folders, the remote-code loader ``modeling_effir.py`` with
the ``config.json`` entries that point plain transformers at it (and the base config effir reads back from them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .arch import get_adapter
from .surgery import apply_structure
from .utils import EffirError, floating_dtype, sha256_file

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
REMOTE_FILE = "modeling_effir.py"
REMOTE_CONFIG_KEY = "effir_structure"  # config.json key read by the remote modeling file
BASE_TYPE_KEY = "effir_base_model_type"  # a compressed folder's model_type is "effir"; the real one is kept here
COMPRESSED_MODEL_TYPE = "effir"


# -- weight files ------------------------------------------------------------------------------------------------------
def load_compressed(folder: str | Path, config, structure: dict, torch_dtype: torch.dtype) -> torch.nn.Module:
    """Rebuild a compressed model: base skeleton from ``config``, the same surgery, then the safetensors, strictly.

    Raises:
        EffirError: the structure is invalid, or the weights in ``folder`` do not fit it exactly.
    """
    adapter = get_adapter(config)
    model = empty_model(config, torch_dtype)
    apply_structure(model, adapter, structure)
    state = read_weights(folder)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{what} {len(keys)} (e.g. {keys[0]})" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise EffirError(f"the weights in {folder} do not match the structure in its effir.json: "
                         f"{'; '.join(parts)}; the folder is damaged, re-run the stage that wrote it")
    # assign=True adopts the loaded tensors instead of copying into the skeleton, whose uninitialised memory is
    # never touched: peak memory stays ~1x the model. Cast to the skeleton's dtype per tensor first.
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's ``model.safetensors`` (or sharded ``model-*.safetensors`` + index)."""
    from safetensors.torch import load_file

    state = {}
    for f in weight_files(folder):
        state.update(load_file(str(f)))
    return state


def weight_keys(folder: str | Path) -> list[str]:
    """Tensor names stored in a folder's safetensors, without reading the tensors."""
    from safetensors import safe_open

    keys = []
    for f in weight_files(folder):
        with safe_open(str(f), framework="pt") as fh:
            keys += list(fh.keys())
    return keys


def weight_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if (folder / WEIGHTS).exists():
        return [folder / WEIGHTS]
    if (folder / WEIGHTS_INDEX).exists():
        index = json.loads((folder / WEIGHTS_INDEX).read_text())
        return [folder / f for f in sorted(set(index["weight_map"].values()))]
    raise EffirError(f"{folder} has no {WEIGHTS} (or {WEIGHTS_INDEX}); the model folder is incomplete")


def weights_digest(folder: Path, head: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of each safetensors file of a model folder, and of each Dense module's (``head``: their folder names,
    keyed ``2_Dense/model.safetensors``): recorded at save time so `effir verify` can tell the weights a stage wrote
    from any others put in their place."""
    digest = {path.name: sha256_file(path) for path in weight_files(folder)}
    for name in head:
        path = Path(folder) / name / WEIGHTS
        if not path.is_file():
            raise EffirError(f"{path} is missing; the Dense module is incomplete")
        digest[f"{name}/{WEIGHTS}"] = sha256_file(path)
    return digest


def first_weight_dtype(folder: Path) -> torch.dtype | None:
    """The dtype of the first floating tensor in the folder's safetensors; ``None`` without safetensors."""
    from safetensors import safe_open

    try:
        paths = weight_files(folder)
    except EffirError:  # weights in another format (pytorch_model.bin): from_pretrained reads those
        return None
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                dtype = floating_dtype(f.get_slice(name).get_dtype())
                if dtype is not None:
                    return dtype
    return None


def empty_model(config, torch_dtype):
    """A full-size headless model for ``config`` with uninitialised weights, to be filled by ``load_state_dict``.

    Built on CPU (not the meta device) so non-persistent buffers such as rotary frequencies are computed for real.
    """
    from transformers import AutoModel
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return AutoModel.from_config(config, dtype=torch_dtype)


# -- compressed folders: remote code and their config.json -------------------------------------------------------------
def packaged_remote_code() -> Path:
    return Path(__file__).parent / "remote" / REMOTE_FILE


def remote_code_is_packaged(folder: Path) -> bool:
    """True when the folder's ``modeling_effir.py`` is byte for byte the one this effir ships, so loading the folder
    with ``trust_remote_code=True`` runs only effir's own code."""
    mine = Path(folder) / REMOTE_FILE
    return mine.is_file() and mine.read_bytes() == packaged_remote_code().read_bytes()


def add_remote_code(folder: Path, adapter, structure: dict) -> None:
    """Copy ``modeling_effir.py`` next to the weights and point ``config.json``'s ``auto_map`` at it."""
    shutil.copyfile(packaged_remote_code(), folder / REMOTE_FILE)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    # A type of its own: plain transformers / sentence-transformers then refuse the folder without
    # trust_remote_code instead of building the full architecture with random weights for the removed parts.
    config[BASE_TYPE_KEY] = config["model_type"]
    config["model_type"] = COMPRESSED_MODEL_TYPE
    module = REMOTE_FILE[:-3]
    config["auto_map"] = {"AutoConfig": f"{module}.EffirConfig", "AutoModel": f"{module}.EffirModel"}
    config[REMOTE_CONFIG_KEY] = {**structure, "roles": adapter.structure_roles()}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_with_transformers(folder: str | os.PathLike, torch_dtype=torch.float32):
    """The folder's model as plain transformers loads it: ``AutoModel.from_pretrained(folder,
    trust_remote_code=True)``, which runs the folder's own ``modeling_effir.py`` for compressed models."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder), trust_remote_code=True, dtype=torch_dtype).eval()


def base_config(folder: Path):
    """The folder's config as its base architecture's class (``Qwen3Config``, ...), for plain and compressed folders.

    A compressed folder's config.json says ``model_type: "effir"`` (so plain transformers refuses it without
    ``trust_remote_code``) and carries what the remote-code loader needs; effir reads it as the base architecture's
    config without those entries, so a reloaded model fingerprints like the one that was saved.
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EffirError(f"{path} is not valid JSON ({e}); the model folder is damaged") from None
    base = data.get(BASE_TYPE_KEY) if isinstance(data, dict) else None
    if not base:
        config = AutoConfig.from_pretrained(folder)
        for key in (REMOTE_CONFIG_KEY, "auto_map"):  # folders effir wrote before compressed ones had their own type
            if hasattr(config, key):
                delattr(config, key)
        return config
    data = {k: v for k, v in data.items() if k not in ("model_type", "auto_map", REMOTE_CONFIG_KEY, BASE_TYPE_KEY)}
    if base not in CONFIG_MAPPING:
        raise EffirError(f"{folder}/config.json names base model type {base!r}, which this transformers does not know")
    return CONFIG_MAPPING[base].from_dict(data)
