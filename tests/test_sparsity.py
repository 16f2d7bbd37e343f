"""N:M patterns, the projections they cover, and the zeros fine-tuning must keep (effir.sparsity)."""

import copy

import pytest
import torch

from effir.arch import get_adapter, layer_list
from effir.sparsity import (
    Pattern,
    check_divisible,
    follows,
    hold_zeros,
    layer_projections,
    nonzeros_per_group,
    parse_pattern,
    projections,
    restore_zeros,
)
from effir.surgery import drop_sublayers
from effir.utils import EffirError


@pytest.mark.parametrize("text, pattern", [("2:4", Pattern(2, 4)), (" 1:4 ", Pattern(1, 4)), ("4:8", Pattern(4, 8))])
def test_parse_pattern(text, pattern):
    assert parse_pattern(text) == pattern and str(pattern) == text.strip()


@pytest.mark.parametrize("text", ["4:2", "0:4", "4:4", "2", "2:four", "-1:4", "2:4:8", ""])
def test_parse_pattern_refuses_what_is_not_n_below_m(text):
    with pytest.raises(EffirError, match="is not N:M with 0 < N < M"):
        parse_pattern(text)


def test_projections_are_the_attention_and_mlp_linears_of_every_layer(tiny_model):
    adapter = get_adapter(tiny_model.config)
    found = projections(tiny_model, adapter)
    per_layer = len(layer_projections(layer_list(tiny_model, adapter)[0], adapter))
    assert len(found) == per_layer * len(layer_list(tiny_model, adapter))
    # the projections LoRA trains are exactly these: nothing else (embeddings, norms, heads) is pruned
    assert {n.rsplit(".", 1)[-1] for n in found} == {t.rsplit(".", 1)[-1] for t in adapter.lora_targets}
    assert all(module is tiny_model.get_submodule(name) for name, module in found.items())
    drop_sublayers(tiny_model, adapter, mlp=[1], attention=[2])
    assert len(projections(tiny_model, adapter)) < len(found)


def test_check_divisible_names_the_projection(tiny_llama_dir):
    import effir

    enc = effir.load(tiny_llama_dir, device="cpu")
    assert check_divisible(enc.model, enc.adapter, Pattern(2, 4)) == 28
    with pytest.raises(EffirError, match=r"layers\.0\..* takes 32 inputs, not a multiple of 5"):
        check_divisible(enc.model, enc.adapter, Pattern(2, 5))


def test_nonzeros_per_group_and_follows(_tiny_models):
    model = copy.deepcopy(_tiny_models["llama"])
    adapter = get_adapter(model.config)
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3], [1, 1, 1, 0, 0, 0, 0, 0]])
    assert nonzeros_per_group(w, 4).tolist() == [[2, 1], [3, 0]]
    assert follows(model, adapter, Pattern(2, 4)) is not None  # dense
    with torch.no_grad():
        for m in projections(model, adapter).values():
            m.weight.view(m.out_features, -1, 4)[..., :2] = 0
    assert follows(model, adapter, Pattern(2, 4)) is None
    assert follows(model, adapter, Pattern(1, 4)) is not None


def test_restore_and_hold_zeros(_tiny_models):
    model = copy.deepcopy(_tiny_models["llama"])
    adapter = get_adapter(model.config)
    with torch.no_grad():
        for m in projections(model, adapter).values():
            m.weight.view(m.out_features, -1, 4)[..., 1::2] = 0
    masks = {n: (m.weight != 0).cpu() for n, m in projections(model, adapter).items()}
    hold_zeros(model, adapter, masks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):  # full training: the held weights get no gradient, so they stay exactly zero
        model(input_ids=torch.tensor([[5, 6, 7, 8]])).last_hidden_state.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert follows(model, adapter, Pattern(2, 4)) is None
    assert restore_zeros(model, adapter, masks) == 0
    with torch.no_grad():  # a merged LoRA delta lands everywhere; restoring puts the zeros back
        for m in projections(model, adapter).values():
            m.weight.add_(0.01)
    assert follows(model, adapter, Pattern(2, 4)) is not None
    assert restore_zeros(model, adapter, masks) > 0
    assert all(torch.equal(m.weight != 0, masks[n]) for n, m in projections(model, adapter).items())
    assert restore_zeros(model, adapter, None) == 0
