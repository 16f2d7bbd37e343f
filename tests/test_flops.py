"""Parameter and FLOP counts, checked against hand counts from the tiny config (conftest.TINY) for every architecture,
intact and after structural edits (dropped MLP / attention sub-layers, a narrowed MLP)."""

import pytest

from effir.arch import get_adapter, get_path, layer_list
from effir.flops import activation_bytes_estimate, count_parameters, flops_per_sequence, structure_summary
from effir.surgery import drop_sublayers, slice_mlp

# conftest.TINY: hidden 32, intermediate 64, 4 layers, 4 heads of 8, 2 KV heads, vocab 128, 256 positions
H, FF, L, NH, KV, HD, V, P = 32, 64, 4, 4, 2, 8, 128, 256
# parameters inside the attention module beyond the q/k/v/o weights, per architecture (read off the HF configs)
ATTN_EXTRA = {"llama": 0, "mistral": 0, "phi3": 0, "gemma2": 0,
              "qwen2": NH * HD + 2 * KV * HD,  # q/k/v biases
              "qwen3": 2 * HD, "gemma3_text": 2 * HD}  # q_norm, k_norm (one head_dim vector each)
NARROW = 40  # width given to layer 1's MLP


def edit(model):
    """Drop the MLPs of layers 0 and 2, narrow layer 1's MLP to NARROW, drop layer 3's attention (real surgery)."""
    adapter = get_adapter(model.config)
    drop_sublayers(model, adapter, attention=[3], mlp=[0, 2])
    slice_mlp(model, adapter, 1, list(range(NARROW)))
    return model


EDITED = {"mlp_widths": [0, NARROW, 0, FF], "attention": [1, 1, 1, 0]}
INTACT = {"mlp_widths": [FF] * L, "attention": [1] * L}


def hand_decoder(model_type, adapter, shape, T):
    """(total params, embedding params, FLOPs for one sequence of T tokens) for a decoder LLM of TINY size."""
    attn_w = H * NH * HD + 2 * H * KV * HD + NH * HD * H  # q, k, v, o weights
    attn_norms = 1 + (adapter.attn_out_norm is not None)  # Gemma also normalises the attention output
    mlp_norms = 1 + (adapter.mlp_out_norm is not None)
    params, flops = V * H + H, 0  # token embeddings + final norm
    for width, attn in zip(shape["mlp_widths"], shape["attention"], strict=True):
        params += attn * (attn_w + ATTN_EXTRA[model_type] + attn_norms * H)
        params += (3 * H * width + mlp_norms * H) if width else 0  # gate, up, down (no biases)
        flops += T * 2 * (attn * attn_w + 3 * H * width) + attn * 2 * 2 * T * T * NH * HD
    return params, V * H, flops


def hand_bert(shape, T):
    """Same for BERT: biases everywhere, post-norm LayerNorms inside the sub-layers, pooler once per sequence."""
    emb = (V + P + 2) * H  # word, position, token-type tables
    params = emb + 2 * H + (H * H + H)  # + embedding LayerNorm + pooler
    flops = 2 * H * H  # pooler: one token per sequence
    for width, attn in zip(shape["mlp_widths"], shape["attention"], strict=True):
        params += attn * (4 * (H * H + H) + 2 * H)
        params += (H * width + width + width * H + H + 2 * H) if width else 0
        flops += T * 2 * (attn * 4 * H * H + 2 * H * width) + attn * 2 * 2 * T * T * NH * (H // NH)
    return params, emb, flops


def hand(model, shape, T):
    adapter = get_adapter(model.config)
    if not adapter.is_decoder:
        return hand_bert(shape, T)
    return hand_decoder(model.config.model_type, adapter, shape, T)


@pytest.mark.parametrize("T", [1, 7, 32])
def test_counts_of_intact_models(tiny_model, T):
    total, emb, flops = hand(tiny_model, INTACT, T)
    assert count_parameters(tiny_model) == {"total": total, "without_embeddings": total - emb}
    assert count_parameters(tiny_model)["total"] == sum(p.numel() for p in tiny_model.parameters())
    assert flops_per_sequence(tiny_model, T)["total"] == flops


@pytest.mark.parametrize("T", [7, 32])
def test_counts_follow_dropped_and_narrowed_sublayers(tiny_model, T):
    edited = edit(tiny_model)
    total, emb, flops = hand(edited, EDITED, T)
    assert count_parameters(edited) == {"total": total, "without_embeddings": total - emb}
    assert flops_per_sequence(edited, T)["total"] == flops
    assert structure_summary(edited) == {"layers": 4, "attention": 3, "mlp": 2, "mlp_width": NARROW + FF}


@pytest.mark.parametrize("rank", [0, 5, H])
def test_a_replacement_map_counts_its_parameters_and_flops(tiny_model, rank):
    """A dropped MLP replaced by a rank-r map (effir drop --compensate) costs, beyond the plain drop, its bias, its
    map (H^2 at full rank, 2 H r below) and the norm it keeps, and 2 x its weights in FLOPs per token."""
    import copy

    from effir.surgery import replace_mlp

    adapter = get_adapter(tiny_model.config)
    kept = adapter.mlp_out_norm if adapter.post_norm else adapter.mlp_in_norm if rank else None
    norm = sum(p.numel() for p in get_path(layer_list(tiny_model, adapter)[2], kept).parameters()) if kept else 0
    plain = edit(copy.deepcopy(tiny_model))  # MLP 2 dropped
    drop_sublayers(tiny_model, adapter, attention=[3], mlp=[0])
    slice_mlp(tiny_model, adapter, 1, list(range(NARROW)))
    replace_mlp(tiny_model, adapter, 2, rank)  # MLP 2 replaced
    weights = H * H if rank == H else 2 * H * rank
    assert count_parameters(tiny_model)["total"] - count_parameters(plain)["total"] == H + weights + norm
    assert flops_per_sequence(tiny_model, 7)["total"] - flops_per_sequence(plain, 7)["total"] == 7 * 2 * weights


def test_flops_split_and_ratio(tiny_model):
    """Linear FLOPs grow with T, attention with T^2; a halved MLP stack predicts the ratio of the totals."""
    a, b = flops_per_sequence(tiny_model, 8), flops_per_sequence(tiny_model, 16)
    assert b["linear"] == 2 * a["linear"] and b["attention"] == 4 * a["attention"]
    assert a["total"] == a["linear"] + a["attention"] + a["outside_layers"]
    full = a["total"]
    edited = flops_per_sequence(edit(tiny_model), 8)["total"]
    assert full > edited > 0


def test_tied_weights_count_once(tiny_model):
    adapter = get_adapter(tiny_model.config)
    layers = layer_list(tiny_model, adapter)
    before = count_parameters(tiny_model)
    down0 = get_path(layers[0], adapter.down_proj)
    down1 = get_path(layers[1], adapter.down_proj)
    down1.weight = down0.weight  # share one tensor between two layers
    after = count_parameters(tiny_model)
    assert before["total"] - after["total"] == H * FF
    # FLOPs still count both layers: a shared weight is still multiplied twice
    assert flops_per_sequence(tiny_model, 5)["total"] == hand(tiny_model, INTACT, 5)[2]


def test_activation_estimate_follows_widths(tiny_model):
    """B * (T * (3 * hidden + widest gate/up output) + heads * T * T) elements; gate + up (or fused) = 2 x width."""
    B, T = 3, 5
    adapter = get_adapter(tiny_model.config)
    gate_and_up = 1 if adapter.post_norm else 2  # BERT has a single up projection
    assert activation_bytes_estimate(tiny_model, B, T, 4) == 4 * B * (T * (3 * H + gate_and_up * FF) + NH * T * T)
    drop_sublayers(tiny_model, adapter, attention=range(L), mlp=[0, 1, 2])
    slice_mlp(tiny_model, adapter, 3, list(range(NARROW)))
    assert activation_bytes_estimate(tiny_model, B, T, 2) == 2 * B * T * (3 * H + gate_and_up * NARROW)
