import pytest
import torch

from effir.arch import get_adapter, get_path, layer_list
from effir.gates import (
    MlpGates,
    SettledRanking,
    TargetSparsityAdam,
    closed_fraction,
    global_keep_masks,
    l0_penalty,
    prior_offsets,
    uniform_magnitude_masks,
)
from effir.probes import super_neurons
from effir.surgery import slice_mlp
from effir.utils import EffirError

IDS = torch.tensor([[5, 9, 12, 30, 7, 2], [11, 40, 8, 2, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _out(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).last_hidden_state * MASK.unsqueeze(-1)


@pytest.mark.parametrize("straight_through", [False, True])
def test_gates_at_one_reproduce_the_base_model_exactly(tiny_model, straight_through):
    adapter = get_adapter(tiny_model.config)
    base = _out(tiny_model)
    gates = MlpGates(tiny_model, adapter, layers=[0, 1, 2, 3], straight_through=straight_through)
    assert torch.equal(_out(tiny_model), base)
    gates.remove()
    assert torch.equal(_out(tiny_model), base)


def test_gates_really_gate(tiny_model):
    adapter = get_adapter(tiny_model.config)
    base = _out(tiny_model)
    gates = MlpGates(tiny_model, adapter, layers=[1])
    with torch.no_grad():
        gates.z[0].fill_(-1.0)  # ReLU(-1) = 0 closes every neuron of MLP 1
    closed = _out(tiny_model)
    assert not torch.allclose(closed, base)
    # closing all neurons leaves only the down projection's bias (BERT), i.e. the MLP output is constant
    down = get_path(layer_list(tiny_model, adapter)[1], adapter.down_proj)
    seen = []
    h = down.register_forward_hook(lambda m, a, o: seen.append(o))
    _out(tiny_model)
    h.remove()
    bias = down.bias if down.bias is not None else torch.zeros(down.out_features)
    torch.testing.assert_close(seen[0], bias.expand_as(seen[0]))


def test_sliced_model_equals_gated_model_under_the_same_hard_mask(tiny_model):
    adapter = get_adapter(tiny_model.config)
    width = tiny_model.config.intermediate_size
    layers = [0, 2, 3]
    g = torch.Generator().manual_seed(3)
    masks = [torch.rand(width, generator=g) > 0.4 for _ in layers]
    gates = MlpGates(tiny_model, adapter, layers)
    gates.set_hard_masks(masks)
    gated = _out(tiny_model)
    gates.remove()
    widths = [slice_mlp(tiny_model, adapter, i, torch.nonzero(m).flatten()) for i, m in zip(layers, masks, strict=True)]
    assert widths == [int(m.sum()) for m in masks]
    torch.testing.assert_close(_out(tiny_model), gated, atol=1e-5, rtol=1e-5)
    blocks = layer_list(tiny_model, adapter)
    for i, w in zip(layers, widths, strict=True):
        assert get_path(blocks[i], adapter.down_proj).in_features == w
        rows = sum(get_path(blocks[i], p).out_features for p in adapter.up_projs)
        assert rows == w * (2 if adapter.fused_gate_up or len(adapter.up_projs) == 2 else 1)


def test_global_ranking_removes_the_requested_fraction_and_prefers_deep_low_scores():
    scores = [torch.linspace(1.0, 2.0, 100), torch.linspace(0.0, 1.0, 100)]  # layer 1 is uniformly weaker
    masks = global_keep_masks(scores, ratio=0.3)
    assert sum(int(m.sum()) for m in masks) == 140
    assert int(masks[0].sum()) == 100 and int(masks[1].sum()) == 40
    assert masks[1][-40:].all() and not masks[1][:60].any()  # the strongest neurons of layer 1 survive


def test_widths_are_multiples_and_fraction_holds_up_to_rounding():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(96, generator=g) * (i + 1) for i in range(4)]
    masks = global_keep_masks(scores, ratio=0.3, multiple=16)
    kept = [int(m.sum()) for m in masks]
    assert all(k % 16 == 0 and k > 0 for k in kept)
    assert abs(sum(kept) - 0.7 * 384) <= 8 * len(scores)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval_is_an_error(ratio):
    with pytest.raises(EffirError, match=r"ratio must be in \(0, 1\)"):
        global_keep_masks([torch.ones(8)], ratio=ratio)


def test_ratio_that_empties_a_layer_is_an_error():
    scores = [torch.full((64,), 5.0), torch.full((8,), 0.0)]
    with pytest.raises(EffirError, match="would empty MLP 1"):
        global_keep_masks(scores, ratio=0.12)  # drops 9 of 72: all 8 of MLP 1


def test_l0_penalty_by_hand():
    z = [torch.tensor([0.0, 1.0]), torch.tensor([-2.0])]
    expected = 0.5 + torch.sigmoid(torch.tensor(5.0)) + torch.sigmoid(torch.tensor(10.0))
    torch.testing.assert_close(l0_penalty(z, beta=5.0), expected)


def test_uniform_magnitude_baseline_cuts_every_layer_equally(tiny_model):
    adapter = get_adapter(tiny_model.config)
    masks = uniform_magnitude_masks(tiny_model, adapter, [0, 1, 2, 3], ratio=0.25, multiple=8)
    assert [int(m.sum()) for m in masks] == [48] * 4


def test_super_neurons_are_found_and_always_kept(tiny_model):
    """A neuron with a 10^4 times larger down-projection column writes a massive activation: it is found, and both
    maskers keep it even when its own score is the lowest."""
    adapter = get_adapter(tiny_model.config)
    layers = list(range(len(layer_list(tiny_model, adapter))))
    ids = torch.randint(3, 128, (2, 9))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    assert not any(m.any() for m in super_neurons(tiny_model, adapter, layers, batches))  # random weights: none
    down = get_path(layer_list(tiny_model, adapter)[1], adapter.down_proj)
    with torch.no_grad():
        down.weight[:, 5] *= 1e4
    found = super_neurons(tiny_model, adapter, layers, batches)
    assert [torch.nonzero(m).flatten().tolist() for m in found] == [[], [5], [], []]
    assert not any(m.any() for m in super_neurons(tiny_model, adapter, layers, batches, factor=0))

    widths = [m.numel() for m in found]
    scores = [torch.arange(w, dtype=torch.float32) + 1 for w in widths]
    scores[1][5] = 0.0  # the lowest score of all
    assert not global_keep_masks(scores, 0.5)[1][5]
    kept = global_keep_masks(scores, 0.5, protect=found)
    assert kept[1][5] and sum(int(m.sum()) for m in kept) == sum(widths) - round(0.5 * sum(widths))
    from effir.gates import neuron_magnitude

    weakest = [torch.nn.functional.one_hot(neuron_magnitude(layer_list(tiny_model, adapter)[i], adapter).argmin(),
                                           widths[i]).bool() for i in layers]
    plain = uniform_magnitude_masks(tiny_model, adapter, layers, 0.5)
    assert not any(m[w].any() for m, w in zip(plain, weakest, strict=True))
    protected = uniform_magnitude_masks(tiny_model, adapter, layers, 0.5, protect=weakest)
    assert all(m[w].all() and m.sum() == w.numel() // 2 for m, w in zip(protected, weakest, strict=True))


def _train_target(model, target: float, scale: float, steps: int = 60, protect=None, offset=None):
    """Gates trained towards ``target`` closed on a task with a real optimum: match the ungated model's states on
    random token batches, multiplied by ``scale``."""
    for p in model.parameters():
        p.requires_grad_(False)
    gates = MlpGates(model, get_adapter(model.config), list(range(4)), straight_through=True)
    optimizer = TargetSparsityAdam([{"params": list(gates.z), "lr": 0.05, "target": target}], protect=protect,
                                   offset=offset)
    for step in range(steps):
        batch = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(step))
        with torch.no_grad():
            gates.set_hard_masks([torch.ones_like(z) for z in gates.z])
            reference = model(input_ids=batch).last_hidden_state
            gates.set_hard_masks(None)
        loss = scale * (model(input_ids=batch).last_hidden_state - reference).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [z.detach().clone() for z in gates.z], optimizer


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
def test_the_closed_fraction_reaches_the_target_whatever_the_loss_scale(target):
    from conftest import tiny_config
    from transformers import AutoModel

    runs = {}
    for scale in (1.0, 100.0):
        torch.manual_seed(0)
        runs[scale] = _train_target(AutoModel.from_config(tiny_config("llama")).eval(), target, scale)
    for z, optimizer in runs.values():
        assert closed_fraction(z) == pytest.approx(target, abs=0.01)
        assert optimizer.gate_group["closed"] == closed_fraction(z)
    # x100 loss: the same fraction and, but for gates whose gradient is at rounding level, the same gates closed
    closed = [torch.cat([(v <= 0) for v in runs[scale][0]]) for scale in (1.0, 100.0)]
    assert closed_fraction(runs[1.0][0]) == closed_fraction(runs[100.0][0])
    assert (closed[0] == closed[1]).float().mean() >= 0.95


def test_protected_neurons_are_never_pushed_closed():
    from conftest import tiny_config
    from transformers import AutoModel

    torch.manual_seed(0)
    protect = [torch.zeros(64, dtype=torch.bool) for _ in range(4)]
    protect[2][:40] = True
    z, optimizer = _train_target(AutoModel.from_config(tiny_config("llama")).eval(), 0.5, 1.0, protect=protect)
    assert (z[2][:40] > 0).all()
    assert not any(m[2][:40].any() for m in [optimizer.cut_set()])


def test_ties_in_the_ranking_follow_the_secondary_key_not_layer_order():
    scores = [torch.zeros(4), torch.zeros(4)]  # every gate closed: equal scores
    secondary = [torch.tensor([5.0, 6.0, 7.0, 8.0]), torch.tensor([9.0, 1.0, 10.0, 2.0])]
    masks = global_keep_masks(scores, 0.5, secondary=secondary)  # layer order would cut all of layer 0
    assert masks[0].tolist() == [False, False, True, True] and masks[1].tolist() == [True, False, True, False]
    swapped = global_keep_masks(scores[::-1], 0.5, secondary=secondary[::-1])
    assert [m.tolist() for m in swapped] == [m.tolist() for m in masks[::-1]]  # the same neurons, whatever the order


def test_the_stopping_rule_waits_for_a_settled_cut_at_the_target():
    group = {"target": 0.5}
    rule = SettledRanking(lambda: group, every=10, patience=2, tolerance=0.01)
    closed = [torch.tensor([-1.0, -1.0, 1.0, 1.0])]
    cut = torch.tensor([True, True, False, False])
    assert not rule.settled(10, lambda: (closed, cut))  # first look: nothing to compare with
    assert not rule.settled(15, lambda: (closed, cut))  # not a check step
    assert not rule.settled(20, lambda: ([torch.tensor([-1.0, 1.0, 1.0, 1.0])], cut))  # 25 % closed, target 50 %
    assert not rule.settled(30, lambda: (closed, cut))
    assert rule.settled(40, lambda: (closed, cut)) and group["settled_at"] == 40
    assert rule.settled(41, lambda: (closed, ~cut))  # settled stays settled (a resumed run stops where it stopped)


def test_prior_offsets_are_centred_percentiles_whatever_the_scale():
    scores = [torch.tensor([1.0, 4.0, 2.0]), torch.tensor([8.0, 2.0])]  # 2.0 twice: a tie
    offsets = prior_offsets(scores, 2.0)
    # ranks 0, 3, 1.5, 4, 1.5 of 5 -> q = rank / 4 -> 2 * (q - 0.5)
    assert [o.tolist() for o in offsets] == [[-1.0, 0.5, -0.25], [1.0, -0.25]]
    assert [o.tolist() for o in prior_offsets([s * 1e6 for s in scores], 2.0)] == [o.tolist() for o in offsets]


def test_without_a_task_signal_the_prior_decides_the_cut():
    """A task that does not care which gates close (zero loss gradient): the closed gates are exactly the prior's
    lowest, and the final ranking cuts them."""
    from conftest import tiny_config
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config("llama")).eval()
    prior = [torch.randn(64) for _ in range(4)]
    offset = prior_offsets(prior, 2.0)
    gates = MlpGates(model, get_adapter(model.config), list(range(4)), straight_through=True)
    optimizer = TargetSparsityAdam([{"params": list(gates.z), "lr": 0.05, "target": 0.3}], offset=offset,
                                   ramp_steps=10)
    for _ in range(80):
        optimizer.zero_grad()
        (0.0 * sum(z.sum() for z in gates.z)).backward()
        optimizer.step()
    expected = ~torch.cat(global_keep_masks(prior, 0.3))
    assert torch.equal(torch.cat([z.detach() <= 0 for z in gates.z]), expected)
    assert torch.equal(~torch.cat(global_keep_masks(optimizer.ranking_scores(), 0.3)), expected)
    # the prior moves the ranking only: z itself starts at 1, so the gates still reproduce the model until trained
    assert all(torch.equal(o, g) for o, g in zip(offset, optimizer.gate_group["offset"], strict=True))
