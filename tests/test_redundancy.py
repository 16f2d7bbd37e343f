"""Importance scores against a by-hand reference on tiny models of every architecture in the table."""

import pytest
import torch
import torch.nn.functional as F

from effir.arch import get_adapter, get_path, layer_list
from effir.redundancy import (
    MASSIVE_GROWTH,
    _hook_points,
    combine,
    drop_order,
    massive_sources,
    neuron_importance,
    rank_correlation,
    ranks,
    sublayer_importance,
)


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


def test_massive_activation_source_is_flagged(tiny_model):
    """A sub-layer that blows up one token's largest activation (an attention sink) is flagged, whatever its mean
    score; growth is measured on the stream each group's score uses, so this holds for every family."""
    adapter = get_adapter(tiny_model.config)
    ids = torch.randint(3, 128, (2, 9))
    plain = sublayer_importance(tiny_model, adapter, [_batch(ids)])

    def plant(module, args, output):  # token 0 of every sequence gets a 10^4 times larger output
        out = output[0] if isinstance(output, tuple) else output
        out = out.clone()
        out[:, 0] *= 1e4
        return (out, *output[1:]) if isinstance(output, tuple) else out

    out_mod = _hook_points(layer_list(tiny_model, adapter)[2], adapter, "mlp")[1]
    handle = out_mod.register_forward_hook(plant)
    try:
        planted = sublayer_importance(tiny_model, adapter, [_batch(ids)])
    finally:
        handle.remove()
    growth = planted["peak_growth"]
    assert growth["mlp"][2] >= MASSIVE_GROWTH and growth["mlp"][2] >= 10 * plain["peak_growth"]["mlp"][2]
    assert growth["block"][2] >= MASSIVE_GROWTH  # the block holding it grows too
    for g in ("attention", "mlp"):  # nothing before the planted sub-layer changes
        assert growth[g][:2] == plain["peak_growth"][g][:2]
    assert 2 in massive_sources(growth)["mlp"] and 2 not in massive_sources(plain["peak_growth"])["mlp"]
    # the mean score barely notices one token in 9 per sequence: 1 - cos is at most 2 per token
    assert planted["mlp"][2] <= plain["mlp"][2] + 2 * 2 / 18


def test_super_neuron_ratio_matches_gates_and_flags_the_mlp(tiny_model):
    """The per-MLP ratio is the largest neuron contribution over the median, as effir.probes.super_neurons counts it."""
    from effir.probes import super_neurons

    adapter = get_adapter(tiny_model.config)
    ids = torch.randint(3, 128, (2, 9))
    layers = layer_list(tiny_model, adapter)
    with torch.no_grad():
        get_path(layers[1], adapter.down_proj).weight[:, 7] *= 1e4
    got = sublayer_importance(tiny_model, adapter, [_batch(ids)])
    ratio = got["super_neuron_ratio"]
    assert ratio[1] >= 1e3 and all(r < 100 for k, r in enumerate(ratio) if k != 1)
    assert 1 in massive_sources(got["peak_growth"], ratio)["mlp"]
    found = super_neurons(tiny_model, adapter, list(range(len(layers))), [_batch(ids)], factor=ratio[1] * 0.999)
    assert torch.nonzero(found[1]).flatten().tolist() == [7]  # the same neuron, at the same ratio
    assert not any(m.any() for k, m in enumerate(found) if k != 1)


@torch.no_grad()
def test_neuron_importance_is_the_relative_change_of_removing_one_neuron(tiny_model):
    """Score of neuron j = mean over real tokens of ||what removing j alone changes in the MLP output||^2 /
    ||stream entering the MLP||^2, measured here by actually zeroing j; pads excluded (every family)."""
    from effir.gates import MlpGates

    adapter = get_adapter(tiny_model.config)
    layers = layer_list(tiny_model, adapter)
    ids = torch.randint(3, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding on the second sequence
    batch = _batch(ids, mask)
    got = neuron_importance(tiny_model, adapter, [1, 3], [batch])
    assert [g.shape[0] for g in got] == [get_path(layers[i], adapter.down_proj).in_features for i in (1, 3)]

    def run(zero: int | None):
        seen = {}
        in_mod = _hook_points(layers[3], adapter, "mlp")[0]
        down = get_path(layers[3], adapter.down_proj)
        gates = MlpGates(tiny_model, adapter, [3])
        if zero is not None:
            gates.z[0][zero] = 0.0
        take_x = lambda m, a, k: seen.__setitem__("x", a[0] if a else k["hidden_states"])  # noqa: E731
        handles = [in_mod.register_forward_pre_hook(take_x, with_kwargs=True),
                   down.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))]
        tiny_model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   use_cache=False)
        for h in handles:
            h.remove()
        gates.remove()
        return seen

    full = run(None)
    real = mask.bool()
    for j in (0, 5, 17):
        cut = run(j)
        change = (full["out"] - cut["out"]).double().pow(2).sum(-1) / full["x"].double().pow(2).sum(-1)
        torch.testing.assert_close(got[1][j].double(), change[real].mean(), rtol=1e-4, atol=1e-12)
    assert (got[0] > 0).all() and (got[1] > 0).all()


def test_neuron_importance_rejects_dropped_mlp_and_empty_batches(tiny_llama_dir):
    from effir.checkpoint import load
    from effir.surgery import drop_sublayers
    from effir.utils import EffirError

    enc = load(tiny_llama_dir, device="cpu", dtype="fp32")
    ids = torch.randint(3, 128, (1, 5))
    with pytest.raises(EffirError, match="no .*tokens"):
        neuron_importance(enc.model, enc.adapter, [0], [_batch(ids, torch.zeros_like(ids))])
    drop_sublayers(enc.model, enc.adapter, mlp=[2])
    with pytest.raises(EffirError, match="MLP 2 is dropped"):
        neuron_importance(enc.model, enc.adapter, [2], [_batch(ids)])


def test_massive_sources_and_combined_peaks():
    growth = {"attention": [3.0, None, 150.0], "mlp": [20.0, 853.0, 99.9], "block": [1.0, 900.0, 2.0]}
    # a block counts when it or one of its sub-layers does
    assert massive_sources(growth) == {"attention": [2], "mlp": [1], "block": [1, 2]}
    assert massive_sources(growth, threshold=10) == {"attention": [2], "mlp": [0, 1, 2], "block": [0, 1, 2]}
    assert massive_sources(growth, [120.0, None, 5.0])["mlp"] == [0, 1]  # a super neuron in MLP 0
    r = {"attention": [0.1], "mlp": [0.2], "block": [0.3], "tokens": 1}
    both = combine([{**r, "peak_growth": {"attention": [2.0], "mlp": [500.0], "block": [None]},
                     "super_neuron_ratio": [30.0]},
                    {**r, "peak_growth": {"attention": [7.0], "mlp": [3.0], "block": [None]},
                     "super_neuron_ratio": [40.0]}])
    assert both["peak_growth"] == {"attention": [7.0], "mlp": [500.0], "block": [None]}
    assert both["super_neuron_ratio"] == [40.0]


def test_dropped_sublayers_are_null(tiny_llama_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_llama_dir)
    ids = torch.randint(3, 128, (1, 6))
    got = sublayer_importance(model, get_adapter(model.config), [_batch(ids)], dropped={"mlp": [1], "attention": [3]})
    assert got["mlp"][1] is None and got["attention"][3] is None
    assert got["peak_growth"]["mlp"][1] is None and got["peak_growth"]["attention"][3] is None
    assert got["super_neuron_ratio"][1] is None and got["super_neuron_ratio"][0] > 1
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
