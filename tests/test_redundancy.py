"""Importance scores against a by-hand reference on tiny models of every architecture in the table."""

import pytest
import torch
import torch.nn.functional as F

from effir.arch import get_adapter
from effir.redundancy import combine, drop_order, rank_correlation, ranks, sublayer_importance


def _record_layer_calls(model, layers):
    """Run nothing; return hooks that record each layer's (args, kwargs) on the next forward."""
    calls, handles = {}, []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: calls.__setitem__(i, (a, k)), with_kwargs=True))
    return calls, handles


def _manual_layer(layer, family, x, args, kwargs):
    """One layer computed sub-module by sub-module: returns (x_mid, x_out) = stream after attention, after MLP."""
    if family == "bert":
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        mid = layer.attention(x, mask)[0]  # post-norm: LN(x + attn) is the stream after attention
        return mid, layer.output(layer.intermediate(mid), mid)
    kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    attn = layer.self_attn(hidden_states=layer.input_layernorm(x), **kw)[0]
    if family == "gemma":
        attn = layer.post_attention_layernorm(attn)
    mid = x + attn
    mlp_norm = layer.pre_feedforward_layernorm if family == "gemma" else layer.post_attention_layernorm
    mlp = layer.mlp(mlp_norm(mid))
    if family == "gemma":
        mlp = layer.post_feedforward_layernorm(mlp)
    return mid, mid + mlp


def _score(a, b):
    return (1 - F.cosine_similarity(a.double(), b.double(), dim=-1)).mean().item()


@torch.no_grad()
def _reference(model, ids):
    """Scores by hand from the per-layer inputs (output_hidden_states) and a manual pass through each layer."""
    adapter = get_adapter(model.config)
    layers = model.encoder.layer if adapter.family == "bert" else model.layers
    calls, handles = _record_layer_calls(model, layers)
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    for h in handles:
        h.remove()
    hs = out.hidden_states
    ref = {"attention": [], "mlp": [], "block": []}
    for i, layer in enumerate(layers):
        x = hs[i]
        mid, x_out = _manual_layer(layer, adapter.family, x, *calls[i])
        if i < len(layers) - 1 or adapter.family == "bert":  # the manual pass reproduces the model
            torch.testing.assert_close(x_out, hs[i + 1], atol=1e-5, rtol=1e-5)
        ref["attention"].append(_score(x, mid))
        ref["mlp"].append(_score(mid, x_out))
        ref["block"].append(_score(x, x_out))
    return ref


def _batch(ids, mask=None):
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask}


def test_scores_equal_hand_reference(tiny_model):
    adapter = get_adapter(tiny_model.config)
    ids = torch.randint(3, 128, (2, 9))
    ref = _reference(tiny_model, ids)
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_model.modules())
    got = sublayer_importance(tiny_model, adapter, [_batch(ids[:1]), _batch(ids[1:])])
    assert got["tokens"] == 18
    for g in ("attention", "mlp", "block"):
        assert len(got[g]) == 4
        torch.testing.assert_close(torch.tensor(got[g]), torch.tensor(ref[g]), atol=2e-6, rtol=1e-4)
    assert all(s > 0 for s in got["attention"] + got["mlp"])  # random weights change the stream
    # the block score is not a sum/duplicate of the parts: it really compares the layer's input and output
    assert got["block"] != got["mlp"] and got["block"] != got["attention"]
    # hooks are removed afterwards
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_model.modules()) == n_hooks


def test_pad_tokens_excluded(tiny_model):
    """Same scores for the same real tokens under no, more, or left padding; mixed lengths weigh per token."""
    adapter = get_adapter(tiny_model.config)
    a, b = torch.randint(3, 128, (7,)), torch.randint(3, 128, (4,))
    alone = combine([sublayer_importance(tiny_model, adapter, [_batch(s[None])]) for s in (a, b)])

    def padded(width, left=False):
        ids = torch.zeros((2, width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate((a, b)):
            span = slice(width - len(s), width) if left else slice(0, len(s))
            ids[r, span], mask[r, span] = s, 1
        return sublayer_importance(tiny_model, adapter, [_batch(ids, mask)])

    for got in (padded(7), padded(12), padded(12, left=True)):
        assert got["tokens"] == 11
        for g in ("attention", "mlp", "block"):
            torch.testing.assert_close(torch.tensor(got[g]), torch.tensor(alone[g]), atol=1e-5, rtol=1e-4)


def test_dropped_sublayers_are_null(tiny_llama_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_llama_dir)
    ids = torch.randint(3, 128, (1, 6))
    got = sublayer_importance(model, get_adapter(model.config), [_batch(ids)], dropped={"mlp": [1], "attention": [3]})
    assert got["mlp"][1] is None and got["attention"][3] is None
    assert None not in got["block"] and got["mlp"][0] is not None
    assert 1 not in drop_order(got["mlp"]) and len(drop_order(got["mlp"])) == 3


def test_empty_batches_rejected(tiny_llama_dir):
    from transformers import AutoModel

    from effir.utils import EffirError

    model = AutoModel.from_pretrained(tiny_llama_dir)
    with pytest.raises(EffirError, match="no"):
        sublayer_importance(model, get_adapter(model.config), [])


def test_order_ranks_and_correlation():
    scores = [0.3, None, 0.1, 0.2, 0.1]
    assert drop_order(scores) == [2, 4, 3, 0]
    assert ranks(scores) == [4, None, 1, 3, 2]
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert rank_correlation([1, None], [1, 2]) is None
    both = combine([{"attention": [1.0, None], "mlp": [0.0, 1.0], "block": [1.0, 1.0], "tokens": 1},
                    {"attention": [4.0, 2.0], "mlp": [3.0, 1.0], "block": [1.0, 1.0], "tokens": 3}])
    assert both == {"attention": [3.25, None], "mlp": [2.25, 1.0], "block": [1.0, 1.0], "tokens": 4}
