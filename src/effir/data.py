"""BEIR data: a folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``), a ``.zip`` of one, or an
official BEIR data set fetched by name, loaded into a small :class:`BeirData` and validated.

Conventions follow BEIR's ``GenericDataLoader``: qrels keep every judged pair (score 0 = judged non-relevant), and
the queries of a split are those that appear in its qrels. Problems with the files are :class:`EffirError` that
name the file and line; qrels ids missing from the corpus or the queries are counted in ``BeirData.report``, and a
split whose ``queries.jsonl`` holds fewer than half of its judged query ids is refused (:data:`MIN_FOUND_QUERIES`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .files import atomic_path, cache_dir
from .utils import EffirError

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets"
"""Where official BEIR zips live; ``$EFFIR_BEIR_URL`` overrides it (mirrors, tests)."""
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass
class BeirData:
    """One split of a BEIR data set, as plain dicts (BEIR's own in-memory shapes)."""

    name: str
    """Data set name (the folder's name)."""
    path: Path
    """Folder holding ``corpus.jsonl`` (for a zip or a download: the extracted folder in the cache)."""
    split: str
    corpus: dict[str, dict]
    """doc id -> ``{"title": str, "text": str}``."""
    queries: dict[str, str]
    """query id -> text; only queries that have qrels in ``split``."""
    qrels: dict[str, dict[str, int]]
    """query id -> {doc id -> relevance}; 0 means judged non-relevant."""
    report: dict = field(default_factory=dict)
    """Counts: documents, queries (evaluated) of judged_queries (in the qrels), judged pairs, qrels ids missing from
    corpus/queries, blank queries."""


def load_beir(ref: str | os.PathLike, split: str = "test", progress: bool = False) -> BeirData:
    """Load ``split`` of a BEIR data set.

    Args:
        ref: a BEIR folder, a ``.zip`` of one, or an official BEIR name (``scifact``, ``nfcorpus``, ...), which is
            downloaded once into ``effir.checkpoint.cache_dir()/datasets``.
        split: qrels file to use: ``qrels/<split>.tsv``.
        progress: show a progress bar while downloading.

    Raises:
        EffirError: missing folder/files, malformed lines (file:line), missing or empty split, fewer than half of
            the judged query ids in the queries file, bad zip, failed download.
    """
    folder = resolve_beir(ref, progress=progress)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        found = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        have = f"available splits: {', '.join(found)}" if found else f"{folder / 'qrels'} has no .tsv files"
        raise EffirError(f"split {split!r} not found: no {qrels_path} ({have})")
    corpus = load_corpus(folder / "corpus.jsonl")
    all_queries = load_queries(folder / "queries.jsonl")
    qrels = load_qrels(qrels_path)
    if not qrels:
        raise EffirError(f"split {split!r} is empty: {qrels_path} has no judgements")
    missing_q = [q for q in qrels if q not in all_queries]
    missing_docs = sum(d not in corpus for judged in qrels.values() for d in judged)
    if missing_docs == sum(len(judged) for judged in qrels.values()):  # every metric would be 0, and look measured
        raise EffirError(f"split {split!r} is unusable: none of the {missing_docs} document ids judged in {qrels_path} "
                         f"is in {folder / 'corpus.jsonl'}")
    judged = len(qrels)
    for q in missing_q:
        del qrels[q]
    _check_found(len(qrels), judged, split, qrels_path, folder / "queries.jsonl")
    queries = {q: all_queries[q] for q in qrels}
    report = {
        "documents": len(corpus),
        "queries": len(queries),
        "judged_queries": judged,
        "empty_queries": sum(not text.strip() for text in queries.values()),
        "judgements": sum(len(j) for j in qrels.values()),
        "relevant": sum(s > 0 for j in qrels.values() for s in j.values()),
        "qrels_queries_missing": len(missing_q),
        "qrels_docs_missing": missing_docs,
        "corpus_sha256": corpus_hash(corpus),
    }
    ref_name = Path(str(ref)).name
    name = ref_name[:-4] if ref_name.endswith(".zip") else folder.name if Path(ref).expanduser().is_dir() else ref_name
    return BeirData(name=name, path=folder, split=split, corpus=corpus, queries=queries, qrels=qrels,
                    report=report)


MIN_FOUND_QUERIES = 0.5
"""The fraction of a split's judged query ids that ``queries.jsonl`` must hold. Official BEIR sets hold all of them,
and a few missing (a trimmed or hand-edited set) leave metrics that still describe the split; below half, the ids
belong to another queries file, and metrics over the few that match would look like a result."""


def _check_found(found: int, judged: int, split: str, qrels_path: Path, queries_path: Path) -> None:
    if found == 0 or found < MIN_FOUND_QUERIES * judged:
        raise EffirError(f"split {split!r} is unusable: {f'only {found}' if found else 'none'} of the {judged} query "
                         f"ids judged in {qrels_path} are in {queries_path} (at least half must be); the qrels and "
                         "the queries come from different data sets: fix one of them")


def load_corpus(path: str | os.PathLike) -> dict[str, dict]:
    """``corpus.jsonl`` -> {doc id: {"title", "text"}} in file order.

    Raises:
        EffirError: a document id repeats (one of the two would be dropped unseen, and every metric counted
            against the wrong text), naming both lines.
    """
    corpus, first = {}, {}
    for lineno, row in read_jsonl(Path(path)):
        doc_id = _unique(_id(row, path, lineno), first, path, lineno, "document")
        corpus[doc_id] = {"title": _str(row, "title", path, lineno), "text": _str(row, "text", path, lineno)}
    if not corpus:
        raise EffirError(f"{path} holds no documents")
    return corpus


def load_queries(path: str | os.PathLike) -> dict[str, str]:
    """``queries.jsonl`` -> {query id: text}; a repeated id is an error, as in :func:`load_corpus`."""
    queries, first = {}, {}
    for lineno, row in read_jsonl(Path(path)):
        queries[_unique(_id(row, path, lineno), first, path, lineno, "query")] = _str(row, "text", path, lineno)
    if not queries:
        raise EffirError(f"{path} holds no queries")
    return queries


def load_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """``qrels/<split>.tsv`` (``query-id  corpus-id  score``, header optional) -> {query id: {doc id: score}}."""
    path = Path(path)
    if not path.is_file():
        raise EffirError(f"qrels file {path} not found")
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in text_lines(path):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        cols = line.split("\t")
        if lineno == 1 and cols[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue  # header
        if len(cols) == 4:  # TREC qrels: qid iter docid rel
            cols = [cols[0], cols[2], cols[3]]
        if len(cols) != 3:
            raise EffirError(f"{path}:{lineno}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                             f"found {len(cols)}")
        try:
            score = int(cols[2])
        except ValueError:
            raise EffirError(f"{path}:{lineno}: score {cols[2]!r} is not an integer") from None
        qrels.setdefault(cols[0].strip(), {})[cols[1].strip()] = score
    return qrels


def corpus_hash(corpus: dict[str, dict]) -> str:
    """sha256 over ids, titles and texts in order: the corpus half of the embedding-cache key."""
    h = hashlib.sha256()
    for doc_id, doc in corpus.items():
        h.update(f"{doc_id}\0{doc.get('title', '')}\0{doc.get('text', '')}\0".encode())
    return h.hexdigest()


BEIR_LAYOUT = "a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv"


def read_jsonl(path: Path, what: str = BEIR_LAYOUT):
    """Yield ``(line number, object)`` for each non-blank line; a bad line is an error naming ``path:line``."""
    if not path.is_file():
        raise EffirError(f"{path} not found; {what}")
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EffirError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise EffirError(f"{path}:{lineno}: expected a JSON object, found {type(row).__name__}")
        yield lineno, row


def text_lines(path: Path):
    """Yield ``(line number, line)`` of a UTF-8 text file. Decoded line by line, so bytes that are not UTF-8 are an
    error naming ``path:line`` (decoding the whole file would only say which byte offset)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise EffirError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                 "of the line); re-save the file as UTF-8") from None


def _id(row: dict, path, lineno: int) -> str:
    if "_id" not in row:
        raise EffirError(f"{path}:{lineno}: missing \"_id\"")
    return str(row["_id"])


def _unique(item_id: str, first: dict[str, int], path, lineno: int, what: str) -> str:
    """``item_id``, after checking no earlier line of ``path`` used it (``first``: id -> line, updated here)."""
    if item_id in first:
        raise EffirError(f"{path}:{lineno}: {what} id {item_id!r} repeats line {first[item_id]}; ids must be unique "
                         f"(remove or rename the duplicate)")
    first[item_id] = lineno
    return item_id


def _str(row: dict, key: str, path, lineno: int) -> str:
    value = row.get(key) or ""
    if not isinstance(value, str):
        raise EffirError(f"{path}:{lineno}: \"{key}\" must be a string, found {type(value).__name__}")
    return value


# -- where the folder comes from ------------------------------------------------------------------------------------
def resolve_beir(ref: str | os.PathLike, progress: bool = False) -> Path:
    """A folder, a ``.zip`` (extracted once into the cache) or an official name (downloaded once) -> the folder."""
    ref_s = str(ref)
    path = Path(ref_s).expanduser()
    if path.is_dir():
        if not (path / "corpus.jsonl").is_file():
            raise EffirError(f"{path} is not a BEIR folder: no corpus.jsonl in it")
        return path
    if path.is_file():
        if path.suffix != ".zip":
            raise EffirError(f"{path} is a file but not a .zip; pass a BEIR folder, a .zip of one or a BEIR name")
        return extract_zip(path, _datasets_dir() / "zips" / f"{path.stem}-{_file_key(path)}")
    if _NAME.match(ref_s) and not ref_s.endswith(".zip"):
        return fetch_beir(ref_s, progress=progress)
    raise EffirError(f"data {ref_s!r} not found: no such folder or .zip (official BEIR data sets can be given by "
                     "name, e.g. scifact)")


def fetch_beir(name: str, progress: bool = False) -> Path:
    """Download ``{$EFFIR_BEIR_URL or BEIR_URL}/{name}.zip`` once into the cache and return its extracted folder."""
    root = _datasets_dir()
    folder = root / name
    if (folder / "corpus.jsonl").is_file():
        return folder
    base = os.environ.get("EFFIR_BEIR_URL", BEIR_URL).rstrip("/")
    url = f"{base}/{name}.zip"
    zpath = root / f"{name}.zip"
    if not zpath.is_file():
        _download(url, zpath, name, progress)
    try:
        return extract_zip(zpath, folder)
    except EffirError:
        zpath.unlink(missing_ok=True)  # e.g. an HTML error page served as 200: fetch again next time
        raise


def _download(url: str, dest: Path, name: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    try:
        with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", disable=not progress) as bar:
                while block := r.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise EffirError(f"{name!r} is neither a local folder/.zip nor an official BEIR data set "
                             f"({url} answered 404)") from None
        raise EffirError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise EffirError(f"{name!r} is not a local folder and downloading {url} failed ({reason}); download the zip "
                         "where you have a network and pass its path") from None


def extract_zip(zpath: Path, dest: Path) -> Path:
    """Extract a BEIR zip once into ``dest`` (atomically) and return the folder holding ``corpus.jsonl``."""
    found = _find_beir_folder(dest) if dest.is_dir() else None
    if found:
        return found
    with atomic_path(dest) as tmp:
        try:
            with zipfile.ZipFile(zpath) as z:
                z.extractall(tmp)  # extractall drops absolute paths and '..' parts
        except (zipfile.BadZipFile, OSError) as e:
            raise EffirError(f"{zpath} is not a readable zip ({e})") from None
        if not _find_beir_folder(tmp):
            raise EffirError(f"{zpath} holds no corpus.jsonl (at its top or one folder down); it is not a BEIR zip")
    return _find_beir_folder(dest)


def _find_beir_folder(root: Path) -> Path | None:
    if (root / "corpus.jsonl").is_file():
        return root
    hits = sorted(p.parent for p in root.glob("*/corpus.jsonl"))
    return hits[0] if hits else None


def _datasets_dir() -> Path:
    return cache_dir() / "datasets"


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
