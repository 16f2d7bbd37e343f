"""What a sentence-transformers folder says about how it embeds, as effir's :class:`EmbeddingSettings`.

A retriever usually arrives as a sentence-transformers (ST) folder. Without an ``effir.json``, effir embeds it as
``SentenceTransformer(folder).encode_query`` / ``encode_document`` do (ST 6), reading:

- ``modules.json``: Transformer -> Pooling -> ``Dense`` modules (the head, :mod:`effir.head`; none or several) ->
  Normalize (optional), in that order. Any other module (LayerNorm, Router, ...) or order changes the embedding in
  a way effir cannot reproduce: an error, never a silently different embedding;
- ``1_Pooling/config.json``: ``pooling_mode`` (ST 6, a string or a one-element list) or the legacy
  ``pooling_mode_*`` booleans (none set means mean, as ST reads them); ``lasttoken`` / ``mean`` / ``cls``;
- ``config_sentence_transformers.json`` ``prompts``: the ``query`` prompt for queries; for documents the
  ``document`` prompt, else ``passage`` (older folders name their document prompt so; ST 6's ``encode_document``
  ignores it, so effir says which one it used). A folder with task prompts (``web_search_query``, ...) but no
  ``query`` prompt embeds queries without a prompt, as ``encode_query`` does, with a one-line notice naming them;
  ``prompt_name`` picks one;
- ``sentence_bert_config.json``: ``query_length`` / ``document_length`` (ST 6) or ``max_seq_length`` (else the
  tokenizer's ``model_max_length``, as ST reads it), capped at
  :data:`MAX_LENGTH_CAP` and at the model's ``max_position_embeddings`` (ST caps there too), with a notice when
  capped; ``do_lower_case`` is accepted where the tokenizer lowercases by itself;
- ``config_sentence_transformers.json`` ``truncate_dim`` (Matryoshka): kept, applied after Normalize as ST does;
- ``similarity_fn_name`` (cosine when absent, as ST reads it): how retrieval scores, which matters for folders
  without Normalize;
- EOS: never appended by effir (``append_eos`` off): the folder's tokenizer decides, as in ST, whether an end
  token (EOS, or a pad token as in Qwen3-Embedding) closes every text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .encoder import EmbeddingSettings
from .utils import EffirError

MAX_LENGTH_CAP = 8192
"""Longest token budget effir takes from a folder: 32k-token budgets (Qwen3-Embedding) make one long document
cost minutes on a 7B model; pass --query-max-length / --document-max-length to go higher."""
ST_TO_EFFIR_POOLING = {"lasttoken": "last", "mean": "mean", "cls": "cls"}
_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
_KNOWN_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")


@dataclass
class FolderSettings:
    """Settings read from an ST folder, the named prompts it carries, and the notices to print once."""

    settings: EmbeddingSettings
    prompts: dict = field(default_factory=dict)
    """All named prompts of the folder (``query``, ``document``, task prompts), kept for the folders effir writes."""
    default_prompt_name: str | None = None
    notes: list[str] = field(default_factory=list)


def is_st_folder(folder: Path | None) -> bool:
    return folder is not None and (Path(folder) / "modules.json").is_file()


def read_st_folder(folder: Path, config, tokenizer, prompt_name: str | None = None) -> FolderSettings:
    """The embedding settings an ST folder describes (see the module docstring).

    Raises:
        EffirError: a file is unreadable, the folder holds a module or pooling effir cannot reproduce, or
            ``prompt_name`` is not one of its prompts.
    """
    folder = Path(folder)
    pooling, normalize, head = _modules(folder)
    st_config = _json(folder / "config_sentence_transformers.json") or {}
    prompts = {k: v for k, v in (st_config.get("prompts") or {}).items() if isinstance(v, str)}
    notes: list[str] = []
    query, document = _prompts(folder, prompts, prompt_name, notes)
    qlen, dlen = _lengths(folder, config, tokenizer, notes)
    similarity = _similarity(folder, st_config.get("similarity_fn_name"), normalize)
    settings = EmbeddingSettings(pooling=pooling, append_eos=False, normalize=normalize, similarity=similarity,
                                 query_template=query + "{text}", document_template=document + "{text}",
                                 query_max_length=qlen, document_max_length=dlen, head=head,
                                 truncate_dim=st_config.get("truncate_dim"))
    return FolderSettings(settings, prompts, st_config.get("default_prompt_name"), notes)


def _json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EffirError(f"{path} is not valid JSON ({e}); the sentence-transformers folder is damaged") from None


def _modules(folder: Path) -> tuple[str, bool, list[str]]:
    """``(pooling, normalize, Dense module paths)`` from ``modules.json`` and the Pooling module's config."""
    modules = _json(folder / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise EffirError(f"{folder / 'modules.json'} is not a list of modules; the folder is damaged")
    types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unknown = sorted({t for t in types if t not in _KNOWN_MODULES})
    if unknown:
        raise EffirError(f"{folder} has sentence-transformers module(s) {unknown} that effir cannot reproduce "
                         f"(it embeds with {', '.join(_KNOWN_MODULES)} only); effir would embed differently")
    if "Pooling" not in types:
        raise EffirError(f"{folder / 'modules.json'} has no Pooling module; effir needs one to know how to pool")
    dense = types.count("Dense")
    expected = ["Transformer", "Pooling"] + ["Dense"] * dense + ["Normalize"] * ("Normalize" in types)
    if types != expected:
        raise EffirError(f"{folder / 'modules.json'} chains {types}; effir reproduces Transformer, Pooling, Dense "
                         "(any number), Normalize (optional) in that order only")
    cfg = _json(folder / modules[1].get("path", "") / "config.json") or {}
    mode = cfg.get("pooling_mode")
    if mode is None:  # the legacy booleans; none set means mean, as sentence-transformers reads them
        mode = [m for key, m in _LEGACY_POOLING.items() if cfg.get(key)] or ["mean"]
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in ST_TO_EFFIR_POOLING:
        raise EffirError(f"{folder} pools with {modes}; effir reproduces one of "
                         f"{', '.join(ST_TO_EFFIR_POOLING)} only")
    pooling = ST_TO_EFFIR_POOLING[modes[0]]
    if cfg.get("include_prompt") is False and pooling != "last":
        raise EffirError(f"{folder} pools {modes[0]} without the prompt tokens (include_prompt: false); effir pools "
                         "over the whole input and would embed differently")
    return pooling, "Normalize" in types, [m.get("path", "") for m in modules[2:2 + dense]]


def _similarity(folder: Path, name: str | None, normalize: bool) -> str:
    """effir's retrieval score for ST's ``similarity_fn_name`` (ST scores by cosine when the folder names none)."""
    name = name or "cosine"
    if name in ("cosine", "dot", "dot_product"):
        return "cosine" if name == "cosine" else "dot"
    if name == "euclidean" and normalize:  # on unit vectors, distance ranks as cosine does
        return "cosine"
    raise EffirError(f"{folder} scores by {name!r} similarity; effir ranks by cosine or dot product only")


def _prompts(folder: Path, prompts: dict, prompt_name: str | None, notes: list[str]) -> tuple[str, str]:
    """``(query prefix, document prefix)``; the rule is in the module docstring."""
    if prompt_name is not None:
        if prompt_name not in prompts:
            raise EffirError(f"--prompt-name {prompt_name!r} is not a prompt of {folder}; its prompts are "
                             f"{sorted(prompts) or 'none'}")
        query = prompts[prompt_name]
    else:
        query = prompts.get("query", "")
        tasks = sorted(k for k, v in prompts.items() if v and k not in ("query", "document", "passage"))
        if "query" not in prompts and tasks:
            notes.append(f"{folder} has no 'query' prompt but task prompts {tasks}; queries get no prompt (as "
                         "sentence-transformers' encode_query gives them); pick one with --prompt-name NAME")
    if "document" in prompts:
        return query, prompts["document"]
    if prompts.get("passage"):
        notes.append(f"{folder} names its document prompt 'passage'; effir prompts documents with it "
                     f"({prompts['passage']!r}); sentence-transformers 6's encode_document would not")
    return query, prompts.get("passage", "")


def _lengths(folder: Path, config, tokenizer, notes: list[str]) -> tuple[int, int]:
    """Per-side token budgets from ``sentence_bert_config.json``, capped (see :data:`MAX_LENGTH_CAP`)."""
    cfg = _json(folder / "sentence_bert_config.json") or {}
    # ST lowercases inputs for do_lower_case; effir feeds texts as they are, which is the same only when the
    # tokenizer lowercases by itself (uncased BERT vocabularies such as bge's do)
    if cfg.get("do_lower_case") and tokenizer("A Fish")["input_ids"] != tokenizer("a fish")["input_ids"]:
        raise EffirError(f"{folder} lowercases inputs (do_lower_case: true) but its tokenizer does not; effir would "
                         "embed differently")
    default = EmbeddingSettings()
    positions = getattr(config, "max_position_embeddings", None) or MAX_LENGTH_CAP
    cap = min(MAX_LENGTH_CAP, positions)
    out, capped = [], {}
    for side, key, fallback in (("query", "query_length", default.query_max_length),
                                ("document", "document_length", default.document_max_length)):
        # ST 6 saves no max_seq_length when it equals the tokenizer's model_max_length, which ST then uses
        want = cfg.get(key) or cfg.get("max_seq_length") or getattr(tokenizer, "model_max_length", None)
        if not isinstance(want, int) or want < 2:
            want = fallback
        elif want > cap:
            capped[side] = want
        out.append(min(want, cap))
    if capped:
        said = ", ".join(f"{n if n < 10 ** 9 else 'unlimited'} tokens per {side}" for side, n in capped.items())
        flags = " / ".join(f"--{side}-max-length" for side in capped)
        notes.append(f"{folder} allows {said}; effir caps that at {cap} (pass {flags} to change)")
    return out[0], out[1]
