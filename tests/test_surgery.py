"""Structural surgery on tiny random models of every architecture: exact equivalence with hand-written references."""

import pytest
import torch

from effir.arch import get_adapter, get_path, layer_list
from effir.surgery import (
    apply_structure,
    count_parameters,
    drop_sublayers,
    dropped_prefixes,
    resize_mlp,
    slice_mlp,
    structure_of,
)
from effir.utils import EffirError


def _inputs(vocab=128):
    ids = torch.randint(4, vocab, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _hidden(model, batch):
    return model(**batch).last_hidden_state


@torch.no_grad()
def _hidden_skipping(model, adapter, attention=(), mlp=()):
    """Reference: the *unmodified* model, with forward hooks making the chosen branches add nothing.

    Pre-norm layers compute ``x + out(F(in_norm(x)))``; skipping the branch means whatever is added to the residual
    is zero, so the hook zeroes the last module of the branch (the output norm when there is one, else the module).
    Post-norm BERT layers compute ``LN(x + F(x))`` inside the sub-layer's module; skipping it means that module
    hands its residual input on unchanged: attention(x, ...) -> x, and output(h, a) -> a, so the layer returns the
    attention output (MLP skipped) or the MLP reads the layer input (attention skipped).
    """
    layers = layer_list(model, adapter)
    handles = []

    def zero(_m, _args, out):
        if isinstance(out, tuple):
            return (torch.zeros_like(out[0]), *out[1:])
        return torch.zeros_like(out)

    def passthrough(arg):
        def hook(_m, args, out):
            return (args[arg], *out[1:]) if isinstance(out, tuple) else args[arg]
        return hook

    for i in attention:
        if adapter.post_norm:
            handles.append(get_path(layers[i], adapter.attention).register_forward_hook(passthrough(0)))
        else:
            last = adapter.attn_out_norm or adapter.attention
            handles.append(get_path(layers[i], last).register_forward_hook(zero))
    for i in mlp:
        if adapter.post_norm:
            handles.append(get_path(layers[i], adapter.mlp[-1]).register_forward_hook(passthrough(1)))
        else:
            last = adapter.mlp_out_norm or adapter.mlp[-1]
            handles.append(get_path(layers[i], last).register_forward_hook(zero))
    return handles


def test_dropping_nothing_is_the_identity(tiny_model):
    adapter = get_adapter(tiny_model.config)
    batch = _inputs()
    before, state = _hidden(tiny_model, batch), {k: v.clone() for k, v in tiny_model.state_dict().items()}
    drop_sublayers(tiny_model, adapter, attention=[], mlp=[])
    assert torch.equal(_hidden(tiny_model, batch), before)
    after = tiny_model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("attention, mlp", [([], [1]), ([], [0, 3]), ([2], []), ([0, 3], []), ([1], [1, 2]),
                                            ([0, 1, 2, 3], [0, 1, 2, 3])])
def test_drop_equals_forward_skipping_exactly_that_branch(tiny_model, attention, mlp):
    adapter = get_adapter(tiny_model.config)
    batch = _inputs()
    handles = _hidden_skipping(tiny_model, adapter, attention, mlp)
    try:
        expected = _hidden(tiny_model, batch)
    finally:
        for h in handles:
            h.remove()
    full = _hidden(tiny_model, batch)
    drop_sublayers(tiny_model, adapter, attention=attention, mlp=mlp)
    got = _hidden(tiny_model, batch)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, full)  # the drop really changed something
    assert structure_of(tiny_model, adapter)["dropped_attention"] == attention
    assert structure_of(tiny_model, adapter)["dropped_mlp"] == mlp


def test_dropping_everything_by_hand(_tiny_models):
    """With every sub-layer gone, a decoder returns final_norm(embed(ids)) and BERT returns its embeddings."""
    batch = _inputs()
    llama = _tiny_models["llama"].__class__(_tiny_models["llama"].config)
    llama.load_state_dict(_tiny_models["llama"].state_dict())
    drop_sublayers(llama, get_adapter(llama.config), range(4), range(4))
    with torch.no_grad():
        torch.testing.assert_close(_hidden(llama, batch), llama.norm(llama.embed_tokens(batch["input_ids"])))
    bert = _tiny_models["bert"].__class__(_tiny_models["bert"].config).eval()
    bert.load_state_dict(_tiny_models["bert"].state_dict())
    drop_sublayers(bert, get_adapter(bert.config), range(4), range(4))
    with torch.no_grad():
        torch.testing.assert_close(_hidden(bert, batch), bert.embeddings(input_ids=batch["input_ids"]))


def test_dropped_weights_leave_the_state_dict(tiny_model):
    adapter = get_adapter(tiny_model.config)
    before = set(tiny_model.state_dict())
    drop_sublayers(tiny_model, adapter, attention=[0], mlp=[2, 3])
    after = set(tiny_model.state_dict())
    prefixes = dropped_prefixes(adapter, structure_of(tiny_model, adapter))
    gone = before - after
    assert gone == {k for k in before if k.startswith(tuple(prefixes))}
    assert after == before - gone and len(gone) > 0
    assert not any(k.startswith(tuple(prefixes)) for k in after)
    # stand-ins hold no parameters or buffers
    layer = layer_list(tiny_model, adapter)[2]
    assert sum(p.numel() for p in get_path(layer, adapter.mlp[-1]).parameters()) == 0


def test_drop_composes_and_is_idempotent(tiny_model):
    adapter = get_adapter(tiny_model.config)
    batch = _inputs()
    other = type(tiny_model)(tiny_model.config).eval()
    other.load_state_dict(tiny_model.state_dict())
    drop_sublayers(tiny_model, adapter, mlp=[1])
    drop_sublayers(tiny_model, adapter, mlp=[1, 3], attention=[2])
    drop_sublayers(other, adapter, mlp=[3, 1], attention=[2])
    torch.testing.assert_close(_hidden(tiny_model, batch), _hidden(other, batch), atol=0, rtol=0)


def test_bad_indices(tiny_model):
    adapter = get_adapter(tiny_model.config)
    with pytest.raises(EffirError, match="out of range: the model has 4 layers"):
        drop_sublayers(tiny_model, adapter, mlp=[4])
    with pytest.raises(EffirError, match="out of range"):
        drop_sublayers(tiny_model, adapter, attention=[-1])


def _hand_count(cfg, dropped_attention=(), dropped_mlp=(), widths=None):
    """Parameter count from the config alone, per family (biases, extra norms and fused projections by hand)."""
    mt, H, L, V = cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    widths = widths or [cfg.intermediate_size] * L
    if mt == "bert":
        emb = V * H + cfg.max_position_embeddings * H + cfg.type_vocab_size * H
        other = 2 * H + H * H + H  # embedding LayerNorm + pooler
        attn = 4 * (H * H + H) + 2 * H  # q, k, v, o with biases + LayerNorm
        mlp = [H * w + w + w * H + H + 2 * H for w in widths]  # up + down with biases + LayerNorm
    else:
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        emb = V * H
        other = H  # final norm
        attn = H * q + 2 * H * kv + q * H + H  # q, k, v, o + input norm
        attn += {"qwen2": q + 2 * kv, "qwen3": 2 * cfg.head_dim, "gemma2": H,
                 "gemma3_text": H + 2 * cfg.head_dim}.get(mt, 0)  # qkv biases / q,k norms / attention out-norm
        mlp = [3 * H * w + H + (H if mt.startswith("gemma") else 0) for w in widths]  # gate+up+down, in(+out) norm
    body = sum(attn for i in range(L) if i not in dropped_attention)
    body += sum(mlp[i] for i in range(L) if i not in dropped_mlp)
    return {"total": emb + other + body, "without_embeddings": other + body}


def test_parameter_counts_match_a_hand_count(tiny_model):
    adapter = get_adapter(tiny_model.config)
    cfg = tiny_model.config
    assert count_parameters(tiny_model, adapter) == _hand_count(cfg)
    drop_sublayers(tiny_model, adapter, attention=[1], mlp=[0, 2])
    assert count_parameters(tiny_model, adapter) == _hand_count(cfg, [1], [0, 2])
    slice_mlp(tiny_model, adapter, 3, range(0, 64, 2))
    assert count_parameters(tiny_model, adapter) == _hand_count(cfg, [1], [0, 2], widths=[64, 64, 64, 32])


def test_slice_mlp_equals_zeroing_the_removed_neurons(tiny_model):
    """Slicing neurons = the full model with those neurons' contribution removed (hook on the down projection)."""
    adapter = get_adapter(tiny_model.config)
    batch = _inputs()
    keep = torch.tensor([0, 3, 5, 17, 40, 63])
    removed = torch.ones(64, dtype=torch.bool)
    removed[keep] = False
    down = get_path(layer_list(tiny_model, adapter)[1], adapter.down_proj)
    handle = down.register_forward_pre_hook(lambda _m, args: (args[0].masked_fill(removed, 0.0),))
    expected = _hidden(tiny_model, batch)
    handle.remove()
    assert slice_mlp(tiny_model, adapter, 1, keep) == 6
    torch.testing.assert_close(_hidden(tiny_model, batch), expected, atol=1e-5, rtol=1e-5)
    layer = layer_list(tiny_model, adapter)[1]
    rows = 12 if adapter.fused_gate_up else 6  # a fused gate/up projection keeps both halves
    assert all(get_path(layer, p).weight.shape[0] == rows for p in adapter.up_projs)
    assert structure_of(tiny_model, adapter)["mlp_widths"] == [64, 6, 64, 64]


def test_apply_structure_rebuilds_shapes(tiny_model, _tiny_models):
    adapter = get_adapter(tiny_model.config)
    drop_sublayers(tiny_model, adapter, attention=[3], mlp=[0])
    slice_mlp(tiny_model, adapter, 2, range(10))
    structure = structure_of(tiny_model, adapter)
    assert structure == {"num_layers": 4, "dropped_attention": [3], "dropped_mlp": [0],
                         "mlp_widths": [None, 64, 10, 64]}
    skeleton = type(tiny_model)(tiny_model.config)
    apply_structure(skeleton, adapter, structure)
    shapes = {k: v.shape for k, v in tiny_model.state_dict().items()}
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == shapes
    resize_mlp(skeleton, adapter, 1, 7)
    assert structure_of(skeleton, adapter)["mlp_widths"] == [None, 7, 10, 64]
    with pytest.raises(EffirError, match="dropped"):
        resize_mlp(skeleton, adapter, 0, 8)


@pytest.mark.parametrize("bad, match", [
    ({"num_layers": 5}, "num_layers 5"),
    ({"dropped_mlp": [9]}, "dropped_mlp"),
    ({"mlp_widths": [64, 64]}, "mlp_widths must list 4"),
    ({"dropped_mlp": [1]}, r"mlp_widths\[1\]"),
])
def test_apply_structure_rejects_bad_structures(tiny_model, bad, match):
    good = {"num_layers": 4, "dropped_attention": [], "dropped_mlp": [], "mlp_widths": [64] * 4}
    with pytest.raises(EffirError, match=match):
        apply_structure(tiny_model, get_adapter(tiny_model.config), {**good, **bad})


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_counts_never_include_an_lm_head(tie):
    from conftest import tiny_config
    from transformers import AutoModel, AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = tie
    headless = count_parameters(AutoModel.from_config(cfg))
    assert count_parameters(AutoModelForCausalLM.from_config(cfg)) == headless == _hand_count(cfg)
