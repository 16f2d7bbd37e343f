import functools
import http.server
import json
import threading
import zipfile
from pathlib import Path

import pytest
from conftest import SCIFACT, TINY_CORPUS, needs_scifact, write_beir

from effir.data import corpus_hash, load_beir, load_corpus, load_qrels, load_queries
from effir.utils import EffirError


def test_load_folder(tiny_beir):
    data = load_beir(tiny_beir)
    assert data.name == "tiny-beir" and data.split == "test" and data.path == tiny_beir
    assert list(data.corpus) == ["d1", "d2", "d3", "d4", "d5", "d6"]
    assert data.corpus["d1"] == {"title": "paris", "text": "paris is the capital of france"}
    assert data.queries == {"q1": "what is the capital of france", "q2": "what is in the river water",
                            "q3": "vaccine risk in a trial"}
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}, "q3": {"d6": 2}}
    assert data.report["documents"] == 6 and data.report["judgements"] == 4
    assert data.report["qrels_docs_missing"] == 0 and data.report["qrels_queries_missing"] == 0


def test_queries_are_those_of_the_split_and_zero_scores_kept(tmp_path):
    folder = write_beir(tmp_path / "b", qrels=[("q1", "d1", 1), ("q1", "d2", 0)])
    data = load_beir(folder)
    assert list(data.queries) == ["q1"]  # q2, q3 have no qrels in this split
    assert data.qrels == {"q1": {"d1": 1, "d2": 0}}
    assert data.report["relevant"] == 1


def test_missing_qrels_ids_are_counted(tmp_path):
    folder = write_beir(tmp_path / "b", qrels=[("q1", "d1", 1), ("q1", "nodoc", 1), ("q2", "gone", 1),
                                               ("noquery", "d1", 1), ("noquery2", "d2", 1)])
    data = load_beir(folder)
    assert data.report["qrels_queries_missing"] == 2
    assert data.report["qrels_docs_missing"] == 2  # qrels of dropped queries are not counted twice
    assert set(data.qrels) == {"q1", "q2"} and set(data.queries) == {"q1", "q2"}


def test_malformed_corpus_line_names_file_and_line(tiny_beir):
    path = tiny_beir / "corpus.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"_id": "d3", "text": "unterminated'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EffirError, match=rf"{path}:3: not valid JSON"):
        load_beir(tiny_beir)


@pytest.mark.parametrize("line, message", [
    ('["d1", "x"]', "expected a JSON object"),
    ('{"title": "x", "text": "y"}', 'missing "_id"'),
    ('{"_id": "d9", "text": 5}', '"text" must be a string'),
])
def test_bad_corpus_rows(tmp_path, line, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps(TINY_CORPUS[0]) + "\n\n" + line + "\n")
    with pytest.raises(EffirError, match=rf"{path}:3: {message}"):
        load_corpus(path)


def test_malformed_queries_and_qrels(tmp_path):
    q = tmp_path / "queries.jsonl"
    q.write_text('{"_id": "q1", "text": "x"}\n{oops\n')
    with pytest.raises(EffirError, match=rf"{q}:2: not valid JSON"):
        load_queries(q)
    qr = tmp_path / "test.tsv"
    qr.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1 d2 1\n")
    with pytest.raises(EffirError, match=rf"{qr}:3: expected 3 tab-separated columns"):
        load_qrels(qr)
    qr.write_text("q1\td1\t1\nq1\td2\thigh\n")
    with pytest.raises(EffirError, match=rf"{qr}:2: score 'high' is not an integer"):
        load_qrels(qr)
    qr.write_text("q1\td1\t1\nq1\t0\td2\t2\n")  # no header, and a TREC 4-column line
    assert load_qrels(qr) == {"q1": {"d1": 1, "d2": 2}}


def test_missing_split_lists_available(tiny_beir):
    with pytest.raises(EffirError, match=r"split 'dev' not found: .*available splits: test"):
        load_beir(tiny_beir, split="dev")


def test_empty_split(tiny_beir):
    (tiny_beir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(EffirError, match="split 'train' is empty"):
        load_beir(tiny_beir, split="train")


def test_split_with_only_unknown_queries(tmp_path):
    folder = write_beir(tmp_path / "b", qrels=[("nope", "d1", 1)])
    with pytest.raises(EffirError, match="none of the 1 query ids"):
        load_beir(folder)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(EffirError, match="not found: no such folder or .zip"):
        load_beir(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EffirError, match="not a BEIR folder: no corpus.jsonl"):
        load_beir(tmp_path / "empty")
    folder = write_beir(tmp_path / "b")
    (folder / "queries.jsonl").unlink()
    with pytest.raises(EffirError, match=r"queries.jsonl not found"):
        load_beir(folder)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(EffirError, match="not a .zip"):
        load_beir(tmp_path / "notes.txt")


def _zip_folder(folder: Path, zpath: Path, prefix: str) -> Path:
    with zipfile.ZipFile(zpath, "w") as z:
        for f in folder.rglob("*"):
            if f.is_file():
                z.write(f, prefix + str(f.relative_to(folder)))
    return zpath


@pytest.mark.parametrize("prefix", ["", "inner/"])
def test_zip_is_extracted_once(tiny_beir, tmp_path, prefix):
    zpath = _zip_folder(tiny_beir, tmp_path / "tiny.zip", prefix)
    data = load_beir(zpath)
    assert data.name == "tiny" and data.qrels == load_beir(tiny_beir).qrels
    assert str(data.path).startswith(str(tmp_path / "cache" / "datasets"))
    assert load_beir(zpath).path == data.path  # second load reuses the extraction


def test_bad_zips(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_text("not a zip")
    with pytest.raises(EffirError, match="is not a readable zip"):
        load_beir(bad)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(EffirError, match="holds no corpus.jsonl"):
        load_beir(tmp_path / "other.zip")
    assert not list((tmp_path / "cache" / "datasets" / "zips").glob("*.tmp*"))  # nothing half-extracted left


@pytest.fixture
def beir_server(tmp_path, tiny_beir):
    """A localhost HTTP server publishing ``tinyset.zip`` like the official BEIR URL does."""
    root = tmp_path / "www"
    root.mkdir()
    _zip_folder(tiny_beir, root / "tinyset.zip", "tinyset/")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_fetch_by_name_from_localhost(beir_server, monkeypatch, tmp_path):
    url, root = beir_server
    monkeypatch.setenv("EFFIR_BEIR_URL", url)
    data = load_beir("tinyset")
    assert data.name == "tinyset" and len(data.corpus) == 6 and len(data.queries) == 3
    assert data.path == tmp_path / "cache" / "datasets" / "tinyset" / "tinyset"
    (root / "tinyset.zip").unlink()  # cached: no second download
    assert load_beir("tinyset").corpus == data.corpus


def test_fetch_of_a_non_zip_is_not_cached(beir_server, monkeypatch, tmp_path):
    url, root = beir_server
    (root / "broken.zip").write_text("<html>maintenance</html>")
    monkeypatch.setenv("EFFIR_BEIR_URL", url)
    with pytest.raises(EffirError, match="is not a readable zip"):
        load_beir("broken")
    assert not (tmp_path / "cache" / "datasets" / "broken.zip").exists()


def test_fetch_unknown_name_and_no_network(beir_server, monkeypatch):
    url, _ = beir_server
    monkeypatch.setenv("EFFIR_BEIR_URL", url)
    with pytest.raises(EffirError, match=r"'nosuchset' is neither a local folder/.zip nor an official BEIR .*404"):
        load_beir("nosuchset")
    monkeypatch.setenv("EFFIR_BEIR_URL", "http://127.0.0.1:9")  # closed port
    with pytest.raises(EffirError, match="downloading http://127.0.0.1:9/scifact.zip failed"):
        load_beir("scifact")


def test_corpus_hash_tracks_content_and_order():
    a = {"d1": {"title": "t", "text": "x"}, "d2": {"title": "", "text": "y"}}
    assert corpus_hash(a) == corpus_hash(dict(a))
    assert corpus_hash(a) != corpus_hash({"d2": a["d2"], "d1": a["d1"]})
    assert corpus_hash(a) != corpus_hash({**a, "d2": {"title": "", "text": "z"}})


@needs_scifact()
def test_scifact_counts():
    test = load_beir(SCIFACT, "test")
    assert (len(test.corpus), len(test.queries), test.report["judgements"]) == (5183, 300, 339)
    assert test.report["qrels_docs_missing"] == 0 and test.report["qrels_queries_missing"] == 0
    assert len(load_beir(SCIFACT, "train").queries) == 809
