"""Load an effir compressed model with plain transformers: ``AutoModel.from_pretrained(folder, trust_remote_code=True)``.

effir copies this file into every compressed model folder. It is self-contained on purpose: it imports torch,
transformers and safetensors (which transformers itself requires), never effir. It reads the structure and the
module roles from ``config.json["effir_structure"]``, builds the base architecture's headless model, applies the
same surgery effir applies (see ``effir/surgery.py``, which this file mirrors), then loads the safetensors strictly.

A compressed folder's ``config.json`` has ``model_type: "effir"`` (the base architecture's type is kept under
``effir_base_model_type``), so loading it without ``trust_remote_code=True`` fails with transformers' standard
"contains custom code" error instead of building the full-size architecture and filling the missing or
resized MLPs with random weights.

A dropped sub-layer keeps its layer in place: in pre-norm layers its module returns a 0-dim zero and its norms
become the identity (the layer computes ``x + 0``); in post-norm layers (BERT) its module returns its residual
input. The weights of dropped sub-layers are not stored and not created. A dropped MLP listed in ``mlp_maps`` is
replaced instead by a bias plus a linear map of its input (``MappedBranch``, mirroring ``effir/surgery.py``).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel

STRUCTURE_KEY = "effir_structure"
BASE_TYPE_KEY = "effir_base_model_type"
MODEL_TYPE = "effir"
_OWN_KEYS = ("model_type", "auto_map", STRUCTURE_KEY, BASE_TYPE_KEY)


class EffirConfig(PreTrainedConfig):
    """The compressed folder's config: the base architecture's settings plus the structure, under its own type."""

    model_type = MODEL_TYPE

    def base_config(self) -> PreTrainedConfig:
        """The base architecture's config (e.g. ``Qwen3Config``), as its own folder would have loaded it."""
        from transformers import CONFIG_MAPPING

        data = {k: v for k, v in self.to_dict().items() if k not in _OWN_KEYS}
        return CONFIG_MAPPING[getattr(self, BASE_TYPE_KEY)].from_dict(data)


class DroppedBranch(nn.Module):
    """Stand-in for a dropped pre-norm sub-layer: returns a 0-dim zero (``(zero, None)`` for attention)."""

    def __init__(self, pair: bool = False):
        super().__init__()
        self.pair = pair

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        zero = x.new_zeros(())
        return (zero, None) if self.pair else zero


class ResidualPassthrough(nn.Module):
    """Stand-in for a dropped post-norm sub-layer: returns its residual argument unchanged."""

    def __init__(self, arg: int, pair: bool = False):
        super().__init__()
        self.arg = arg
        self.pair = pair

    def forward(self, *args, **kwargs):
        x = args[self.arg]
        return (x, None) if self.pair else x


class MappedBranch(nn.Module):
    """Stand-in for a dropped MLP replaced by ``bias + map(x)`` of its input, a rank-``rank`` linear map (rank 0: the
    bias alone); post-norm layers apply the LayerNorm after the residual add, kept under its own name."""

    def __init__(self, hidden: int, rank: int, like: torch.Tensor, residual_arg=None, norm=None,
                 norm_name: str = "LayerNorm"):
        super().__init__()
        self.rank, self.residual_arg, self.norm_name = rank, residual_arg, norm_name
        self.bias = nn.Parameter(torch.zeros(hidden, dtype=like.dtype))
        if rank == hidden:
            self.proj = _bare_linear(hidden, hidden, like.dtype)
        elif rank:
            self.up, self.down = _bare_linear(hidden, rank, like.dtype), _bare_linear(rank, hidden, like.dtype)
        if norm is not None:
            setattr(self, norm_name, norm)

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        out = self.bias
        if self.rank == self.bias.numel():
            out = self.proj(x) + out
        elif self.rank:
            out = self.down(self.up(x)) + out
        if self.residual_arg is None:
            return out
        return getattr(self, self.norm_name)(out + args[self.residual_arg])


def _bare_linear(in_features: int, out_features: int, dtype) -> nn.Linear:
    new = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=dtype)
    new.weight = nn.Parameter(torch.empty((out_features, in_features), dtype=dtype))
    return new


def _replace_mlp(layer: nn.Module, r: dict, hidden: int, rank: int) -> None:
    """A dropped MLP replaced by a :class:`MappedBranch`; it keeps its input norm when the map reads its input."""
    like = _get(layer, r["down_proj"]).weight
    norm_name, norm = "LayerNorm", None
    if r["post_norm"]:
        norm_name = r["mlp_out_norm"][len(r["mlp"][-1]) + 1:]
        norm = _get(layer, r["mlp_out_norm"])
    for name in r["mlp"][:-1]:
        _set(layer, name, nn.Identity())
    _set(layer, r["mlp"][-1], MappedBranch(hidden, rank, like, r["residual_args"][1] if r["post_norm"] else None,
                                           norm, norm_name))
    norms = (r["mlp_out_norm"],) if rank else (r["mlp_in_norm"], r["mlp_out_norm"])
    if not r["post_norm"]:
        for name in norms:
            if name and _get(layer, name) is not None:
                _set(layer, name, nn.Identity())


def _get(root, path):
    for name in path.split("."):
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


def _set(root, path, value):
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, value)


def apply_structure(model: nn.Module, structure: dict) -> None:
    """Drop sub-layers and resize narrowed MLPs of a full-size skeleton (weights left empty)."""
    r = structure["roles"]
    layers = _get(model, r["layers"])
    maps = structure.get("mlp_maps") or {}
    for i, rank in maps.items():
        _replace_mlp(layers[int(i)], r, model.config.hidden_size, rank)
    for i in structure["dropped_attention"]:
        layer = layers[i]
        if r["post_norm"]:
            _set(layer, r["attention"], ResidualPassthrough(r["residual_args"][0], pair=r["attn_returns_pair"]))
            continue
        _set(layer, r["attention"], DroppedBranch(pair=r["attn_returns_pair"]))
        for norm in (r["attn_in_norm"], r["attn_out_norm"]):
            if norm and _get(layer, norm) is not None:
                _set(layer, norm, nn.Identity())
    for i in structure["dropped_mlp"]:
        if str(i) in maps:
            continue
        layer = layers[i]
        for name in r["mlp"][:-1]:
            _set(layer, name, nn.Identity())
        if r["post_norm"]:
            _set(layer, r["mlp"][-1], ResidualPassthrough(r["residual_args"][1]))
            continue
        _set(layer, r["mlp"][-1], DroppedBranch())
        for norm in (r["mlp_in_norm"], r["mlp_out_norm"]):
            if norm and _get(layer, norm) is not None:
                _set(layer, norm, nn.Identity())
    for i, width in enumerate(structure["mlp_widths"]):
        if width is None or width == _get(layers[i], r["down_proj"]).in_features:
            continue
        for path in r["up_projs"]:
            old = _get(layers[i], path)
            _set(layers[i], path, _empty_linear(old, old.in_features, 2 * width if r["fused_gate_up"] else width))
        old = _get(layers[i], r["down_proj"])
        _set(layers[i], r["down_proj"], _empty_linear(old, width, old.out_features))


def _empty_linear(like: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    new = nn.Linear(in_features, out_features, bias=like.bias is not None, device="meta", dtype=like.weight.dtype)
    new.weight = nn.Parameter(torch.empty((out_features, in_features), dtype=like.weight.dtype))
    if like.bias is not None:
        new.bias = nn.Parameter(torch.empty(out_features, dtype=like.weight.dtype))
    return new


def _weights(path, hub_kwargs) -> dict:
    from safetensors.torch import load_file
    from transformers.utils import cached_file

    kw = {k: v for k, v in hub_kwargs.items()
          if k in ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")}
    single = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False, **kw)
    if single:
        return load_file(single)
    index = cached_file(path, "model.safetensors.index.json", **kw)
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
        state.update(load_file(cached_file(path, shard, **kw)))
    return state


def _dtype(dtype, config):
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class EffirModel(PreTrainedModel):
    """Entry point named by ``config.json``'s ``auto_map``. ``from_pretrained`` returns the base architecture's
    headless model (e.g. ``LlamaModel``) with the compressed structure, so it behaves like any ``AutoModel``."""

    config_class = EffirConfig
    base_model_prefix = "model"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, dtype=None, torch_dtype=None,
                        **kwargs):
        path = os.fspath(pretrained_model_name_or_path)
        if config is None:
            config = EffirConfig.from_pretrained(path)
        structure = getattr(config, STRUCTURE_KEY, None)
        if not structure or not hasattr(config, BASE_TYPE_KEY):
            raise ValueError(f"{path}: config.json has no {STRUCTURE_KEY!r} / {BASE_TYPE_KEY!r}; it is not an effir "
                             "compressed model")
        config = EffirConfig.base_config(config)  # without auto_map, AutoModel builds the base architecture
        torch_dtype = _dtype(dtype if dtype is not None else torch_dtype, config)
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # older transformers
            from transformers.modeling_utils import no_init_weights
        with no_init_weights():
            model = AutoModel.from_config(config, dtype=torch_dtype)
        apply_structure(model, structure)
        state = _weights(path, kwargs)
        expected = model.state_dict()
        if set(state) != set(expected):
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(f"{path}: weights do not match the effir structure (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        # adopt the loaded tensors (cast per tensor to the skeleton's dtype) instead of copying into the skeleton
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True, assign=True)
        device_map = kwargs.get("device_map")
        if isinstance(device_map, (str, torch.device)) and str(device_map) != "auto":
            model.to(device_map)
        return model.eval()
