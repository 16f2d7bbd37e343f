"""Layer-by-layer 2:4 pruning with llmcompressor's kernels (effir.pruning), checked against hand computations."""

import copy

import pytest
import torch
from conftest import WORDS

from effir.arch import get_adapter, layer_list
from effir.calibration import block_batches, token_blocks
from effir.pruning import _calibrate, kernel, prune_layers
from effir.sparsity import Pattern, layer_projections, nonzeros_per_group, projections

pytest.importorskip("llmcompressor", reason="effir prune's kernels: pip install --no-deps llmcompressor")
TWO_FOUR = Pattern(2, 4)


def _batches(tokenizer, samples: int = 6, seq_len: int = 16) -> list[dict]:
    texts = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(30)) for i in range(12)]
    blocks = token_blocks(tokenizer, texts, samples, seq_len)
    blocks[-1] = blocks[-1][:11]  # one shorter block: its padding must not count
    return list(block_batches(blocks, 2, 0))


@torch.no_grad()
def _batch_inputs(model, modules: dict, batches) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """What each of ``modules`` receives over ``batches``: ``(input, attention mask)`` per batch."""
    seen = {name: [] for name in modules}
    mask = {}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: seen[n].append((a[0], mask["m"])))
               for n, m in modules.items()]
    for batch in batches:
        mask["m"] = batch["attention_mask"]
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0), use_cache=False)
    for h in handles:
        h.remove()
    return seen


def _inputs(model, modules: dict, batches) -> dict[str, torch.Tensor]:
    """What each of ``modules`` receives over ``batches``, non-pad tokens only: ``(tokens, in_features)``."""
    return {name: torch.cat([x[m.bool()] for x, m in xs]).float()
            for name, xs in _batch_inputs(model, modules, batches).items()}


def _top(score: torch.Tensor, keep: int, group: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` largest scores in every ``group`` consecutive columns."""
    out, cols = score.shape
    top = score.reshape(out, cols // group, group).topk(keep, dim=-1).indices
    return torch.zeros(out, cols // group, group, dtype=torch.bool).scatter_(-1, top, True).reshape(out, cols)


def test_wanda_scores_and_kept_weights_by_hand(tiny_model, tiny_tokenizer):
    """Wanda's score |W_ij| * ||X_j||_2 over the layer's calibration inputs X, by hand; the 2 of every 4 it keeps are
    the top 2 by that score, unchanged (the first layer: its calibration inputs are the dense model's)."""
    adapter = get_adapter(tiny_model.config)
    batches = _batches(tiny_tokenizer)
    first = layer_projections(layer_list(tiny_model, adapter)[0], adapter)
    x = _inputs(tiny_model, first, batches)
    dense = {name: m.weight.detach().clone() for name, m in first.items()}
    scores = {name: dense[name].abs() * x[name].norm(dim=0) for name in first}
    stats = {m: [kernel("wanda").make_empty_row_scalars(m), 0] for m in first.values()}  # what the kernel is fed
    _calibrate(tiny_model, layer_list(tiny_model, adapter), 0, batches, [None] * len(batches), stats, kernel("wanda"),
               "wanda")
    for name, m in first.items():
        row_scalars, samples = stats[m]
        # the kernel's metric |W| * sqrt(row_scalars): the hand score over the square root of the sample count
        torch.testing.assert_close(dense[name].abs() * row_scalars.sqrt() * samples ** 0.5, scores[name])
    prune_layers(tiny_model, adapter, batches, "wanda", TWO_FOUR, progress=False)
    for name, m in first.items():
        kept = m.weight != 0
        assert torch.equal(kept, _top(scores[name], 2, 4)), name
        assert torch.equal(m.weight[kept], dense[name][kept]), name


def test_every_layer_is_calibrated_on_the_pruned_layers_before_it(tiny_model, tiny_tokenizer):
    """The replayed passes (earlier layers skipped, the last one run on its recorded inputs) give every layer the
    inputs a whole forward through the already-pruned layers gives it: the same weights as pruning that way. The
    reference accumulates the Hessians batch by batch as prune_layers does, so both sum in the same order and the
    weights are equal exactly (a Hessian summed in another order may flip a near-tie of the 2:4 choice)."""
    adapter = get_adapter(tiny_model.config)
    batches = _batches(tiny_tokenizer)
    reference = copy.deepcopy(tiny_model)
    sgpt = kernel("sparsegpt")
    for layer in layer_list(reference, adapter):
        found = layer_projections(layer, adapter)
        xs = _batch_inputs(reference, found, batches)  # a whole forward through the layers pruned so far
        for name, m in found.items():
            hessian, seen = sgpt.make_empty_hessian(m), 0
            for x, mask in xs[name]:  # pad positions zeroed, batch by batch, as prune_layers accumulates
                hessian, seen = sgpt.accumulate_hessian(x * mask[..., None], m, hessian, seen)
            _, weight = sgpt.sparsify_weight(m, {m: hessian}, 0.5, 2, 4, 128, 0.01, False)
            with torch.no_grad():
                m.weight.copy_(weight)
    prune_layers(tiny_model, adapter, batches, "sparsegpt", TWO_FOUR, progress=False)
    ours, theirs = projections(tiny_model, adapter), projections(reference, adapter)
    for name in ours:
        assert torch.equal(ours[name].weight, theirs[name].weight), name


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(tiny_model, tiny_tokenizer):
    """SparseGPT updates the kept weights to make up for the pruned ones: on its calibration inputs, each pruned
    projection's output error ||X W'^T - X W^T|| is below Wanda's and below magnitude 2:4's on the same layer."""
    adapter = get_adapter(tiny_model.config)
    batches = _batches(tiny_tokenizer)
    first = layer_projections(layer_list(tiny_model, adapter)[0], adapter)
    x = _inputs(tiny_model, first, batches)
    dense = {name: m.weight.detach().clone() for name, m in first.items()}
    pruned = {}
    for method in ("wanda", "sparsegpt"):
        model = copy.deepcopy(tiny_model)
        stats = prune_layers(model, adapter, batches, method, TWO_FOUR, progress=False)
        assert stats["zeros"] == stats["weights"] // 2
        pruned[method] = {n: m.weight.detach() for n, m in layer_projections(layer_list(model, adapter)[0],
                                                                            adapter).items()}
    for name, w in dense.items():
        candidates = {"magnitude": w * _top(w.abs(), 2, 4), **{k: v[name] for k, v in pruned.items()}}
        error = {k: (x[name] @ (v - w).T).norm() for k, v in candidates.items()}
        assert error["sparsegpt"] < error["wanda"] and error["sparsegpt"] < error["magnitude"], (name, error)
        assert bool((nonzeros_per_group(pruned["sparsegpt"][name], 4) == 2).all()), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [Pattern(1, 4), Pattern(3, 4), Pattern(4, 8)])
def test_n_counts_the_weights_kept(_tiny_models, tiny_tokenizer, method, pattern):
    """llmcompressor's N counts the pruned weights of a group; effir's counts the kept ones."""
    model = copy.deepcopy(_tiny_models["qwen3"])
    adapter = get_adapter(model.config)
    prune_layers(model, adapter, _batches(tiny_tokenizer, 2), method, pattern, block_size=8, progress=False)
    for name, m in projections(model, adapter).items():
        assert bool((nonzeros_per_group(m.weight, pattern.group) == pattern.keep).all()), name
