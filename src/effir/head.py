"""The sentence-transformers head after pooling: ``Dense`` modules, applied as sentence-transformers (ST) applies them.

A folder's ``modules.json`` may list ``Dense`` modules between Pooling and Normalize (EmbeddingGemma: 768 -> 3072 ->
768). Each lives in its own folder (``2_Dense/``) as ST saves it: ``config.json`` (``in_features``, ``out_features``,
``bias``, ``activation_function`` as a dotted class name, ``use_residual``) and ``model.safetensors`` or
``pytorch_model.bin`` (``linear.weight`` ``(out, in)``, ``linear.bias``, ``residual.weight``). ST computes
``activation(linear(x))`` (``+ x``, or ``+ residual(x)`` when the sizes differ, under ``use_residual``).

The head is not part of the transformer: stages compress and train the backbone only, and every folder effir writes
carries the head's modules unchanged (:func:`save_head`). It runs in fp32 whatever the backbone computes in, as ST
loads Dense weights into fp32 modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .utils import EffirError

# Activations ST can name in a Dense config (any torch.nn module it imports and builds without arguments); a name
# outside this list is refused rather than guessed.
_ACTIVATIONS = {cls.__name__: cls for cls in (
    nn.Identity, nn.Tanh, nn.ReLU, nn.GELU, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish,
    nn.Hardtanh, nn.Softsign, nn.ReLU6, nn.SELU, nn.CELU, nn.Tanhshrink, nn.LogSigmoid)}
_DEFAULT_ACTIVATION = "torch.nn.modules.activation.Tanh"  # what ST's Dense uses when the config names none
_SENTENCE_EMBEDDING = "sentence_embedding"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class DenseLayer(nn.Module):
    """One ST ``Dense`` module: ``activation(linear(x))``, plus the residual when its config asks for one."""

    def __init__(self, path: str, config: dict, activation: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.path, self.config, self.stored_dtype = path, config, dtype
        n_in, n_out = config["in_features"], config["out_features"]
        self.linear = nn.Linear(n_in, n_out, bias=config.get("bias", True))
        self.activation = activation
        self.use_residual = bool(config.get("use_residual", False))
        self.residual = nn.Linear(n_in, n_out, bias=False) if self.use_residual and n_in != n_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (x if self.residual is None else self.residual(x))
        return out


class Head(nn.Module):
    """The Dense modules of a folder, in ``modules.json`` order: pooled ``(B, H)`` -> ``(B, out_features)``."""

    def __init__(self, layers: list[DenseLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @property
    def paths(self) -> list[str]:
        return [layer.path for layer in self.layers]

    @property
    def out_features(self) -> int:
        return self.layers[-1].config["out_features"]

    @property
    def flops_per_sequence(self) -> int:
        """Forward FLOPs on one pooled embedding: ``2 * in * out`` per linear map (biases ignored, as effir.flops)."""
        return sum(2 * m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.layers[0].linear.weight
        if first.device != x.device:  # follows the backbone wherever a stage moved it
            self.to(x.device)
        x = x.float()
        for layer in self.layers:
            x = layer(x)
        return x


def check_paths(paths: list[str]) -> None:
    """Module folders are plain names inside the model folder (``2_Dense``): nothing that escapes it.

    Raises:
        EffirError: a path is empty, absolute, nested or names the Pooling folder.
    """
    for path in paths:
        if not isinstance(path, str) or not path or "/" in path or "\\" in path or path in (".", "..", "1_Pooling"):
            raise EffirError(f"Dense module path {path!r} is not a folder name inside the model folder")


def load_head(folder: str | Path, paths: list[str], hidden_size: int) -> Head | None:
    """The Dense modules at ``folder / path`` for each of ``paths`` (``None`` when there are none).

    Raises:
        EffirError: a module's config or weights are missing or do not fit, or it names an activation effir cannot
            reproduce.
    """
    if not paths:
        return None
    check_paths(paths)
    layers, width = [], hidden_size
    for path in paths:
        layer = _load_layer(Path(folder) / path, path)
        if layer.config["in_features"] != width:
            raise EffirError(f"{Path(folder) / path} takes {layer.config['in_features']} features but gets {width} "
                             "(from the pooling or the Dense module before it); the folder is inconsistent")
        layers.append(layer)
        width = layer.config["out_features"]
    head = Head(layers)
    head.requires_grad_(False)  # frozen: stages train the backbone only, so every folder carries the head unchanged
    return head.eval()


def _load_layer(where: Path, path: str) -> DenseLayer:
    config_path = where / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EffirError(f"{config_path} is missing or not valid JSON ({e}); the Dense module is damaged") from None
    _check_config(config_path, config)
    activation = _activation(config_path, config.get("activation_function") or _DEFAULT_ACTIVATION)
    state = _weights(where)
    dtype = next(iter(state.values())).dtype if state else torch.float32
    layer = DenseLayer(path, config, activation, dtype)
    want = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        raise EffirError(f"{where} holds weights {have}, but its config.json ({config['in_features']} -> "
                         f"{config['out_features']}) needs {want}; the Dense module is damaged")
    layer.load_state_dict({k: v.float() for k, v in state.items()})
    return layer


def _check_config(path: Path, config: dict) -> None:
    for key in ("in_features", "out_features"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            raise EffirError(f"{path} has no valid {key!r}; the Dense module is damaged")
    names = {config.get("module_input_name"), config.get("module_output_name")} - {None}
    if names - {_SENTENCE_EMBEDDING}:
        raise EffirError(f"{path} reads or writes {sorted(names)}; effir reproduces Dense modules on the sentence "
                         "embedding only")


def _activation(path: Path, name: str) -> nn.Module:
    """The activation ``name`` (``torch.nn.modules.activation.Tanh`` or ``torch.nn.Tanh``) as a module."""
    short = name.rsplit(".", 1)[-1]
    cls = _ACTIVATIONS.get(short)
    if cls is None or name not in (f"{cls.__module__}.{short}", f"torch.nn.{short}"):
        raise EffirError(f"{path} uses activation {name!r}, which effir cannot reproduce; it knows "
                         f"{', '.join(sorted(_ACTIVATIONS))} (torch.nn)")
    return cls()


def _weights(where: Path) -> dict[str, torch.Tensor]:
    """The module's tensors, from the first of :data:`_WEIGHT_FILES` that exists (ST's order)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for name in _WEIGHT_FILES:
        path = where / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, SafetensorError, RuntimeError, ValueError) as e:
            raise EffirError(f"{path} could not be read ({str(e).strip().splitlines()[0]}); the Dense module is "
                             "damaged") from None
    raise EffirError(f"{where} has neither {' nor '.join(_WEIGHT_FILES)}; the Dense module is incomplete")


def save_head(head: Head, folder: str | Path) -> None:
    """Write each Dense module into ``folder / path`` as ST saves it: ``config.json`` as it was read,
    ``model.safetensors`` in the dtype it was stored in."""
    from safetensors.torch import save_file

    for layer in head.layers:
        where = Path(folder) / layer.path
        where.mkdir(parents=True, exist_ok=True)
        (where / "config.json").write_text(json.dumps(layer.config, indent=4) + "\n")
        state = {k: v.detach().to("cpu", layer.stored_dtype).contiguous() for k, v in layer.state_dict().items()}
        save_file(state, str(where / "model.safetensors"))


def head_digest_items(head: Head | None):
    """``(name, tensor)`` of every head weight, for fingerprints: two heads that differ embed differently."""
    if head is None:
        return []
    return [(f"head.{layer.path}.{k}", v) for layer in head.layers for k, v in sorted(layer.state_dict().items())]
