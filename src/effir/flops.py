"""Parameter and forward-FLOP counts read off the *instantiated* modules, so structural edits show up by themselves.

Nothing here reads ``effir.json`` or the config's layer widths: a dropped sub-layer (replaced by a parameter-free
module) simply has no ``nn.Linear`` left, and a sliced MLP has smaller ``nn.Linear`` modules. What is counted:

- every ``nn.Linear`` inside the layer stack: ``2 * in_features * out_features`` FLOPs per token (one multiply and
  one add per weight; biases ignored);
- attention matmuls, for each layer whose attention sub-layer is not dropped (:func:`effir.surgery.is_dropped`):
  ``2 * 2 * T * T * heads * head_dim`` per sequence of ``T`` tokens (``Q K^T`` and ``softmax(.) V``). The full
  ``T x T`` square is counted, no causal halving (eager and most SDPA kernels compute it whole);
  ``heads`` and ``head_dim`` come from the config (attention heads are never sliced);
- ``nn.Linear`` modules *outside* the layer stack run once per sequence (BERT's pooler on the first token; the
  decoder LLMs of the table have none);
- norms, activations, softmax, residual adds, rotary embeddings and the embedding lookup are O(T * hidden) and
  are left out as negligible next to the matmuls (< 1 % for the supported models).

Parameters come from :func:`effir.surgery.count_parameters` (re-exported here): unique tensors (tied weights once),
never an LM head; ``without_embeddings`` also leaves out every ``nn.Embedding`` (token, position, token-type tables).
"""

from __future__ import annotations

from torch import nn

from .arch import ArchAdapter, get_adapter, get_path, layer_list
from .surgery import count_parameters, is_dropped, mlp_width  # count_parameters is re-exported here

__all__ = ["activation_bytes_estimate", "attention_shape", "count_parameters", "flops_per_sequence",
           "structure_summary"]


def flops_per_sequence(model: nn.Module, seq_len: int, adapter: ArchAdapter | None = None) -> dict[str, int]:
    """Forward FLOPs for one sequence of ``seq_len`` tokens, split by source (see the module docstring).

    Returns:
        ``{"linear", "attention", "outside_layers", "total"}`` in FLOPs (multiply-adds count 2).
    """
    adapter = adapter or get_adapter(model.config)
    layers = layer_list(model, adapter)
    linear_per_token = 0
    attention = 0
    in_layers: set[int] = set()
    heads, head_dim = attention_shape(model.config)
    for layer in layers:
        for m in layer.modules():
            in_layers.add(id(m))
            if isinstance(m, nn.Linear):
                linear_per_token += 2 * m.in_features * m.out_features
        if not is_dropped(layer, adapter, "attention"):
            attention += 2 * 2 * seq_len * seq_len * heads * head_dim
    outside = sum(2 * m.in_features * m.out_features for m in model.modules()
                  if isinstance(m, nn.Linear) and id(m) not in in_layers)
    linear = linear_per_token * seq_len
    return {"linear": linear, "attention": attention, "outside_layers": outside, "total": linear + attention + outside}


def attention_shape(config) -> tuple[int, int]:
    """``(query heads, head_dim)`` from the config; ``head_dim`` defaults to ``hidden_size // heads``."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, head_dim


def structure_summary(model: nn.Module, adapter: ArchAdapter | None = None) -> dict[str, int]:
    """How many layers still have attention / an MLP, and the summed MLP width of the kept MLPs."""
    adapter = adapter or get_adapter(model.config)
    layers = list(layer_list(model, adapter))
    width = 0
    for layer in layers:
        width += mlp_width(layer, adapter) or 0
    return {"layers": len(layers), "attention": sum(not is_dropped(x, adapter, "attention") for x in layers),
            "mlp": sum(not is_dropped(x, adapter, "mlp") for x in layers), "mlp_width": width}


def activation_bytes_estimate(model: nn.Module, batch_size: int, seq_len: int, element_size: int,
                              adapter: ArchAdapter | None = None) -> int:
    """Rough peak of live activations in one inference forward pass (no autograd), in bytes.

    ``element_size * B * (T * (3 * hidden + widest gate/up output) + heads * T * T)``: the residual stream, a normed
    copy and a sub-layer output, the widest MLP intermediate (gate and up outputs together), and one layer's
    attention scores when any attention is left. An estimate for devices without an allocator counter (CPU).
    """
    adapter = adapter or get_adapter(model.config)
    up = 0
    for layer in layer_list(model, adapter):
        up = max(up, sum(getattr(get_path(layer, n), "out_features", 0) for n in adapter.up_projs))
    heads = attention_shape(model.config)[0] if structure_summary(model, adapter)["attention"] else 0
    per_seq = seq_len * (3 * model.config.hidden_size + up) + heads * seq_len * seq_len
    return batch_size * per_seq * element_size
