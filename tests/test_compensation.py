"""Closed-form compensation (effir.compensation): the least-squares refit after an MLP width cut and the fitted
replacement of a dropped MLP, checked against torch.linalg.lstsq, hand-computed means and a whole forward through
the compensated model, on every architecture of the table."""

import copy

import pytest
import torch
from conftest import WORDS

from effir.arch import get_adapter, get_path, layer_list
from effir.calibration import block_batches, token_blocks
from effir.compensation import DAMPENING, down_gram, fit_map, map_error, refit_down, replace_and_fit, slice_and_refit
from effir.surgery import MappedBranch, apply_structure, drop_sublayers, slice_mlp, structure_of
from effir.utils import EffirError


def _calibration(tokenizer) -> list[dict]:
    """8 blocks of 24 tokens (about 190 tokens: more than the 64 neurons of a tiny MLP), the last one shorter."""
    texts = [" ".join(WORDS[(5 * i + 11 * j) % len(WORDS)] for j in range(40)) for i in range(10)]
    blocks = token_blocks(tokenizer, texts, 8, 24)
    blocks[-1] = blocks[-1][:13]  # padding must not count
    return list(block_batches(blocks, 3, 0))


def _keeps(model, seed: int = 0, fraction: float = 0.5) -> dict[int, torch.Tensor]:
    """A random ``fraction`` of every layer's neurons."""
    adapter = get_adapter(model.config)
    width = get_path(layer_list(model, adapter)[0], adapter.down_proj).in_features
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randperm(width, generator=g)[:int(fraction * width)].sort().values
            for i in range(len(layer_list(model, adapter)))}


def _run(model, batches) -> torch.Tensor:
    mask = torch.cat([b["attention_mask"] for b in batches])
    with torch.no_grad():
        out = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state for b in batches]
    return torch.cat(out)[mask.bool()]


@torch.no_grad()
def _down_inputs(model, layer: int, batches) -> torch.Tensor:
    """What layer ``layer``'s down projection receives over ``batches`` in a whole forward, non-pad tokens only:
    ``(N, d_ff)``."""
    adapter = get_adapter(model.config)
    down = get_path(layer_list(model, adapter)[layer], adapter.down_proj)
    seen = []
    handle = down.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    for b in batches:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
              position_ids=(b["attention_mask"].cumsum(-1) - 1).clamp(min=0), use_cache=False)
    handle.remove()
    return torch.cat([h[b["attention_mask"].bool()] for h, b in zip(seen, batches, strict=True)])


def test_every_neuron_kept_reproduces_the_model_exactly(tiny_model, tiny_tokenizer):
    """With nothing removed the refit has nothing to make up for: every down projection (and bias) and so the
    model's output stay exactly what they were, whatever the ridge."""
    adapter = get_adapter(tiny_model.config)
    batches = _calibration(tiny_tokenizer)
    before = _run(tiny_model, batches)
    stats = slice_and_refit(tiny_model, adapter, _keeps(tiny_model, fraction=1.0), batches, progress=False)
    assert torch.equal(_run(tiny_model, batches), before)
    assert stats["error_refit"] == stats["error_unrepaired"] == [0.0] * len(layer_list(tiny_model, adapter))


def test_the_textbook_formula_with_every_neuron_kept_gives_back_w(tiny_model, tiny_tokenizer):
    """``W H Hk^T (Hk Hk^T)^-1 = W`` when ``Hk = H``: refit_down (lam = 0) is that formula, to fp32 rounding."""
    adapter = get_adapter(tiny_model.config)
    down = get_path(layer_list(tiny_model, adapter)[0], adapter.down_proj)
    gram, _ = down_gram(tiny_model, layer_list(tiny_model, adapter), 0, down, _calibration(tiny_tokenizer))
    every = torch.arange(down.in_features)
    weight, bias = refit_down(down.weight, down.bias, gram, every, dampening=0.0)
    torch.testing.assert_close(weight, down.weight, rtol=0, atol=1e-6)
    if down.bias is not None:
        torch.testing.assert_close(bias, down.bias, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dampening", [0.0, DAMPENING])
def test_refit_is_the_ridge_least_squares_optimum(tiny_model, tiny_tokenizer, dampening):
    """Half of the first MLP's neurons cut: the refit weight (and bias) is what torch.linalg.lstsq finds on the same
    activations (the ridge as extra rows ``sqrt(lam) I`` pulling the correction to 0), and its output error on them
    is below the plain cut's, as the returned statistics say."""
    adapter = get_adapter(tiny_model.config)
    batches = _calibration(tiny_tokenizer)
    down = get_path(layer_list(tiny_model, adapter)[0], adapter.down_proj)
    w, b = down.weight.detach().double().clone(), None if down.bias is None else down.bias.detach().double().clone()
    h = _down_inputs(tiny_model, 0, batches).double()  # (N, d_ff)
    keep = _keeps(tiny_model)[0]
    target = h @ w.T + (0 if b is None else b)  # (N, d)
    hk, wk = h[:, keep], w[:, keep]
    if b is not None:
        hk, wk = torch.cat([hk, torch.ones(len(h), 1, dtype=h.dtype)], 1), torch.cat([wk, b[:, None]], 1)
    lam = dampening * float((h[:, keep] ** 2).sum(0).mean())
    a = torch.cat([hk, lam ** 0.5 * torch.eye(hk.shape[1], dtype=h.dtype)])
    rhs = torch.cat([target - hk @ wk.T, torch.zeros(hk.shape[1], len(w), dtype=h.dtype)])
    best = wk + torch.linalg.lstsq(a, rhs).solution.T  # (d, k [+1])

    stats = slice_and_refit(tiny_model, adapter, {0: keep}, batches, dampening=dampening, progress=False)
    new = get_path(layer_list(tiny_model, adapter)[0], adapter.down_proj)
    ours = (new.weight if b is None else torch.cat([new.weight, new.bias[:, None]], 1)).detach().double()
    torch.testing.assert_close(ours, best, rtol=1e-4, atol=1e-5)
    error = {"refit": (target - hk @ ours.T).square().sum(), "unrepaired": (target - hk @ wk.T).square().sum()}
    assert error["refit"] < 0.9 * error["unrepaired"], error
    for key in error:
        assert stats[f"error_{key}"][0] == pytest.approx(float(error[key] / target.square().sum()), rel=1e-3)


def test_every_layer_is_refit_on_the_compensated_layers_before_it(tiny_model, tiny_tokenizer):
    """The replayed passes give every MLP the inputs a whole forward through the already sliced and refit layers
    gives it: the same weights as compensating one whole forward at a time. Statistics taken on the uncompressed
    model instead would give other weights from the second layer on."""
    adapter = get_adapter(tiny_model.config)
    batches = _calibration(tiny_tokenizer)
    keeps = _keeps(tiny_model)
    reference, parallel = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    grams_of_full_model = {i: _gram(parallel, i, batches) for i in keeps}
    for i, keep in keeps.items():
        _refit_one(reference, i, keep, _gram(reference, i, batches))  # a whole forward through the layers so far
        _refit_one(parallel, i, keep, grams_of_full_model[i])
    slice_and_refit(tiny_model, adapter, keeps, batches, progress=False)
    for i in keeps:
        ours, theirs, wrong = (get_path(layer_list(m, adapter)[i], adapter.down_proj).weight.detach()
                               for m in (tiny_model, reference, parallel))
        gap = {"reference": (ours - theirs).abs().max(), "full-model statistics": (ours - wrong).abs().max()}
        assert gap["reference"] < 5e-6, (i, gap)  # float32 Grams per batch against float64 ones
        assert i == 0 or gap["full-model statistics"] > 20 * gap["reference"], (i, gap)


def _gram(model, i: int, batches) -> torch.Tensor:
    """``H H^T`` (with the ones row where the down projection has a bias) from a whole forward, float64."""
    adapter = get_adapter(model.config)
    h = _down_inputs(model, i, batches).double()
    if get_path(layer_list(model, adapter)[i], adapter.down_proj).bias is not None:
        h = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
    return h.T @ h


def _refit_one(model, i: int, keep: torch.Tensor, gram: torch.Tensor) -> None:
    adapter = get_adapter(model.config)
    old = get_path(layer_list(model, adapter)[i], adapter.down_proj)
    weight, bias = refit_down(old.weight, old.bias, gram, keep)
    slice_mlp(model, adapter, i, keep)
    new = get_path(layer_list(model, adapter)[i], adapter.down_proj)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)


def test_bias_compensation_of_a_width_cut_adds_the_removed_neurons_mean(tiny_model, tiny_tokenizer):
    """slim --compensate bias (FLAP): the kept weights stay, and the down projection's bias gains W_R mean(h_R) over
    the calibration tokens; a down projection without a bias (LLaMA-style) is refused."""
    adapter = get_adapter(tiny_model.config)
    batches = _calibration(tiny_tokenizer)
    keep = _keeps(tiny_model)[0]
    old = copy.deepcopy(get_path(layer_list(tiny_model, adapter)[0], adapter.down_proj))
    if old.bias is None:
        with pytest.raises(EffirError, match="needs MLP down projections with a bias"):
            slice_and_refit(tiny_model, adapter, {0: keep}, batches, method="bias", progress=False)
        return
    h = _down_inputs(tiny_model, 0, batches).double()
    removed = torch.ones(h.shape[1], dtype=torch.bool)
    removed[keep] = False
    slice_and_refit(tiny_model, adapter, {0: keep}, batches, method="bias", progress=False)
    new = get_path(layer_list(tiny_model, adapter)[0], adapter.down_proj)
    assert torch.equal(new.weight, old.weight[:, keep])
    want = old.bias.double() + old.weight.double()[:, removed] @ h[:, removed].mean(0)
    torch.testing.assert_close(new.bias.double(), want, rtol=0, atol=1e-5)


@torch.no_grad()
def _branch_io(model, i: int, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """What layer ``i``'s MLP reads (its normalised input) and adds to the residual stream (after its output norm;
    BERT: before its residual add and LayerNorm), over the non-pad tokens of a whole forward: ``(N, d)`` each."""
    adapter = get_adapter(model.config)
    layer = layer_list(model, adapter)[i]
    last = get_path(layer, adapter.down_proj if adapter.post_norm else adapter.mlp_out_norm or adapter.mlp[-1])
    xs, ys = [], []
    handles = [get_path(layer, adapter.mlp[0]).register_forward_pre_hook(lambda _m, a: xs.append(a[0])),
               last.register_forward_hook(lambda _m, _a, out: ys.append(out))]
    for b in batches:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
              position_ids=(b["attention_mask"].cumsum(-1) - 1).clamp(min=0), use_cache=False)
    for h in handles:
        h.remove()
    masks = [b["attention_mask"].bool() for b in batches]
    return (torch.cat([x[m] for x, m in zip(xs, masks, strict=True)]).double(),
            torch.cat([y[m] for y, m in zip(ys, masks, strict=True)]).double())


def test_a_bias_replacement_adds_exactly_the_calibration_mean(tiny_model, tiny_tokenizer):
    """--compensate bias: the dropped MLP's stand-in adds its mean output over the calibration tokens, nothing else:
    the layer computes what the plainly dropped layer computes, plus that mean."""
    adapter = get_adapter(tiny_model.config)
    batches = _calibration(tiny_tokenizer)
    _, y = _branch_io(tiny_model, 1, batches)
    plain = copy.deepcopy(tiny_model)
    drop_sublayers(plain, adapter, mlp=[1])
    stats = replace_and_fit(tiny_model, adapter, {1: 0}, batches, progress=False)
    branch = get_path(layer_list(tiny_model, adapter)[1], adapter.mlp[-1])
    assert isinstance(branch, MappedBranch) and branch.rank == 0 and len(list(branch.parameters())) == 1 + (
        adapter.post_norm and 2)  # the bias (+ BERT's LayerNorm, kept)
    torch.testing.assert_close(branch.bias.double(), y.mean(0), rtol=0, atol=1e-6)
    assert stats["error_refit"][0] == pytest.approx(float((y - y.mean(0)).square().sum() / y.square().sum()), rel=1e-4)
    if adapter.post_norm:
        return  # the mean enters before BERT's LayerNorm: no plain difference to read off the output
    outs = [_layer_output(m, 1, batches) for m in (tiny_model, plain)]
    torch.testing.assert_close(outs[0] - outs[1], branch.bias.detach().expand_as(outs[0]), rtol=0, atol=1e-5)


@torch.no_grad()
def _layer_output(model, i: int, batches) -> torch.Tensor:
    adapter = get_adapter(model.config)
    seen = []
    handle = layer_list(model, adapter)[i].register_forward_hook(
        lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    for b in batches:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    handle.remove()
    return torch.cat([o[b["attention_mask"].bool()] for o, b in zip(seen, batches, strict=True)])


@pytest.mark.parametrize("rank", [None, 5])
def test_a_map_replacement_is_the_ridge_least_squares_fit_on_the_replaced_layers_before_it(tiny_model,
                                                                                          tiny_tokenizer, rank):
    """--compensate lstsq: each dropped MLP's map (full rank, or the best rank-5 one) and bias fit what the MLP adds
    from what it reads, as a whole forward through the layers already replaced gives them, by least squares; the
    replaced model saves and rebuilds exactly."""
    adapter = get_adapter(tiny_model.config)
    batches = _calibration(tiny_tokenizer)
    d = tiny_model.config.hidden_size
    rank = rank or d
    reference, original = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    # a whisper of ridge: LayerNorm outputs (BERT) sum to a constant, so the plain normal equations are singular
    stats = replace_and_fit(tiny_model, adapter, {1: rank, 2: rank}, batches, dampening=1e-7, progress=False)
    for i in (1, 2):
        x, y = _branch_io(reference, i, batches)  # layer 1 already replaced in `reference` when layer 2 is read
        ones = torch.ones(len(x), 1, dtype=x.dtype)
        best = torch.linalg.lstsq(torch.cat([x, ones], 1), y).solution  # (d + 1, d)
        branch = get_path(layer_list(tiny_model, adapter)[i], adapter.mlp[-1])
        w = (branch.proj.weight if rank == d else branch.down.weight @ branch.up.weight).detach().double()
        fitted = x @ w.T + branch.bias.detach().double()
        ours, optimum = ((y - f).square().sum() / y.square().sum() for f in (fitted, torch.cat([x, ones], 1) @ best))
        if rank == d:  # the least-squares optimum, up to float32 activations (and a whisper of ridge)
            assert ours <= optimum + 1e-4, (ours, optimum)
        else:  # reduced-rank regression: the optimum's outputs on their top 5 principal directions
            full = torch.cat([x, ones], 1) @ best
            top = torch.linalg.svd(full - full.mean(0), full_matrices=False).Vh[:rank]  # (5, d)
            best_rank = (full - full.mean(0)) @ top.T @ top + full.mean(0)
            assert ours == pytest.approx(float((y - best_rank).square().sum() / y.square().sum()), abs=1e-4)
        assert stats["error_refit"][stats["layers"].index(i)] == pytest.approx(
            float((y - fitted).square().sum() / y.square().sum()), rel=1e-3, abs=1e-6)
        _copy_replacement(reference, tiny_model, i)
    structure = structure_of(tiny_model, adapter)
    assert structure["mlp_maps"] == {"1": rank, "2": rank} and structure["dropped_mlp"] == [1, 2]
    rebuilt = original  # a full-size model, as a skeleton
    apply_structure(rebuilt, adapter, structure)
    rebuilt.load_state_dict(tiny_model.state_dict(), strict=True)
    torch.testing.assert_close(_run(rebuilt, batches), _run(tiny_model, batches), rtol=0, atol=0)


def _copy_replacement(model, fitted, i: int) -> None:
    """Give ``model`` layer ``i``'s replacement as ``fitted`` has it, so that the next layer reads what it reads."""
    from effir.surgery import replace_mlp

    adapter = get_adapter(model.config)
    theirs = get_path(layer_list(fitted, adapter)[i], adapter.mlp[-1])
    ours = replace_mlp(model, adapter, i, theirs.rank)
    ours.load_state_dict(theirs.state_dict())


def test_fit_map_recovers_an_exactly_linear_branch():
    """y = A x + b (A of full rank, then of rank 3): the fit gives A and b back, at full rank and at rank 3, and its
    error is 0."""
    g = torch.Generator().manual_seed(0)
    d, n = 12, 400
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d, dtype=torch.float64)
    for rank, a in ((d, torch.randn(d, d, generator=g, dtype=torch.float64)),
                    (3, torch.randn(d, 3, generator=g, dtype=torch.float64) @ torch.randn(3, d, generator=g,
                                                                                          dtype=torch.float64))):
        b = torch.randn(d, generator=g, dtype=torch.float64)
        y = x @ a.T + b
        stats = {"n": float(n), "x": x.sum(0), "y": y.sum(0), "xx": x.T @ x, "xy": x.T @ y,
                 "yy": float(y.square().sum())}
        bias, maps = fit_map(stats, rank, dampening=0.0)
        w = maps["proj"] if rank == d else maps["down"] @ maps["up"]
        torch.testing.assert_close(w, a, rtol=0, atol=1e-8)
        torch.testing.assert_close(bias, b, rtol=0, atol=1e-8)
        assert map_error(stats, bias, maps) < 1e-12
        assert set(maps) == ({"proj"} if rank == d else {"up", "down"})
        mean, none = fit_map(stats, 0)
        assert not none and torch.allclose(mean, y.mean(0))


def test_bad_input_is_an_effir_error(tiny_model, tiny_tokenizer):
    adapter = get_adapter(tiny_model.config)
    batches = _calibration(tiny_tokenizer)
    with pytest.raises(EffirError, match="dampening"):
        replace_and_fit(tiny_model, adapter, {0: 0}, batches, dampening=-1.0, progress=False)
    with pytest.raises(EffirError, match="rank"):
        replace_and_fit(tiny_model, adapter, {0: 10_000}, batches, progress=False)
    drop_sublayers(tiny_model, adapter, mlp=[3])
    with pytest.raises(EffirError, match="already dropped"):
        replace_and_fit(tiny_model, adapter, {3: 2}, batches, progress=False)
    with pytest.raises(EffirError, match="dampening"):
        slice_and_refit(tiny_model, adapter, _keeps(tiny_model), batches, dampening=-1.0, progress=False)
    with pytest.raises(EffirError, match="subset"):
        slice_and_refit(tiny_model, adapter, {0: torch.tensor([0, 10_000])}, batches, progress=False)
