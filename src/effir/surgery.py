"""Structural edits of models in memory, through the architecture table: drop sub-layers, resize or slice MLP
widths, count parameters, and turn a full-size skeleton into a saved structure.

A compressed model keeps every layer in place (so layer indices stay the original ones and drops compose); a dropped
sub-layer's modules are replaced by parameter-free stand-ins that make the layer's own forward skip the branch:

- pre-norm layers (``x + out_norm(F(in_norm(x)))``): ``F`` returns a 0-dim zero and both norms become the identity,
  so the layer computes ``x + 0 = x``. The 0-dim zero broadcasts, so no ``(B, T, H)`` tensor of zeros is allocated;
  the only cost left is one element-wise add per dropped branch.
- post-norm layers (BERT, ``LN(x + F(x))`` computed *inside* the sub-layer's modules): the module returns its
  residual input, so the sub-layer, its residual add and its LayerNorm are all skipped at no cost.

A dropped MLP may instead be replaced by a :class:`MappedBranch`, a bias or a cheap linear map fitted to reproduce it
(:mod:`effir.compensation`); it counts as dropped everywhere (no width, never picked or sliced again).

The structure of a model is ``{"num_layers": L, "dropped_attention": [...], "dropped_mlp": [...],
"mlp_widths": [int | None per layer]}`` (``None`` for a dropped MLP), plus ``"mlp_maps": {"layer": rank}`` for the
dropped MLPs replaced by a map; it is derived from the modules themselves by :func:`structure_of`, stored in
``effir.json`` and rebuilt by :func:`apply_structure`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .arch import ArchAdapter, get_path, layer_list, set_path
from .utils import EffirError


class DroppedBranch(nn.Module):
    """Stand-in for a dropped pre-norm sub-layer: returns a 0-dim zero (``(zero, None)`` for attention).

    ``residual + zero`` is exactly ``residual`` and keeps its dtype and shape.
    """

    def __init__(self, pair: bool = False):
        super().__init__()
        self.pair = pair

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        zero = x.new_zeros(())
        return (zero, None) if self.pair else zero

    def extra_repr(self) -> str:
        return "dropped"


class ResidualPassthrough(nn.Module):
    """Stand-in for a dropped post-norm sub-layer (BERT): returns its residual argument unchanged."""

    def __init__(self, arg: int, pair: bool = False):
        super().__init__()
        self.arg = arg
        self.pair = pair

    def forward(self, *args, **kwargs):
        x = args[self.arg]  # the layers call these modules positionally
        return (x, None) if self.pair else x

    def extra_repr(self) -> str:
        return f"dropped, returns argument {self.arg}"


class MappedBranch(nn.Module):
    """Stand-in for a dropped MLP that still adds what reproduces it best for its cost (:mod:`effir.compensation`):
    ``bias + up/down(x)``, a linear map of the MLP's (normalised) input ``x`` of rank ``rank`` plus a bias; rank 0
    is the bias alone, the MLP's calibration mean. A full-rank map is one ``proj`` (hidden x hidden), a lower rank
    the pair ``up`` (hidden -> rank), ``down`` (rank -> hidden).

    Pre-norm layers call it as they called the MLP and add what it returns to the residual stream (a rank-0 bias
    broadcasts over the tokens). Post-norm layers (BERT) call it as the MLP's last module, ``(h, residual)``, and
    it applies the LayerNorm the MLP applied after its residual add, kept under the same name (``norm_name``).
    """

    def __init__(self, hidden: int, rank: int, like: torch.Tensor, *, residual_arg: int | None = None,
                 norm: nn.Module | None = None, norm_name: str = "LayerNorm"):
        super().__init__()
        if not 0 <= rank <= hidden:
            raise EffirError(f"a replacement map's rank must be in 0..{hidden}, got {rank}")
        self.rank, self.residual_arg, self.norm_name = rank, residual_arg, norm_name
        self.bias = nn.Parameter(torch.zeros(hidden, dtype=like.dtype, device=like.device),
                                 requires_grad=like.requires_grad)
        if rank == hidden:
            self.proj = _empty_linear_from(like, hidden, hidden)
        elif rank:
            self.up, self.down = _empty_linear_from(like, hidden, rank), _empty_linear_from(like, rank, hidden)
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

    def extra_repr(self) -> str:
        return f"dropped, replaced by a rank-{self.rank} map + bias"


_STAND_INS = (DroppedBranch, ResidualPassthrough, MappedBranch)


# -- dropping ----------------------------------------------------------------------------------------------------
def drop_sublayers(model: nn.Module, adapter: ArchAdapter, attention: Iterable[int] = (),
                   mlp: Iterable[int] = ()) -> None:
    """Drop the attention and/or MLP sub-layers of the given layers of ``model`` in place.

    A dropped sub-layer loses its module(s) and norm(s) (their weights leave the state dict); the residual stream
    passes through that branch unchanged. Dropping an already-dropped sub-layer is a no-op, so drops compose.

    Args:
        model: a headless HF model (``AutoModel``).
        adapter: its :class:`~effir.arch.ArchAdapter`.
        attention: layer indices whose attention sub-layer goes.
        mlp: layer indices whose MLP sub-layer goes.

    Raises:
        EffirError: an index is outside ``0 .. L-1``.
    """
    layers = layer_list(model, adapter)
    attention, mlp = _check_indices(attention, len(layers), "attention"), _check_indices(mlp, len(layers), "mlp")
    for i in attention:
        _drop_attention(layers[i], adapter)
    for i in mlp:
        if not is_dropped(layers[i], adapter, "mlp"):  # keeps a replacement map in place
            _drop_mlp(layers[i], adapter)


def replace_mlp(model: nn.Module, adapter: ArchAdapter, layer_idx: int, rank: int) -> MappedBranch:
    """Drop layer ``layer_idx``'s MLP and put a :class:`MappedBranch` of ``rank`` in its place,
    with uninitialised weights (zero bias); returns it. A map of rank > 0 reads the MLP's normalised input, so the
    MLP's input norm stays (pre-norm); a post-norm layer keeps the LayerNorm after its residual add."""
    layer = layer_list(model, adapter)[layer_idx]
    a = adapter
    if is_dropped(layer, a, "mlp"):
        raise EffirError(f"the MLP of layer {layer_idx} is already dropped; only a present MLP can be replaced by a map")
    in_norm = get_path(layer, a.mlp_in_norm) if a.mlp_in_norm else None
    like = get_path(layer, adapter.down_proj).weight
    norm_name = a.mlp_out_norm.removeprefix(a.mlp[-1] + ".") if a.post_norm else "LayerNorm"
    norm = get_path(layer, a.mlp_out_norm) if a.post_norm else None
    _drop_mlp(layer, a)
    branch = MappedBranch(model.config.hidden_size, rank, like,
                          residual_arg=a.residual_args[1] if a.post_norm else None, norm=norm, norm_name=norm_name)
    set_path(layer, a.mlp[-1], branch)
    if rank and in_norm is not None and not isinstance(in_norm, nn.Identity):
        set_path(layer, a.mlp_in_norm, in_norm)
    return branch


def _check_indices(indices: Iterable[int], n: int, what: str) -> list[int]:
    out = sorted({int(i) for i in indices})
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise EffirError(f"{what} layer index {bad[0]} is out of range: the model has {n} layers (0..{n - 1})")
    return out


def _drop_attention(layer: nn.Module, a: ArchAdapter) -> None:
    if a.post_norm:  # the module adds the residual and normalises itself
        set_path(layer, a.attention, ResidualPassthrough(a.residual_args[0], pair=a.attn_returns_pair))
        return
    set_path(layer, a.attention, DroppedBranch(pair=a.attn_returns_pair))
    _identity_norms(layer, (a.attn_in_norm, a.attn_out_norm))


def _drop_mlp(layer: nn.Module, a: ArchAdapter) -> None:
    for name in a.mlp[:-1]:
        set_path(layer, name, nn.Identity())
    if a.post_norm:
        set_path(layer, a.mlp[-1], ResidualPassthrough(a.residual_args[1]))
        return
    set_path(layer, a.mlp[-1], DroppedBranch())
    _identity_norms(layer, (a.mlp_in_norm, a.mlp_out_norm))


def _identity_norms(layer: nn.Module, norms: Sequence[str | None]) -> None:
    for norm in norms:
        if norm and get_path(layer, norm) is not None:
            set_path(layer, norm, nn.Identity())


def is_dropped(layer: nn.Module, adapter: ArchAdapter, group: str) -> bool:
    """True when ``layer``'s ``group`` (``attention`` or ``mlp``) sub-layer has been dropped."""
    path = adapter.attention if group == "attention" else adapter.mlp[-1]
    return isinstance(get_path(layer, path), _STAND_INS)


# -- widths --------------------------------------------------------------------------------------------------------
def mlp_width(layer: nn.Module, adapter: ArchAdapter) -> int | None:
    """Number of intermediate neurons of ``layer``'s MLP (``None`` when dropped)."""
    if is_dropped(layer, adapter, "mlp"):
        return None
    return get_path(layer, adapter.down_proj).in_features


def resize_mlp(model: nn.Module, adapter: ArchAdapter, layer_idx: int, width: int) -> None:
    """Give layer ``layer_idx``'s MLP ``width`` neurons, with *uninitialised* weights (to be loaded afterwards).

    Up projections get ``width`` output rows (a fused gate/up projection ``2 * width``), the down projection
    ``width`` input columns; biases, dtype and device are kept.
    """
    layer = layer_list(model, adapter)[layer_idx]
    if is_dropped(layer, adapter, "mlp"):
        raise EffirError(f"cannot resize the MLP of layer {layer_idx}: it is dropped")
    if width < 1:
        raise EffirError(f"MLP width must be >= 1, got {width} for layer {layer_idx}")
    for path in adapter.up_projs:
        old = get_path(layer, path)
        rows = 2 * width if adapter.fused_gate_up else width
        set_path(layer, path, _empty_linear(old, old.in_features, rows))
    old = get_path(layer, adapter.down_proj)
    set_path(layer, adapter.down_proj, _empty_linear(old, width, old.out_features))


def slice_mlp(model: nn.Module, adapter: ArchAdapter, layer_idx: int, keep: torch.Tensor | Sequence[int]) -> int:
    """Keep only the intermediate neurons ``keep`` (indices into the current width) of layer ``layer_idx``'s MLP.

    Rows of the up projections (both halves of a fused gate/up projection) and columns of the down projection
    are cut; the result equals the unsliced MLP with the other neurons' activations forced to zero.

    Returns:
        The new width.
    """
    layer = layer_list(model, adapter)[layer_idx]
    width = mlp_width(layer, adapter)
    if width is None:
        raise EffirError(f"cannot slice the MLP of layer {layer_idx}: it is dropped")
    keep = torch.as_tensor(keep, dtype=torch.long).unique(sorted=True)
    if keep.numel() == 0 or keep.min() < 0 or keep.max() >= width:
        raise EffirError(f"neurons to keep for layer {layer_idx} must be a non-empty subset of 0..{width - 1}")
    with torch.no_grad():
        for path in adapter.up_projs:
            old = get_path(layer, path)
            rows = torch.cat([keep, keep + width]) if adapter.fused_gate_up else keep  # gate half, then up half
            new = _empty_linear(old, old.in_features, rows.numel())
            new.weight.copy_(old.weight[rows.to(old.weight.device)])
            if old.bias is not None:
                new.bias.copy_(old.bias[rows.to(old.bias.device)])
            set_path(layer, path, new)
        old = get_path(layer, adapter.down_proj)
        new = _empty_linear(old, keep.numel(), old.out_features)
        new.weight.copy_(old.weight[:, keep.to(old.weight.device)])
        if old.bias is not None:
            new.bias.copy_(old.bias)
        set_path(layer, adapter.down_proj, new)
    return int(keep.numel())


def _empty_linear_from(w: torch.Tensor, in_features: int, out_features: int) -> nn.Linear:
    """A bias-free linear with uninitialised weights in ``w``'s dtype and device."""
    new = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(torch.empty((out_features, in_features), dtype=w.dtype, device=w.device),
                              requires_grad=w.requires_grad)
    return new


def _empty_linear(like: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    w = like.weight
    new = nn.Linear(in_features, out_features, bias=like.bias is not None, device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(torch.empty((out_features, in_features), dtype=w.dtype, device=w.device),
                              requires_grad=w.requires_grad)
    if like.bias is not None:
        new.bias = nn.Parameter(torch.empty(out_features, dtype=w.dtype, device=w.device),
                                requires_grad=like.bias.requires_grad)
    return new


# -- structure -----------------------------------------------------------------------------------------------------
def structure_of(model: nn.Module, adapter: ArchAdapter) -> dict:
    """The structure dict of ``model``, read from its modules (the source of truth)."""
    layers = layer_list(model, adapter)
    out = {
        "num_layers": len(layers),
        "dropped_attention": [i for i, layer in enumerate(layers) if is_dropped(layer, adapter, "attention")],
        "dropped_mlp": [i for i, layer in enumerate(layers) if is_dropped(layer, adapter, "mlp")],
        "mlp_widths": [mlp_width(layer, adapter) for layer in layers],
    }
    maps = {str(i): branch.rank for i, layer in enumerate(layers)
            for branch in [get_path(layer, adapter.mlp[-1])] if isinstance(branch, MappedBranch)}
    if maps:  # absent when there are none: folders written before replacement maps existed keep their structure
        out["mlp_maps"] = maps
    return out


def is_compressed(structure: dict, full_width: int) -> bool:
    """True when ``structure`` differs from the uncompressed model (something dropped or narrowed)."""
    return bool(structure["dropped_attention"] or structure["dropped_mlp"] or structure.get("mlp_maps")
                or any(w is not None and w != full_width for w in structure["mlp_widths"]))


def check_structure(structure: dict, num_layers: int) -> dict:
    """Validate a structure dict read from disk against the base config's layer count; returns a clean copy.

    Raises:
        EffirError: a key is missing, has the wrong type or disagrees with the layer count.
    """
    def bad(why: str) -> EffirError:
        return EffirError(f"the model structure in effir.json is invalid ({why}); restore effir.json or re-run "
                          "the stage that wrote it")

    if not isinstance(structure, dict):
        raise bad("not a JSON object")
    missing = [k for k in ("num_layers", "dropped_attention", "dropped_mlp", "mlp_widths") if k not in structure]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    if structure["num_layers"] != num_layers:
        raise bad(f"num_layers {structure['num_layers']} but config.json has {num_layers} layers")
    out = {"num_layers": num_layers}
    for key in ("dropped_attention", "dropped_mlp"):
        vals = structure[key]
        if not isinstance(vals, list) or not all(isinstance(i, int) and 0 <= i < num_layers for i in vals):
            raise bad(f"{key} must be a list of layer indices in 0..{num_layers - 1}")
        out[key] = sorted(set(vals))
    widths = structure["mlp_widths"]
    if not isinstance(widths, list) or len(widths) != num_layers:
        raise bad(f"mlp_widths must list {num_layers} widths")
    for i, w in enumerate(widths):
        if (w is None) != (i in out["dropped_mlp"]) or (w is not None and (not isinstance(w, int) or w < 1)):
            raise bad(f"mlp_widths[{i}] = {w!r} (null exactly for dropped MLPs, else a positive int)")
    out["mlp_widths"] = list(widths)
    maps = structure.get("mlp_maps")
    if maps is not None:
        if not isinstance(maps, dict) or not all(
                isinstance(k, str) and k.isdigit() and int(k) in out["dropped_mlp"] and isinstance(r, int) and r >= 0
                for k, r in maps.items()):
            raise bad("mlp_maps must map dropped MLP layer indices to ranks >= 0")
        if maps:
            out["mlp_maps"] = {str(k): maps[str(k)] for k in sorted(map(int, maps))}
    return out


def apply_structure(model: nn.Module, adapter: ArchAdapter, structure: dict) -> None:
    """Turn a full-size skeleton into ``structure``: drop sub-layers and resize narrowed MLPs (weights empty)."""
    structure = check_structure(structure, len(layer_list(model, adapter)))
    for i, rank in structure.get("mlp_maps", {}).items():
        replace_mlp(model, adapter, int(i), rank)
    drop_sublayers(model, adapter, structure["dropped_attention"], structure["dropped_mlp"])
    layers = layer_list(model, adapter)
    for i, width in enumerate(structure["mlp_widths"]):
        if width is not None and width != mlp_width(layers[i], adapter):
            resize_mlp(model, adapter, i, width)


def dropped_prefixes(adapter: ArchAdapter, structure: dict) -> list[str]:
    """State-dict key prefixes (``"layers.3.mlp."``) that must be absent from a model with ``structure``."""
    out = []
    a, maps = adapter, structure.get("mlp_maps", {})
    for group, roles in (("attention", (a.attention, a.attn_in_norm, a.attn_out_norm)),
                         ("mlp", (*a.mlp, a.mlp_in_norm, a.mlp_out_norm))):
        for i in structure[f"dropped_{group}"]:
            if group == "mlp" and str(i) in maps:  # a map stands at the MLP's last module, with its input norm
                kept = {a.mlp[-1], a.mlp_out_norm if a.post_norm else None, a.mlp_in_norm if maps[str(i)] else None}
                roles = [r for r in roles if r not in kept]
            out += [f"{a.layers}.{i}.{role}." for role in roles if role]
    return sorted(set(out))


# -- counting ------------------------------------------------------------------------------------------------------
def count_parameters(model: nn.Module, adapter: ArchAdapter | None = None) -> dict[str, int]:
    """Parameter counts of a (headless) model: ``total`` and ``without_embeddings``.

    The LM head, if any, is never counted; embeddings are every ``nn.Embedding`` (token, position, token type).
    Tied parameters count once.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    emb_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    # parameters() yields shared tensors once; a head tied to the input embeddings counts as embeddings
    params = [p for p in model.parameters() if id(p) not in head_ids or id(p) in emb_ids]
    total = sum(p.numel() for p in params)
    emb = sum(p.numel() for p in params if id(p) in emb_ids)
    return {"total": total, "without_embeddings": total - emb}
