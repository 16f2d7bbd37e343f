"""Encoder = HF backbone + pooling + L2 normalisation + query/document prompts; ``encode_*`` turn text into vectors.

The embedding recipe (pooling, prompts, max lengths, EOS) is a small dataclass, :class:`EmbeddingSettings`, saved in
``effir.json`` next to the weights so a compressed model embeds exactly as it was trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
from tqdm.auto import tqdm

from .arch import ArchAdapter
from .head import Head, check_paths
from .utils import EffirError

DEFAULT_TASK = "Given a query, retrieve relevant passages that answer the query."

# Query prompt presets; ``{task}`` is filled at resolve time, ``{text}`` at encode time.
PROMPT_PRESETS = {
    "effir": "<instruct>{task}\n<query>{text}",  # the paper's released eval script
    "e5": "Instruct: {task}\nQuery: {text}",  # E5-Mistral / many MTEB LLM embedders
    "none": "{text}",
}
POOLINGS = ("last", "mean", "cls")
SIMILARITIES = ("dot", "cosine")


@dataclass
class EmbeddingSettings:
    """How texts become vectors. Saved in ``effir.json``; every field has a default per architecture family."""

    pooling: str = "last"
    """``last`` (final hidden state of the last non-pad token), ``mean`` over non-pad tokens, or ``cls``."""
    append_eos: bool = True
    """Append the tokenizer's EOS token before pooling (decoder LLMs; the last-token recipe needs it), unless the
    tokenizer already appends an end token itself. Off for sentence-transformers folders: their tokenizer decides."""
    normalize: bool = True
    """L2-normalise embeddings (scores are then cosine similarities)."""
    similarity: str = "dot"
    """How retrieval scores a query against a document: ``dot`` (inner product) or ``cosine``. They agree on
    normalised embeddings; a sentence-transformers folder without Normalize scores by its ``similarity_fn_name``
    (cosine unless it says otherwise), and so does effir for it."""
    query_template: str = PROMPT_PRESETS["effir"].replace("{task}", DEFAULT_TASK)
    """Query prompt with a ``{text}`` slot."""
    document_template: str = "{text}"
    """Document prompt with a ``{text}`` slot (unprompted by default, as in the paper)."""
    query_max_length: int = 128
    """Token budget for queries (prompt included)."""
    document_max_length: int = 512
    """Token budget for documents; the paper uses 512."""
    head: list[str] = field(default_factory=list)
    """Folders of the sentence-transformers ``Dense`` modules applied after pooling, before normalisation, in
    order (``["2_Dense", "3_Dense"]``; see :mod:`effir.head`); empty for none. Their weights live in those
    folders, next to the model's, and the :class:`Encoder` holds them as ``head``."""
    truncate_dim: int | None = None
    """Keep the first ``truncate_dim`` dimensions (Matryoshka), after normalisation and without renormalising, as
    sentence-transformers' ``truncate_dim`` does; ``None`` keeps them all."""

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise EffirError(f"unknown pooling {self.pooling!r}; use one of {', '.join(POOLINGS)}")
        if self.similarity not in SIMILARITIES:
            raise EffirError(f"unknown similarity {self.similarity!r}; use one of {', '.join(SIMILARITIES)}")
        for name in ("query_template", "document_template"):
            if "{text}" not in getattr(self, name):
                raise EffirError(f"{name} {getattr(self, name)!r} has no {{text}} slot")
        if self.query_max_length < 2 or self.document_max_length < 2:
            raise EffirError("query_max_length and document_max_length must be at least 2")
        if self.truncate_dim is not None and (not isinstance(self.truncate_dim, int) or self.truncate_dim < 1):
            raise EffirError(f"truncate_dim must be a positive integer, not {self.truncate_dim!r}")
        check_paths(self.head)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EmbeddingSettings:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise EffirError(f"unknown embedding setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def prompt_template(preset_or_template: str, task: str = DEFAULT_TASK) -> str:
    """A preset name (``effir``, ``e5``, ``none``) or a literal template with ``{text}`` -> a template."""
    template = PROMPT_PRESETS.get(preset_or_template, preset_or_template)
    if "{text}" not in template:
        raise EffirError(
            f"prompt {preset_or_template!r} is neither a preset ({', '.join(PROMPT_PRESETS)}) nor a template "
            "containing {text}"
        )
    return template.replace("{task}", task)


def default_settings(adapter: ArchAdapter) -> EmbeddingSettings:
    """Paper defaults for decoder LLMs; for encoders, mean pooling and no prompt (folders that are not
    sentence-transformers folders: those say how they embed, see :mod:`effir.stfolder`)."""
    if adapter.is_decoder:
        return EmbeddingSettings()
    return EmbeddingSettings(pooling="mean", append_eos=False, query_template="{text}",
                             query_max_length=128, document_max_length=256)


def appended_end_token(tokenizer) -> int | None:
    """The special token the tokenizer itself puts after every text (its post-processor), or ``None``.

    Usually EOS, but not always: Qwen3-Embedding's tokenizer appends its pad token ``<|endoftext|>``, while its
    ``eos_token`` is ``<|im_end|>``. Pooling the last token then already sees an end token; adding EOS would double it.
    """
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    last = with_special[-1] if with_special else None
    if last is None or last not in tokenizer.all_special_ids or with_special[-1:] == without[-1:]:
        return None
    return last


def tokenizer_appends_eos(tokenizer) -> bool:
    """True when ``tokenizer`` itself ends every encoded text with its EOS token (a post-processor adds it)."""
    return tokenizer.eos_token_id is not None and appended_end_token(tokenizer) == tokenizer.eos_token_id


def document_text(doc) -> str:
    """BEIR documents are ``title + " " + text`` (the paper's convention); plain strings pass through."""
    if isinstance(doc, str):
        return doc
    title, text = doc.get("title") or "", doc.get("text") or ""
    return f"{title} {text}".strip() if title else text


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states ``(B, L, H)`` with ``mask`` ``(B, L)`` into ``(B, H)``.

    ``last`` takes the last non-pad position, found from the mask, so it is right under left *and* right padding.
    """
    if pooling == "last":
        length = mask.shape[1]
        last = length - 1 - mask.flip(dims=[1]).int().argmax(dim=1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if pooling == "cls":
        first = mask.int().argmax(dim=1)  # first non-pad position (0 under right padding)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    raise EffirError(f"unknown pooling {pooling!r}")


class Encoder:
    """A backbone that embeds queries and documents. Build one with :func:`effir.load`.

    Attributes:
        model: the headless HF model (``AutoModel``), possibly structurally compressed.
        tokenizer: its tokenizer.
        settings: the :class:`EmbeddingSettings`.
        adapter: the :class:`~effir.arch.ArchAdapter` of ``model``.
        meta: the model's ``effir.json`` content (or ``{}``), and ``reference``/``path`` of where it came from.
        head: the sentence-transformers Dense modules after pooling (:class:`~effir.head.Head`), or ``None``.
    """

    def __init__(self, model, tokenizer, settings: EmbeddingSettings, adapter: ArchAdapter, meta: dict | None = None,
                 padding_side: str = "right", head: Head | None = None):
        # the settings name the head's folders; an encoder built without its head would embed in another space
        if list(settings.head) != (head.paths if head is not None else []):
            raise EffirError(f"the embedding settings name Dense modules {settings.head} but the encoder was given "
                             f"{head.paths if head is not None else 'none'}")
        self.model = model
        self.head = head
        self.tokenizer = tokenizer
        self.settings = settings
        self.adapter = adapter
        self.meta = meta or {}
        if padding_side not in ("left", "right"):
            raise EffirError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        self.padding_side = padding_side
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            self.pad_id = 0
        if settings.append_eos and tokenizer.eos_token_id is None:
            raise EffirError("append_eos is set but the tokenizer has no EOS token; set append_eos: false")

    def route(self, side: str) -> Encoder:
        """The encoder that embeds ``side`` (``query`` or ``document``): this one (see :class:`AsymmetricEncoder`)."""
        _check_side(side)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dim(self) -> int:
        full = self.head.out_features if self.head is not None else self.model.config.hidden_size
        return min(full, self.settings.truncate_dim or full)

    # -- tokenisation -------------------------------------------------------------------------------------------
    def format(self, texts: Sequence, side: str) -> list[str]:
        template = self.settings.query_template if side == "query" else self.settings.document_template
        return [template.replace("{text}", document_text(t)) for t in texts]

    def tokenize(self, texts: Sequence[str], side: str) -> dict[str, torch.Tensor]:
        """Prompt, tokenize, truncate, append EOS and pad ``texts`` (already side-specific) into tensors."""
        return self._pad(self.token_ids(texts, side))

    def token_ids(self, texts: Sequence, side: str) -> list[list[int]]:
        """Prompted, truncated token ids (EOS appended when the settings say so), unpadded."""
        max_len = self.settings.query_max_length if side == "query" else self.settings.document_max_length
        # A tokenizer that appends an end token itself (EOS as in folders effir exports for sentence-transformers,
        # or a pad token as Qwen3-Embedding's) already keeps room for it when truncating and gets no second one;
        # otherwise truncate one short and append EOS below.
        eos = self.settings.append_eos and self._appended_end_token() is None
        ids = self.tokenizer(self.format(texts, side), add_special_tokens=True, truncation=True,
                             max_length=max_len - int(eos), padding=False)["input_ids"]
        if eos:
            eos_id = self.tokenizer.eos_token_id
            ids = [seq if seq and seq[-1] == eos_id else seq + [eos_id] for seq in ids]
        return ids

    def _appended_end_token(self) -> int | None:
        """:func:`appended_end_token`, probed once per tokenizer object (tokenize is on the hot path)."""
        if getattr(self, "_eos_probe", (None,))[0] is not self.tokenizer:
            self._eos_probe = (self.tokenizer, appended_end_token(self.tokenizer))
        return self._eos_probe[1]

    def _pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(s) for s in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, seq in enumerate(ids):
            span = slice(width - len(seq), width) if self.padding_side == "left" else slice(0, len(seq))
            input_ids[i, span] = torch.tensor(seq, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    # -- forward ------------------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Differentiable embeddings ``(B, H)`` of a tokenized batch (training uses this directly)."""
        # Explicit positions make left padding give the same states as right padding.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        emb = pool(out.last_hidden_state, attention_mask, self.settings.pooling)
        if self.head is not None:  # sentence-transformers' order: Pooling -> Dense... -> Normalize -> truncation
            emb = self.head(emb)
        if self.settings.normalize:
            emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        if self.settings.truncate_dim:
            emb = emb[..., :self.settings.truncate_dim]  # (B, truncate_dim)
        return emb

    @torch.inference_mode()
    def encode(self, texts: Sequence, side: str, batch_size: int = 32, show_progress: bool = False,
               desc: str | None = None) -> torch.Tensor:
        """Embed ``texts`` as ``side`` (``query`` or ``document``) -> float32 CPU tensor ``(N, H)`` in input order.

        All texts are tokenized first and batches are formed in order of *token* count (longest first), so padding
        is minimal (sorting by characters, as sentence-transformers does, pads more); the order is restored at the end.
        """
        _check_side(side)
        if batch_size < 1:
            raise EffirError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        if not texts:
            return out
        self.model.eval()
        ids = self.token_ids(texts, side)
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        bar = tqdm(total=len(texts), desc=desc or f"encode {side}s", unit="text", disable=not show_progress,
                   leave=False)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = self._pad([ids[i] for i in idx])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out[idx] = self.embed(**batch).float().cpu()
            bar.update(len(idx))
        bar.close()
        return out

    def encode_queries(self, queries: Iterable[str], batch_size: int = 32, show_progress: bool = False):
        return self.encode(list(queries), "query", batch_size, show_progress)

    def encode_documents(self, documents: Iterable, batch_size: int = 32, show_progress: bool = False):
        """``documents``: strings or BEIR dicts with ``title``/``text``."""
        return self.encode(list(documents), "document", batch_size, show_progress)


SIDES = ("query", "document")


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise EffirError(f"side must be 'query' or 'document', not {side!r}")


class AsymmetricEncoder:
    """Queries embedded by one model, documents by another: a compressed query encoder in front of the parent
    retriever whose document index already exists. Load one with :func:`effir.load` (a folder written by
    :func:`effir.asymmetric.save`).

    ``encode_documents`` is the document route's (the parent's) exactly; ``settings`` are the query route's query
    settings with the document route's document settings and scoring.

    Attributes:
        routes: ``{"query": Encoder, "document": Encoder}``.
        meta: the folder's ``effir.json`` content, and ``reference`` / ``path``.
    """

    def __init__(self, query: Encoder, document: Encoder, meta: dict | None = None):
        if query.dim != document.dim:
            raise EffirError(f"the query route embeds in {query.dim} dimensions and the document route in "
                             f"{document.dim}: their embeddings cannot be compared")
        if query.settings.normalize != document.settings.normalize:
            raise EffirError("the query and document routes must both normalise their embeddings, or neither")
        self.routes = {"query": query, "document": document}
        self.meta = meta or {}

    def route(self, side: str) -> Encoder:
        _check_side(side)
        return self.routes[side]

    @property
    def settings(self) -> EmbeddingSettings:
        query, document = self.routes["query"].settings, self.routes["document"].settings
        return EmbeddingSettings(**{**document.to_dict(), **{k: v for k, v in query.to_dict().items()
                                                            if k.startswith("query_")}})

    @property
    def device(self) -> torch.device:
        return self.routes["document"].device

    @property
    def dtype(self) -> torch.dtype:
        return self.routes["document"].dtype

    @property
    def dim(self) -> int:
        return self.routes["document"].dim

    def encode(self, texts: Sequence, side: str, batch_size: int = 32, show_progress: bool = False,
               desc: str | None = None) -> torch.Tensor:
        return self.route(side).encode(texts, side, batch_size, show_progress, desc)

    def encode_queries(self, queries: Iterable[str], batch_size: int = 32, show_progress: bool = False):
        return self.routes["query"].encode_queries(queries, batch_size, show_progress)

    def encode_documents(self, documents: Iterable, batch_size: int = 32, show_progress: bool = False):
        return self.routes["document"].encode_documents(documents, batch_size, show_progress)
