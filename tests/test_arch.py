import pytest

from effir.arch import ADAPTERS, get_adapter, get_path, layer_list
from effir.utils import EffirError


def test_every_role_resolves_on_a_real_module(tiny_model):
    adapter = get_adapter(tiny_model.config)
    layers = layer_list(tiny_model, adapter)
    assert len(layers) == tiny_model.config.num_hidden_layers
    layer = layers[0]
    roles = [adapter.attention, *adapter.mlp, *adapter.up_projs, adapter.down_proj, adapter.attn_in_norm,
             adapter.attn_out_norm, adapter.mlp_in_norm, adapter.mlp_out_norm]
    for role in filter(None, roles):
        assert get_path(layer, role) is not None, f"{tiny_model.config.model_type}: {role} missing"


def test_mlp_projection_shapes_match_intermediate_size(tiny_model):
    adapter = get_adapter(tiny_model.config)
    layer = layer_list(tiny_model, adapter)[0]
    width = getattr(tiny_model.config, adapter.intermediate_key)
    rows = sum(get_path(layer, p).weight.shape[0] for p in adapter.up_projs)
    assert rows == width * (2 if adapter.fused_gate_up or len(adapter.up_projs) == 2 else 1)
    assert get_path(layer, adapter.down_proj).weight.shape[1] == width


def test_lora_targets_exist(tiny_model):
    adapter = get_adapter(tiny_model.config)
    names = [n for n, _ in tiny_model.named_modules()]
    for target in adapter.lora_targets:
        assert any(n == target or n.endswith("." + target) for n in names), target


def test_unknown_architecture_lists_supported_and_how_to_add():
    with pytest.raises(EffirError) as e:
        get_adapter("gpt2")
    msg = str(e.value)
    assert "gpt2" in msg and all(mt in msg for mt in ADAPTERS) and "arch.py" in msg
