"""THE architecture table: what each supported ``model_type`` calls the roles effir works with.

Every structural edit (dropping sub-layers, slicing MLP widths, LoRA targets, importance hooks) looks module names
up here and nowhere else. Adding an architecture means adding one entry to ``ADAPTERS``; the test fixtures
parametrise over this table, so a new entry joins the whole test matrix automatically.

Paths are dotted attribute paths. ``layers`` is relative to the *base* model (``AutoModel``, not the LM-head
model); all other paths are relative to one layer (block).

Verified on transformers 5 with randomly initialised tiny models:
- Llama / Mistral / Qwen2 / Qwen3: despite its name, ``post_attention_layernorm`` is the MLP's *input* norm.
- Gemma2 / Gemma3: ``pre_feedforward_layernorm`` feeds the MLP and ``post_feedforward_layernorm`` normalises the
  MLP output before the residual add; ``post_attention_layernorm`` is a real attention-side output norm.
- Phi3: one fused ``gate_up_proj`` with 2 x intermediate rows (gate first, then up).
- BERT: post-norm. ``attention`` holds the output projection *and* the LayerNorm applied after the residual add,
  ``intermediate.dense`` is the up projection and ``output`` holds the down projection plus that post-norm.
"""

from __future__ import annotations

from dataclasses import dataclass

from .utils import EffirError


@dataclass(frozen=True)
class ArchAdapter:
    """Role -> module-name map for one family of architectures."""

    family: str
    """Short family name, recorded in ``effir.json``."""
    layers: str
    """Path of the layer list, from the base model."""
    attention: str
    """The attention sub-layer (whole module whose output is added to the residual stream)."""
    attn_in_norm: str | None
    """Pre-norm feeding attention (None for post-norm models)."""
    attn_out_norm: str | None
    """Norm on the attention output before the residual add (Gemma2/3), else None."""
    mlp: tuple[str, ...]
    """Module(s) forming the MLP sub-layer. BERT's MLP is split over ``intermediate`` and ``output``."""
    mlp_in_norm: str | None
    """Pre-norm feeding the MLP (None for post-norm models)."""
    mlp_out_norm: str | None
    """Norm on the MLP output before the residual add (Gemma2/3), else None."""
    up_projs: tuple[str, ...]
    """Projections whose *output* rows are MLP neurons: ``(gate, up)``, the fused ``gate_up`` or BERT's one."""
    down_proj: str
    """Projection whose *input* columns are MLP neurons."""
    lora_targets: tuple[str, ...]
    """Module-name suffixes for peft's ``target_modules`` (attention and MLP projections)."""
    fused_gate_up: bool = False
    """True when one ``up_projs`` entry holds gate and up halves stacked along the output dimension."""
    post_norm: bool = False
    """True for BERT-style layers: ``x = LN(x + F(x))`` instead of ``x = x + F(LN(x))``."""
    is_decoder: bool = True
    """Decoder LLMs embed with EOS appended + last token; encoders default to mean pooling."""
    intermediate_key: str = "intermediate_size"
    """Config attribute holding the MLP width."""
    attn_returns_pair: bool = True
    """The attention module returns ``(output, weights)``; the stand-in for a dropped one must return a pair too."""
    residual_args: tuple[int, int] = (0, 1)
    """Post-norm only: which positional argument of the attention module and of the *last* MLP module is the
    residual input, returned unchanged when that sub-layer is dropped (BERT: ``attention(x, mask)`` -> ``x`` and
    ``output(h, x)`` -> ``x``; the earlier MLP module, ``intermediate``, becomes the identity)."""

    def structure_roles(self) -> dict:
        """The roles a compressed model folder needs to rebuild itself, as written into its ``config.json``.

        The self-contained modeling file in that folder cannot import effir, so it reads these names instead.
        """
        names = ("layers", "attention", "attn_in_norm", "attn_out_norm", "mlp", "mlp_in_norm", "mlp_out_norm",
                 "up_projs", "down_proj", "fused_gate_up", "post_norm", "attn_returns_pair", "residual_args")
        return {n: list(v) if isinstance(v, tuple) else v for n in names for v in [getattr(self, n)]}


LLAMA_LIKE = ArchAdapter(
    family="llama",
    layers="layers",
    attention="self_attn",
    attn_in_norm="input_layernorm",
    attn_out_norm=None,
    mlp=("mlp",),
    mlp_in_norm="post_attention_layernorm",
    mlp_out_norm=None,
    up_projs=("mlp.gate_proj", "mlp.up_proj"),
    down_proj="mlp.down_proj",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)

GEMMA_LIKE = ArchAdapter(
    family="gemma",
    layers="layers",
    attention="self_attn",
    attn_in_norm="input_layernorm",
    attn_out_norm="post_attention_layernorm",
    mlp=("mlp",),
    mlp_in_norm="pre_feedforward_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
    up_projs=("mlp.gate_proj", "mlp.up_proj"),
    down_proj="mlp.down_proj",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)

PHI3 = ArchAdapter(
    family="phi3",
    layers="layers",
    attention="self_attn",
    attn_in_norm="input_layernorm",
    attn_out_norm=None,
    mlp=("mlp",),
    mlp_in_norm="post_attention_layernorm",
    mlp_out_norm=None,
    up_projs=("mlp.gate_up_proj",),
    down_proj="mlp.down_proj",
    lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    fused_gate_up=True,
)

BERT = ArchAdapter(
    family="bert",
    layers="encoder.layer",
    attention="attention",
    attn_in_norm=None,
    attn_out_norm="attention.output.LayerNorm",
    mlp=("intermediate", "output"),
    mlp_in_norm=None,
    mlp_out_norm="output.LayerNorm",
    up_projs=("intermediate.dense",),
    down_proj="output.dense",
    lora_targets=("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
    post_norm=True,
    is_decoder=False,
)

ADAPTERS: dict[str, ArchAdapter] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma2": GEMMA_LIKE,
    "gemma3_text": GEMMA_LIKE,
    "phi3": PHI3,
    "bert": BERT,
}


def get_adapter(config_or_model_type) -> ArchAdapter:
    """The adapter for a config (or a ``model_type`` string); unsupported types get an actionable error."""
    model_type = getattr(config_or_model_type, "model_type", config_or_model_type)
    if model_type not in ADAPTERS:
        raise EffirError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(sorted(ADAPTERS))}. "
            "To add one, add an ArchAdapter entry for it to ADAPTERS in effir/arch.py"
        )
    return ADAPTERS[model_type]


def get_path(root, path: str):
    """Follow a dotted attribute path (``"mlp.gate_proj"``); ``None`` when any step is missing."""
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def set_path(root, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, name, value)


def layer_list(base_model, adapter: ArchAdapter):
    """The ``nn.ModuleList`` of layers of a base (headless) model."""
    layers = get_path(base_model, adapter.layers)
    if layers is None:
        raise EffirError(f"model {type(base_model).__name__} has no layer list at {adapter.layers!r}")
    return layers


def lora_target_modules(adapter: ArchAdapter) -> list[str]:
    return list(adapter.lora_targets)
