import json

import pytest

from effir.synthetic import build_ict_beir, passages
from effir.utils import EffirError

ARTICLES = [
    " ".join(f"Article {a} sentence {s} says that the topic number {a} has property {s} today." for s in range(40))
    for a in range(10)
]


def _read(folder):
    corpus = {d["_id"]: d for d in map(json.loads, (folder / "corpus.jsonl").read_text().splitlines())}
    queries = {q["_id"]: q["text"] for q in map(json.loads, (folder / "queries.jsonl").read_text().splitlines())}
    qrels = {}
    for split in ("train", "test"):
        rows = (folder / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]
        qrels[split] = [tuple(r.split("\t")) for r in rows]
    return corpus, queries, qrels


def test_passages_keep_whole_sentences():
    ps = passages("One two three four. Five six seven eight. Nine ten eleven twelve.", words=8)
    assert ps == [["One two three four.", "Five six seven eight."], ["Nine ten eleven twelve."]]


def test_ict_folder_is_consistent_and_splits_are_article_disjoint(tmp_path):
    out = build_ict_beir(ARTICLES, tmp_path / "ict", train_queries=20, test_queries=6, passage_words=40,
                         max_passages=60)
    corpus, queries, qrels = _read(out)
    assert len(qrels["train"]) == 20 and len(qrels["test"]) == 6
    for split in ("train", "test"):
        for qid, did, score in qrels[split]:
            assert score == "1" and did in corpus
            assert queries[qid] not in corpus[did]["text"]  # the query sentence was cut out of its passage
    article = lambda did: did.split("-")[0][2:]  # noqa: E731
    train_articles = {article(d) for _, d, _ in qrels["train"]}
    test_articles = {article(d) for _, d, _ in qrels["test"]}
    assert not train_articles & test_articles
    # deterministic for a seed
    again = build_ict_beir(ARTICLES, tmp_path / "again", train_queries=20, test_queries=6, passage_words=40,
                           max_passages=60)
    assert (again / "queries.jsonl").read_text() == (out / "queries.jsonl").read_text()


def test_too_many_queries_is_an_error(tmp_path):
    with pytest.raises(EffirError, match="usable"):
        build_ict_beir(ARTICLES[:2], tmp_path / "x", train_queries=500, test_queries=5, passage_words=40)
