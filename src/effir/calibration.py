"""Calibration text for importance analysis: sources -> texts -> token batches.

A source is one of:
- ``wiki``: built-in English prose, ~105 Wikipedia articles from the test data shipped in the ``gensim`` wheel
  (the bz2 XML is parsed with the stdlib; gensim itself is never imported). Install it with
  ``pip install --no-deps gensim``.
- a ``.txt`` file (paragraphs separated by blank lines) or a ``.jsonl`` file (one record per line with a ``text``
  field, and optionally a ``title``);
- ``beir:DIR[:corpus|queries|both]`` (or a BEIR folder path): the corpus and/or queries of a BEIR folder. With
  ``both`` (the default) the query side draws from the queries and the document side from the corpus.

Texts become token batches in one of two ways:
- side ``text`` (LLM-Drop's recipe): texts are tokenized without special tokens, joined with ``"\\n\\n"`` and cut
  into blocks of exactly ``seq_len`` tokens;
- side ``query`` / ``document``: each text is encoded on its own, exactly as retrieval does (prompt template,
  per-side max length, EOS), through :meth:`effir.encoder.Encoder.tokenize`.
"""

from __future__ import annotations

import bz2
import functools
import html
import random
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import load_corpus, load_queries, read_jsonl
from .encoder import Encoder, document_text
from .files import package_file
from .utils import EffirError

WIKI_PACKAGE = "gensim"
WIKI_RELPATH = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SOURCE_HELP = "use 'wiki' (built-in English prose), a .txt or .jsonl file, or beir:DIR[:corpus|queries|both]"
BEIR_PARTS = ("corpus", "queries", "both")


@dataclass
class CalibrationTexts:
    """Texts drawn from one calibration source."""

    source: str
    """The source as the user wrote it."""
    queries: list[str]
    """Texts for the query side."""
    documents: list[str]
    """Texts for the document side; also the texts joined into blocks for the ``text`` side."""

    def for_side(self, side: str) -> list[str]:
        return self.queries if side == "query" else self.documents


def load_texts(source: str) -> CalibrationTexts:
    """Read a calibration source (see the module docstring) into lists of non-empty strings.

    Raises:
        EffirError: unknown source, missing file or folder, or no text in it.
    """
    source = str(source).strip()
    if source == "wiki":
        texts = wiki_articles()
        out = CalibrationTexts(source, texts, texts)
    elif source.startswith("beir:"):
        out = _beir_texts(source, *_split_beir(source[len("beir:"):]))
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            out = _beir_texts(source, path, "both")
        elif path.is_file():
            texts = _jsonl_texts(path) if path.suffix == ".jsonl" else _txt_texts(path)
            out = CalibrationTexts(source, texts, texts)
        elif path.suffix in (".txt", ".jsonl", ".json", ".text") or "/" in source or source.startswith("."):
            raise EffirError(f"calibration file {source!r} does not exist; {SOURCE_HELP}")
        else:
            raise EffirError(f"unknown calibration source {source!r}; {SOURCE_HELP}")
    if not out.queries or not out.documents:
        raise EffirError(f"calibration source {source!r} contains no text; {SOURCE_HELP}")
    return out


# -- built-in prose -----------------------------------------------------------------------------------------------
def wiki_path() -> Path:
    """The Wikipedia excerpt inside the installed gensim wheel, found without importing gensim."""
    return package_file(WIKI_PACKAGE, WIKI_RELPATH, "pip install --no-deps gensim (or pass --calibration FILE)",
                        what="the gensim wheel, which ships the built-in 'wiki' calibration text,")


@functools.lru_cache(maxsize=2)
def wiki_articles(path: Path | None = None) -> list[str]:
    """Plain-prose articles (main namespace, no redirects, markup stripped) from a MediaWiki XML dump (.bz2)."""
    path = path or wiki_path()
    articles = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if _tag(elem) != "page":
                continue
            ns = next((c.text for c in elem if _tag(c) == "ns"), "0")
            redirect = any(_tag(c) == "redirect" for c in elem)
            text_el = next((t for t in elem.iter() if _tag(t) == "text"), None)
            if ns == "0" and not redirect and text_el is not None and text_el.text:
                prose = strip_wiki_markup(text_el.text)
                if len(prose) >= 200:
                    articles.append(prose)
            elem.clear()
    return articles


def _tag(elem) -> str:
    return elem.tag.rsplit("}", 1)[-1]


_END_SECTIONS = re.compile(r"^==+\s*(See also|References|Notes|External links|Further reading|Bibliography|"
                           r"Sources|Footnotes|Citations)\s*==+\s*$", re.MULTILINE | re.IGNORECASE)
_INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\|)[\s\S])*?\|\}")
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_DROP_LINK = re.compile(r"^\s*:?\s*(File|Image|Category|Media|[a-z]{2,3}(-[a-z]+)?)\s*:", re.IGNORECASE)


def strip_wiki_markup(text: str) -> str:
    """Reasonable wikitext -> prose: drop templates, tables, refs, files, categories, headings and trailing
    reference sections; keep link texts; paragraphs are separated by blank lines."""
    m = _END_SECTIONS.search(text)
    text = text[:m.start()] if m else text
    text = re.sub(r"<!--[\s\S]*?-->", "", text)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>[\s\S]*?</ref>", "", text)
    text = re.sub(r"<(math|gallery|timeline|score|syntaxhighlight|source)[^>]*>[\s\S]*?</\1>", "", text)
    text = _repeat(_INNER_TEMPLATE, "", text)
    text = _repeat(_INNER_TABLE, "", text)
    text = _repeat(_INNER_LINK, _link_text, text)
    text = re.sub(r"\[(?:https?:)?//\S+\s+([^\]]*)\]", r"\1", text)  # [http://x label] -> label
    text = re.sub(r"\[(?:https?:)?//\S+\]", "", text)
    text = re.sub(r"<[^>]+>", "", text)  # remaining HTML tags (keep their content)
    text = text.replace("'''", "").replace("''", "")
    text = html.unescape(text)
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines()]
        lines = [re.sub(r"^[*#:;]+\s*", "", ln) for ln in lines if ln and not ln.startswith(("=", "|", "!", "{", "}"))]
        para = re.sub(r"[ \t]+", " ", " ".join(lines)).strip()
        para = re.sub(r"\(\s*[,;]?\s*\)", "", para).replace(" ,", ",").replace(" .", ".")
        if len(para) >= 40:
            paragraphs.append(para)
    return "\n\n".join(paragraphs)


def _repeat(pattern: re.Pattern, repl, text: str) -> str:
    """Apply ``pattern`` until nothing changes, so nested constructs are removed innermost first."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link_text(m: re.Match) -> str:
    inner = m.group(1)
    if _DROP_LINK.match(inner):
        return ""
    return inner.rsplit("|", 1)[-1]


# -- files and BEIR folders ---------------------------------------------------------------------------------------
def _txt_texts(path: Path) -> list[str]:
    raw = _read(path)
    return [p.strip() for p in re.split(r"\n\s*\n", raw) if p.strip()]


def _jsonl_texts(path: Path, what: str = "calibration file") -> list[str]:
    texts = []
    for n, record in read_jsonl(path, f"{what} not found"):
        if not isinstance(record.get("text"), str):
            raise EffirError(f"{what} {path} line {n} has no 'text' string field; each line must be "
                             '{"text": "..."}')
        text = document_text(record).strip()
        if text:
            texts.append(text)
    return texts


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes().count(b"\n", 0, e.start) + 1
        raise EffirError(f"calibration file {path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); re-save "
                         "it as UTF-8") from None


def _split_beir(spec: str) -> tuple[Path, str]:
    part = "both"
    head, sep, tail = spec.rpartition(":")
    if sep and tail in BEIR_PARTS:
        spec, part = head, tail
    elif sep and tail and not Path(spec).exists():
        raise EffirError(f"unknown BEIR part {tail!r} in beir:{spec}; use beir:DIR, beir:DIR:corpus, "
                         "beir:DIR:queries or beir:DIR:both")
    return Path(spec).expanduser(), part


def _beir_texts(source: str, folder: Path, part: str) -> CalibrationTexts:
    if not folder.is_dir():
        raise EffirError(f"BEIR folder {str(folder)!r} does not exist; {SOURCE_HELP}")
    queries = list(load_queries(folder / "queries.jsonl").values()) if part in ("queries", "both") else []
    corpus = [document_text(d) for d in load_corpus(folder / "corpus.jsonl").values()] if part != "queries" else []
    queries, corpus = [q for q in queries if q.strip()], [d for d in corpus if d.strip()]
    if part == "both":
        return CalibrationTexts(source, queries, corpus)
    texts = corpus if part == "corpus" else queries
    return CalibrationTexts(source, texts, texts)


# -- sampling and token batches -----------------------------------------------------------------------------------
def sample_texts(texts: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """``n`` texts chosen at random (seeded), in their original order; all of them when there are fewer."""
    if n >= len(texts):
        return list(texts)
    keep = sorted(random.Random(seed).sample(range(len(texts)), n))
    return [texts[i] for i in keep]


def token_blocks(tokenizer, texts: Sequence[str], samples: int, seq_len: int, seed: int = 0) -> list[list[int]]:
    """LLM-Drop-style blocks: shuffle ``texts`` (seeded), join them with ``"\\n\\n"`` and cut the token stream into
    up to ``samples`` blocks of exactly ``seq_len`` tokens. No special tokens are added (as in LLM-Drop's random
    windows). When the text is shorter than one block, the whole stream is one shorter block.
    """
    order = list(texts)
    random.Random(seed).shuffle(order)
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    need = samples * seq_len
    stream: list[int] = []
    for start in range(0, len(order), 32):  # tokenize a few texts at a time; stop once there are enough tokens
        for ids in tokenizer(order[start:start + 32], add_special_tokens=False)["input_ids"]:
            if ids:
                stream.extend((sep if stream else []) + ids)
        if len(stream) >= need:
            break
    blocks = [stream[i:i + seq_len] for i in range(0, min(len(stream), need) - seq_len + 1, seq_len)]
    if not blocks and stream:
        blocks = [stream]
    return blocks


def calibration_blocks(encoder: Encoder, texts: Sequence[str], samples: int, seq_len: int, *, seed: int,
                       source: str, verb: str) -> list[list[int]]:
    """:func:`token_blocks` of ``texts`` for ``effir VERB``, with ``seq_len`` capped at the model's
    max_position_embeddings; a note on stderr when ``source`` gives fewer than ``samples`` blocks.

    Raises:
        EffirError: ``source`` tokenizes to nothing.
    """
    max_pos = getattr(encoder.model.config, "max_position_embeddings", None) or seq_len
    seq_len = min(seq_len, max_pos)
    blocks = token_blocks(encoder.tokenizer, texts, samples, seq_len, seed=seed)
    if not blocks:
        raise EffirError(f"calibration source {source!r} tokenizes to nothing; give it real text")
    if len(blocks) < samples:
        print(f"effir {verb}: note: {source} gives {len(blocks)} block(s) of {seq_len} tokens (asked for {samples})",
              file=sys.stderr)
    return blocks


def block_batches(blocks: Sequence[list[int]], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded ``{"input_ids", "attention_mask"}`` batches ``(B, T)`` of token blocks."""
    for start in range(0, len(blocks), batch_size):
        chunk = blocks[start:start + batch_size]
        width = max(len(b) for b in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, b in enumerate(chunk):
            ids[i, :len(b)] = torch.tensor(b, dtype=torch.long)
            mask[i, :len(b)] = 1
        yield {"input_ids": ids, "attention_mask": mask}


def side_batches(encoder: Encoder, texts: Sequence[str], side: str, batch_size: int) -> Iterator[dict]:
    """Texts encoded individually as retrieval does (``side`` = ``query`` or ``document``), batched by length."""
    order = sorted(texts, key=len, reverse=True)  # similar lengths together: little padding
    for start in range(0, len(order), batch_size):
        yield encoder.tokenize(order[start:start + batch_size], side)
