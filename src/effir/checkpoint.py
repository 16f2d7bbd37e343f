"""Model folders: a model reference (:mod:`effir.refs`) -> loaded :class:`~effir.encoder.Encoder`, an encoder -> a
saved folder (HF weights + tokenizer + ``effir.json``). The weight files and the remote code of compressed folders
are :mod:`effir.model_files`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ._version import __version__
from .arch import get_adapter
from .encoder import (
    DEFAULT_TASK,
    PROMPT_PRESETS,
    AsymmetricEncoder,
    EmbeddingSettings,
    Encoder,
    default_settings,
    prompt_template,
)
from .export import write_sentence_transformers_files
from .files import atomic_path
from .head import head_digest_items, load_head, save_head
from .model_files import (
    add_remote_code,
    base_config,
    first_weight_dtype,
    load_compressed,
    weights_digest,
)
from .refs import gguf_to_folder, quiet_transformers, resolve
from .sparsity import checked_record
from .stfolder import is_st_folder, read_st_folder
from .surgery import count_parameters, is_compressed, structure_of
from .utils import EffirError, dtype_name, floating_dtype, pick_device, pick_dtype

EFFIR_JSON = "effir.json"
FORMAT_VERSION = 1


def read_effir_json(folder: Path) -> dict:
    """The folder's ``effir.json`` (``{}`` when absent); a corrupted one is a clear error."""
    path = Path(folder) / EFFIR_JSON
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EffirError(f"{path} is corrupted ({e.msg} at line {e.lineno}); restore it or re-run the stage "
                         "that wrote it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise EffirError(f"{path} is not an effir {FORMAT_VERSION} model description (missing 'format': "
                         f"{FORMAT_VERSION}); restore it or re-run the stage that wrote it")
    return meta


@contextlib.contextmanager
def _hub_errors(ref: str):
    try:
        yield
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(e).lower() or "connect" in str(e).lower()
        hint = " (no network: download it where you have one and pass the local folder)" if offline else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EffirError(f"could not load {ref!r} from the Hugging Face hub{hint}: {first}") from None


@contextlib.contextmanager
def _local_errors(folder: Path):
    """A local folder that fails to load is damaged here (corrupt config.json, truncated safetensors): say so, not
    "hub download failed", which sends the user looking for a network problem."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EffirError(f"model folder {folder} is damaged and could not be loaded ({first}); restore it, download "
                         "it again, or re-run the stage that wrote it") from None


def load(ref: str | os.PathLike, device: str | None = None, dtype: str | None = "auto", pooling: str | None = None,
         query_prompt: str | None = None, document_prompt: str | None = None, task: str | None = None,
         query_max_length: int | None = None, document_max_length: int | None = None,
         padding_side: str | None = None, prompt_name: str | None = None, truncate_dim: int | None = None) -> Encoder:
    """Load a model reference as an :class:`Encoder` ready to ``encode_queries`` / ``encode_documents``.

    Args:
        ref: built-in name, local folder, ``.gguf`` file or hub id (see module docstring).
        device: ``cuda``, ``cpu``, ... (default: cuda when available).
        dtype: ``auto`` (bf16 where the hardware runs it natively, else fp32: for computing), ``source`` (the
            dtype the weights are stored in: for stages that save the model), ``fp32``, ``bf16`` or ``fp16``.
        pooling, query_prompt, document_prompt, task, query_max_length, document_max_length: override the saved or
            default :class:`EmbeddingSettings`; prompts take a preset name (``effir``, ``e5``, ``none``) or a
            template containing ``{text}``.
        padding_side: ``right`` or ``left`` (default: the tokenizer's); embeddings are the same either way.
        prompt_name: the named prompt of a sentence-transformers folder (``web_search_query``, ...) to use as the
            query prompt; ``query_prompt`` still wins. Kept in folders effir writes, so it works on those too.
        truncate_dim: keep the first ``truncate_dim`` embedding dimensions (Matryoshka), as sentence-transformers'
            ``truncate_dim`` does (default: the folder's, else all); retrieval then scores by cosine.

    A folder without ``effir.json`` that is a sentence-transformers folder embeds as sentence-transformers does:
    pooling, the Dense head (:mod:`effir.head`), normalisation, truncation, prompts and lengths come from its files
    (:mod:`effir.stfolder`); notices about what was
    chosen for it (a capped length, a missing query prompt) go to stderr.

    Raises:
        EffirError: the reference cannot be found or loaded, or the architecture is unsupported.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    quiet_transformers()
    kind, where = resolve(ref)
    if kind == "gguf":
        where, kind = gguf_to_folder(where), "dir"
    dev = pick_device(device)
    meta = read_effir_json(where) if kind == "dir" else {}
    with _local_errors(where) if kind == "dir" else _hub_errors(str(ref)):
        config = base_config(where) if kind == "dir" else AutoConfig.from_pretrained(where)
        adapter = get_adapter(config)
        stored = stored_dtype(config, where if kind == "dir" else None)
        torch_dtype = pick_dtype(dtype, dev, stored)
        tokenizer = AutoTokenizer.from_pretrained(where, config=config)
        model = _load_model(AutoModel, where, config, meta, torch_dtype)
    model.to(dev).eval()
    settings, meta = _settings(meta, adapter, where if kind == "dir" else None, config, tokenizer, prompt_name)
    settings = _override(settings, pooling, query_prompt, document_prompt, task, query_max_length, document_max_length)
    settings = _truncated(settings, truncate_dim)
    head = load_head(where, settings.head, config.hidden_size)
    _check_truncate_dim(settings, head, config.hidden_size)
    meta = {**meta, "reference": str(ref), "path": str(where), "dtype": dtype_name(torch_dtype),
            "stored_dtype": dtype_name(stored)}
    return Encoder(model, tokenizer, settings, adapter, meta=meta, padding_side=padding_side or tokenizer.padding_side,
                   head=head)


@dataclass(frozen=True)
class Outline:
    """What a model is made of, read without its weights: enough to tell whether two models' blocks and tokens
    correspond one to one."""

    blocks: int
    width: int
    tokens: str
    """A digest of the tokenizer: its vocabulary and the ids it gives a probe text (special tokens aside)."""


TOKENIZER_PROBE = "The naïve café's 1990s menu: rock-n-roll, CO2 and über-fast Wi-Fi!"
"""Text whose token ids enter :attr:`Outline.tokens`: two tokenizers with one vocabulary may still merge differently."""


def outline(ref: str | os.PathLike) -> Outline:
    """The :class:`Outline` of a model reference: its config and tokenizer only (a ``.gguf`` is converted once, as
    :func:`load` would).

    Raises:
        EffirError: the reference cannot be found or read.
    """
    from transformers import AutoConfig, AutoTokenizer

    quiet_transformers()
    kind, where = resolve(ref)
    if kind == "gguf":
        where, kind = gguf_to_folder(where), "dir"
    with _local_errors(where) if kind == "dir" else _hub_errors(str(ref)):
        config = base_config(where) if kind == "dir" else AutoConfig.from_pretrained(where)
        tokenizer = AutoTokenizer.from_pretrained(where, config=config)
    # without special tokens: folders effir saves append EOS in the tokenizer itself, and the student's own
    # special tokens are what both models are given anyway
    vocab = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]])
    return Outline(config.num_hidden_layers, config.hidden_size, hashlib.sha256(vocab.encode()).hexdigest()[:16])


def stored_dtype(config, folder: Path | None) -> torch.dtype:
    """The dtype the model's weights are kept in: config.json's ``dtype``, else the first floating tensor of the
    folder's safetensors, else fp32. Stages that save a model keep this dtype unless asked for another."""
    dtype = floating_dtype(getattr(config, "dtype", None))
    if dtype is None and folder is not None:
        dtype = first_weight_dtype(folder)
    return dtype or torch.float32


def _load_model(auto_model, where, config, meta: dict, torch_dtype):
    structure = meta.get("structure")
    if structure:
        return load_compressed(where, config, structure, torch_dtype)
    return auto_model.from_pretrained(where, config=config, dtype=torch_dtype)


def _settings(meta: dict, adapter, folder: Path | None, config, tokenizer, prompt_name: str | None):
    """``(settings, meta)``: from effir.json, else from a sentence-transformers folder's files, else the defaults.

    The named prompts of a sentence-transformers source travel in ``meta["source_prompts"]`` (and so into the
    effir.json and sentence-transformers files of every folder saved from it).
    """
    if "embedding" in meta:
        settings = EmbeddingSettings.from_dict(meta["embedding"])
        if prompt_name is not None:
            prompts = (meta.get("source_prompts") or {}).get("prompts") or {}
            if prompt_name not in prompts:
                raise EffirError(f"--prompt-name {prompt_name!r} is not a prompt of {folder}; its prompts are "
                                 f"{sorted(prompts) or 'none'}")
            settings = replace(settings, query_template=prompts[prompt_name] + "{text}")
        return settings, meta
    if not is_st_folder(folder):
        if prompt_name is not None:
            raise EffirError(f"--prompt-name needs a sentence-transformers folder with named prompts; "
                             f"{folder or 'a hub model'} has none (use --query-prompt)")
        return default_settings(adapter), meta
    read = read_st_folder(folder, config, tokenizer, prompt_name)
    for note in read.notes:
        print(f"effir: {note}", file=sys.stderr)
    meta = {**meta, "source_prompts": {"prompts": read.prompts, "default_prompt_name": read.default_prompt_name}}
    return read.settings, meta


def _override(s: EmbeddingSettings, pooling, query_prompt, document_prompt, task, qlen, dlen) -> EmbeddingSettings:
    data = s.to_dict()
    if pooling:
        data["pooling"] = pooling
    if query_prompt:
        data["query_template"] = prompt_template(query_prompt, task or DEFAULT_TASK)
    elif task:
        data["query_template"] = _with_task(s.query_template, task)
    if document_prompt:
        data["document_template"] = prompt_template(document_prompt, task or DEFAULT_TASK)
    if qlen:
        data["query_max_length"] = qlen
    if dlen:
        data["document_max_length"] = dlen
    return EmbeddingSettings.from_dict(data)


def _truncated(s: EmbeddingSettings, truncate_dim: int | None) -> EmbeddingSettings:
    """``s`` truncated to ``truncate_dim`` dimensions (``None``: as it is). Truncated unit vectors are no longer
    unit vectors, so they score by cosine, as sentence-transformers scores the folders effir writes."""
    if truncate_dim is None:
        return s
    return EmbeddingSettings.from_dict({**s.to_dict(), "truncate_dim": truncate_dim,
                                        "similarity": "cosine" if s.normalize else s.similarity})


def _check_truncate_dim(s: EmbeddingSettings, head, hidden_size: int) -> None:
    full = head.out_features if head is not None else hidden_size
    if s.truncate_dim is not None and s.truncate_dim > full:
        raise EffirError(f"truncate_dim {s.truncate_dim} is more than the {full} dimensions the model embeds in")


def _with_task(template: str, task: str) -> str:
    """A filled query ``template`` of a preset with a ``{task}`` slot (``effir``, ``e5``), its task replaced by
    ``task``: ``--task`` alone keeps the prompt the model was saved with.

    Raises:
        EffirError: ``template`` is not such a preset, so there is no task to replace.
    """
    for preset in PROMPT_PRESETS.values():
        head, slot, tail = preset.partition("{task}")
        if slot and re.fullmatch(re.escape(head) + ".*" + re.escape(tail), template, re.DOTALL):
            return preset.replace("{task}", task)
    raise EffirError(f"--task: the query prompt {template!r} has no task to replace; give the whole prompt with "
                     "--query-prompt (a preset such as e5, or a template with {task} and {text})")


QUERY_ONLY_SETTINGS = ("query_template", "query_max_length")
# settings that enter a fingerprint only when set, so models without a head or truncation keep the identity (and
# the cached corpus embeddings) they had before these settings existed
UNSET_SETTINGS = {"head": [], "truncate_dim": None}


def fingerprint(encoder: Encoder | AsymmetricEncoder, documents_only: bool = False) -> str:
    """A short, stable identity for a loaded model: config, structure, embedding settings and the weights.

    The weights enter through a strided sample of every tensor (first/last elements plus a stride of 4096), so two
    fine-tunes of the same architecture differ, while hashing stays fast for 7B models. The load dtype does not
    enter: the config's dtype is left out and the samples are rounded to bf16, so `effir analyze` on a GPU (bf16)
    and `effir drop` on a CPU (fp32) see the same model. ``documents_only`` leaves out the settings that only
    change queries (the key of cached corpus embeddings: a new query prompt must not re-encode the corpus). A
    query-side model's documents are its document route's, so their key is the parent's.
    """
    if isinstance(encoder, AsymmetricEncoder):
        if documents_only:
            return fingerprint(encoder.route("document"), documents_only=True)
        both = "|".join(fingerprint(encoder.route(side)) for side in ("query", "document"))
        return hashlib.sha256(both.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    config = {k: v for k, v in encoder.model.config.to_diff_dict().items() if k not in ("dtype", "torch_dtype")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(json.dumps(encoder.meta.get("structure"), sort_keys=True).encode())
    settings = {k: v for k, v in encoder.settings.to_dict().items()
                if not (documents_only and k in QUERY_ONLY_SETTINGS) and UNSET_SETTINGS.get(k, ...) != v}
    h.update(json.dumps(settings, sort_keys=True).encode())
    with torch.no_grad():
        for name, tensor in sorted(encoder.model.state_dict().items()) + head_digest_items(encoder.head):
            flat = tensor.detach().reshape(-1)
            sample = torch.cat([flat[:8], flat[-8:], flat[:: max(1, flat.numel() // 4096)]])
            sample = sample.to(torch.bfloat16).float().cpu() if sample.is_floating_point() else sample.float().cpu()
            h.update(name.encode())
            h.update(str(tuple(tensor.shape)).encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def save(encoder: Encoder, out: str | os.PathLike, stage: dict | None = None, overwrite: bool = False) -> Path:
    """Save ``encoder`` as an effir model folder: HF ``config.json`` + safetensors + tokenizer + ``effir.json``.

    A structurally compressed model (dropped sub-layers, narrowed MLPs) also gets its structure in ``effir.json``
    (read back from the modules, the source of truth, and mirrored into ``encoder.meta["structure"]``), and a
    self-contained ``modeling_effir.py`` plus ``auto_map`` / ``effir_structure`` entries in ``config.json``, so
    ``transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)`` rebuilds it without effir; its
    ``model_type`` becomes ``"effir"`` (the base one kept in ``effir_base_model_type``), so a load without
    ``trust_remote_code`` is refused rather than filled with random weights.

    The folder is written under a temporary name and renamed at the end, so an interrupted save never leaves a
    folder that looks complete. ``stage`` (e.g. ``{"stage": "drop", "mlp": [3, 7]}``) is appended to the history.

    Raises:
        EffirError: ``out`` already holds something and ``overwrite`` is false.
    """
    quiet_transformers()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EffirError(f"{out} exists and is not a directory; choose another --output")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise EffirError(f"{out} already exists and is not empty; pass --overwrite or choose another --output")
    structure = structure_of(encoder.model, encoder.adapter)
    full_width = getattr(encoder.model.config, encoder.adapter.intermediate_key)
    structure = structure if is_compressed(structure, full_width) else None
    history = list(encoder.meta.get("history", [])) + ([stage] if stage else [])
    with atomic_path(out) as tmp:
        tmp.mkdir()
        encoder.model.save_pretrained(tmp)
        encoder.tokenizer.save_pretrained(tmp)
        if encoder.head is not None:  # the Dense modules ride along unchanged: stages never touch them
            save_head(encoder.head, tmp)
        if structure:
            add_remote_code(tmp, encoder.adapter, structure)
        st_export = write_sentence_transformers_files(tmp, encoder)  # SentenceTransformer(out) embeds as effir does
        if not st_export["exported"]:  # said at the stage that writes the folder, not only recorded in effir.json
            print(f"effir: WARNING: {out} gets no sentence-transformers files: {st_export['reason']}", file=sys.stderr)
        meta = {
            "format": FORMAT_VERSION,
            "weights_sha256": weights_digest(tmp, encoder.settings.head),
            "effir_version": __version__,
            "model_type": encoder.model.config.model_type,
            "family": encoder.adapter.family,
            "embedding": encoder.settings.to_dict(),
            "parameters": count_parameters(encoder.model, encoder.adapter),
            "history": history,
            "sentence_transformers": st_export,
        }
        optional = {"source_prompts": encoder.meta.get("source_prompts"), "structure": structure,
                    "sparsity": checked_record(encoder.model, encoder.adapter, encoder.meta, str(out))}  # N:M zeros
        meta.update({k: v for k, v in optional.items() if v})
        (tmp / EFFIR_JSON).write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks the folder complete
    encoder.meta = {**{k: v for k, v in encoder.meta.items() if k not in ("structure", "sparsity")},
                    "history": history, "parameters": meta["parameters"],
                    **{k: meta[k] for k in ("structure", "sparsity") if k in meta}}
    return out


