"""sentence-transformers files for an effir model folder: ``SentenceTransformer(folder)`` then embeds as effir does.

:func:`write_sentence_transformers_files` runs inside :func:`effir.checkpoint.save`, on the folder being written,
after the weights and the tokenizer. It adds what sentence-transformers (ST) 6 itself writes for an equivalent model:

- ``modules.json``: Transformer (the folder root) -> Pooling (``1_Pooling``) -> the Dense modules of a
  sentence-transformers source (``2_Dense``, ...: :func:`effir.checkpoint.save` writes their folders unchanged) ->
  Normalize (``2_Normalize``, numbered after the Dense modules, only when effir normalises);
- ``sentence_bert_config.json``: the token budgets. ST truncates ``encode_query`` to ``query_length`` and
  ``encode_document`` to ``document_length`` (keys of ST >= 6.0; ST 5.x raises a TypeError on them, so these folders
  need ST 6). A plain ``encode`` call names no side, so ``max_seq_length`` is the *document* budget there;
- ``config_sentence_transformers.json``: ``prompts`` {"query", "document"} = effir's templates up to ``{text}``, next to
  the other named prompts of a sentence-transformers source (``web_search_query``, ...) and its
  ``default_prompt_name``, so a compressed folder offers what its source offered; ``truncate_dim`` when set;
- ``1_Pooling/config.json``: effir's pooling with ``include_prompt: true`` (effir pools over prompt tokens too);
- in ``tokenizer_config.json``: a pad token (EOS, as effir falls back to) when there is none, and right padding.

Two things ST cannot be told through its own config:

- **EOS.** effir's last-token recipe appends EOS to every input; ST tokenises with the folder's tokenizer only. So
  the saved ``tokenizer.json`` gets a post-processor that appends EOS: a ``TemplateProcessing`` one (a BOS template
  as in Llama / Mistral, or Qwen's) gets EOS added to its templates, any other is followed by one. Nothing is
  edited when the tokenizer already appends an end token (EOS, or a pad token as Qwen3-Embedding's does): effir
  then appends none either.
  The tokenizers library counts post-processor tokens when it truncates, so a long text keeps ``max_length - 1``
  tokens plus EOS, exactly as effir truncates. effir's own :class:`~effir.encoder.Encoder` sees that the tokenizer
  already appends EOS and does not add a second one, so effir's token ids are unchanged. The edit is checked by
  reloading the saved tokenizer; if it does not reproduce effir's ids, the tokenizer files are restored and the
  ST files are not written.
- **A template with text after** ``{text}`` (ST prompts are prefixes only).

When the ST files cannot be written, the function says why; ``save`` prints that as a warning on stderr and
records it in ``effir.json`` under ``sentence_transformers`` (``{"exported": false, "reason": ...}``), so a folder
without ``modules.json`` explains itself. Compressed folders load with
``SentenceTransformer(folder, trust_remote_code=True)``: ST passes ``trust_remote_code`` on to ``AutoConfig`` /
``AutoModel``, which run the folder's ``modeling_effir.py``; without it they refuse to load (``model_type: "effir"``).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from .encoder import appended_end_token

ST_POOLING = {"last": "lasttoken", "mean": "mean", "cls": "cls"}
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling",
            "2_Normalize")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Probe texts for checking the edited tokenizer: a short one, and one far longer than the probe budget.
_PROBES = ("Paris is the capital of France.", " ".join(["the river water is blue and a fish is in it."] * 20))
_PROBE_MAX_LENGTH = 9


def write_sentence_transformers_files(folder: str | Path, encoder) -> dict:
    """Make ``folder`` (an effir model folder being saved) loadable by sentence-transformers with effir's embeddings.

    Args:
        folder: the folder; it already holds the HF weights, ``config.json`` and the tokenizer files.
        encoder: the :class:`~effir.encoder.Encoder` being saved (its settings and tokenizer).

    Returns:
        What ``effir.json`` records under ``sentence_transformers``: ``{"exported": True, "prompts": ...,
        "tokenizer_appends_eos": ...}``, or ``{"exported": False, "reason": "..."}`` when ST cannot reproduce effir's
        embeddings (nothing ST-specific is then written and the tokenizer files are as the tokenizer saved them).
    """
    folder = Path(folder)
    s = encoder.settings
    prompts = {}
    for side, template in (("query", s.query_template), ("document", s.document_template)):
        prefix, _, suffix = template.partition("{text}")
        if suffix:
            return {"exported": False, "reason": f"the {side} template {template!r} has text after {{text}}; "
                                                 "sentence-transformers prompts can only be prefixes"}
        prompts[side] = prefix
    if s.pooling not in ST_POOLING:
        return {"exported": False, "reason": f"pooling {s.pooling!r} has no sentence-transformers equivalent"}
    edit = s.append_eos and appended_end_token(encoder.tokenizer) is None
    if edit:
        reason = _append_eos_in_tokenizer(folder, encoder.tokenizer)
        if reason:
            return {"exported": False, "reason": reason}
    _tidy_tokenizer_config(folder, encoder.tokenizer)
    _write_st_config(folder, encoder, prompts)
    return {"exported": True, "prompts": prompts, "tokenizer_appends_eos": edit}


# -- tokenizer ------------------------------------------------------------------------------------------------------
def _append_eos_in_tokenizer(folder: Path, tokenizer) -> str | None:
    """Give the saved tokenizer a post-processor that appends EOS; ``None`` on success, else why not (files restored)."""
    path = folder / "tokenizer.json"
    if not path.exists():
        return "the tokenizer has no tokenizer.json, so EOS cannot be appended for sentence-transformers"
    backup = {name: (folder / name).read_text() for name in _TOKENIZER_FILES if (folder / name).exists()}
    data = json.loads(backup["tokenizer.json"])
    data["post_processor"] = _appending_eos(data.get("post_processor"), tokenizer.eos_token, tokenizer.eos_token_id)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2))
    config_path = folder / "tokenizer_config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        # transformers 5 rebuilds the post-processor from these flags when either is present; keep them in step
        if "add_bos_token" in config or "add_eos_token" in config:
            config["add_eos_token"] = True
            config_path.write_text(json.dumps(config, indent=2) + "\n")
    try:
        reloaded = type(tokenizer).from_pretrained(str(folder))
        ok = all(reloaded(text, truncation=True, max_length=n)["input_ids"] == _effir_ids(tokenizer, text, n)
                 for text in _PROBES for n in (_PROBE_MAX_LENGTH, 512))
    except Exception as e:  # any failure to reload means the edit is not usable; say so rather than crash the save
        ok, why = False, f"{type(e).__name__}: {e}"
    else:
        why = "the reloaded tokenizer's ids differ from effir's"
    if ok:
        return None
    for name, text in backup.items():
        (folder / name).write_text(text)
    return f"could not make the saved tokenizer append EOS ({why}); sentence-transformers would embed differently"


def _appending_eos(post: dict | None, eos: str, eos_id: int) -> dict:
    """A post-processor (tokenizer.json form) doing what ``post`` does and then appending ``eos`` to each sequence.

    A ``TemplateProcessing`` (alone or inside a ``Sequence``) gets EOS in its own templates: a second template
    chained after it in a ``Sequence`` adds nothing (tokenizers 0.23: ``<s> $A`` then ``$A </s>`` gives no ``</s>``).
    """
    special = {"id": eos, "ids": [eos_id], "tokens": [eos]}
    if post is None:
        post = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {}}
    if post.get("type") == "Sequence":
        procs = list(post["processors"])
        templates = [i for i, p in enumerate(procs) if p.get("type") == "TemplateProcessing"]
        if templates:
            procs[templates[-1]] = _appending_eos(procs[templates[-1]], eos, eos_id)
        else:
            procs.append(_appending_eos(None, eos, eos_id))
        return {**post, "processors": procs}
    if post.get("type") != "TemplateProcessing":  # ByteLevel, BertProcessing, ...: run it, then append EOS
        return {"type": "Sequence", "processors": [post, _appending_eos(None, eos, eos_id)]}
    single = post["single"] + [{"SpecialToken": {"id": eos, "type_id": 0}}]
    pair = list(post["pair"])
    a_end = max(i for i, item in enumerate(pair) if item.get("Sequence", {}).get("id") == "A")
    pair = pair[:a_end + 1] + [{"SpecialToken": {"id": eos, "type_id": 0}}] + pair[a_end + 1:]
    pair.append({"SpecialToken": {"id": eos, "type_id": 1}})
    return {**post, "single": single, "pair": pair, "special_tokens": {**post.get("special_tokens", {}), eos: special}}


def _effir_ids(tokenizer, text: str, max_length: int) -> list[int]:
    """The ids effir feeds the model: truncate to ``max_length - 1``, then append EOS (as Encoder.token_ids does)."""
    ids = tokenizer(text, truncation=True, max_length=max_length - 1)["input_ids"]
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


def _tidy_tokenizer_config(folder: Path, tokenizer) -> None:
    """ST pads with the tokenizer: it needs a pad token (effir falls back to EOS) and right padding.

    Right padding keeps positions 0..n-1 for every text, as effir's explicit ``position_ids`` do; left padding
    would shift them for models without relative positions.
    """
    path = folder / "tokenizer_config.json"
    if not path.exists():
        return
    config = json.loads(path.read_text())
    changed = False
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        config["pad_token"], changed = str(tokenizer.eos_token), True
    if config.get("padding_side", "right") != "right":
        config["padding_side"], changed = "right", True
    if changed:
        path.write_text(json.dumps(config, indent=2) + "\n")


# -- sentence-transformers config files ------------------------------------------------------------------------------
def _write_st_config(folder: Path, encoder, prompts: dict) -> None:
    s = encoder.settings
    modules = [("", "sentence_transformers.base.modules.transformer.Transformer"),
               ("1_Pooling", "sentence_transformers.sentence_transformer.modules.pooling.Pooling")]
    modules += [(path, "sentence_transformers.base.modules.dense.Dense") for path in s.head]
    if s.normalize:
        modules.append((f"{len(modules)}_Normalize", "sentence_transformers.base.modules.normalize.Normalize"))
    _dump(folder / "modules.json", [{"idx": i, "name": str(i), "path": path, "type": kind}
                                    for i, (path, kind) in enumerate(modules)])
    _dump(folder / "sentence_bert_config.json", {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
        # encode_query / encode_document truncate to these; a plain encode() names no side and gets max_seq_length,
        # the document budget (ST has a single budget outside the two side-specific calls)
        "query_length": s.query_max_length,
        "document_length": s.document_max_length,
        "max_seq_length": s.document_max_length,
        "do_lower_case": False,
    })
    source = encoder.meta.get("source_prompts") or {}
    named = {**source.get("prompts", {}), **prompts}  # effir's query/document prompts win over the source's
    default_name = source.get("default_prompt_name")
    _dump(folder / "config_sentence_transformers.json", {
        "__version__": _versions(),
        "model_type": "SentenceTransformer",
        "prompts": named,
        "default_prompt_name": default_name if default_name in named else None,
        "similarity_fn_name": "cosine" if s.normalize or s.similarity == "cosine" else "dot",
        **({"truncate_dim": s.truncate_dim} if s.truncate_dim else {}),
    })
    _dump(folder / "1_Pooling" / "config.json", {
        "embedding_dimension": encoder.model.config.hidden_size,  # what pooling gives, before any Dense module
        "pooling_mode": ST_POOLING[s.pooling],
        "include_prompt": True,  # effir pools over the prompt tokens too
    })
    if s.normalize:
        _dump(folder / modules[-1][0] / "config.json",
              {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})


def _versions() -> dict:
    import torch

    out = {"pytorch": torch.__version__}
    for key, dist in (("sentence_transformers", "sentence-transformers"), ("transformers", "transformers")):
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
