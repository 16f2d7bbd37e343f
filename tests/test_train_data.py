import json

import pytest
import torch
from conftest import write_beir

import effir
from effir.train_data import (
    TrainExample,
    cross_encoder_scores,
    dense_teacher_scores,
    load_training_data,
    mine_bm25,
    mine_dense,
    parse_rank_range,
    random_negatives,
    text_id,
    write_flag_jsonl,
)
from effir.utils import EffirError

WORDS = "paris france capital city river water fish sun moon star planet cat dog bird tree leaf".split()
# 20 documents; q0..q3 each have one or two judged positives, plus a near-duplicate of a positive under another id
CORPUS = [{"_id": f"d{i}", "title": WORDS[i % len(WORDS)], "text": " ".join(WORDS[(i * 3 + j) % len(WORDS)]
                                                                        for j in range(6))} for i in range(20)]
CORPUS.append({"_id": "dup0", "title": CORPUS[0]["title"], "text": CORPUS[0]["text"]})
QUERIES = [{"_id": f"q{i}", "text": " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(3))} for i in range(4)]
QUERIES.append({"_id": "qnone", "text": "the cat"})
QRELS = [("q0", "d0", 1), ("q0", "d5", 1), ("q1", "d1", 2), ("q2", "d2", 1), ("q3", "d3", 1), ("qnone", "d4", 0)]


@pytest.fixture
def beir_train(tmp_path):
    return write_beir(tmp_path / "beir", corpus=CORPUS, queries=QUERIES, qrels=QRELS, split="train")


def test_beir_positives_from_qrels_and_queries_without_positive_dropped(beir_train):
    examples, corpus = load_training_data(beir_train, "train")
    assert [ex.query_id for ex in examples] == ["q0", "q1", "q2", "q3"]
    assert examples[0].pos_ids == ["d0", "d5"] and examples[0].pos[0] == f"{CORPUS[0]['title']} {CORPUS[0]['text']}"
    assert len(corpus) == 21 and all(ex.neg == [] for ex in examples)


def test_no_positive_at_all_is_an_error(tmp_path):
    folder = write_beir(tmp_path / "b", corpus=CORPUS, queries=QUERIES, qrels=[("q0", "d0", 0)], split="train")
    with pytest.raises(EffirError, match="no training query has a positive"):
        load_training_data(folder, "train")


@pytest.mark.parametrize("rank_range", [(0, 5), (2, 10)])
def test_bm25_negatives_never_include_a_positive(beir_train, rank_range):
    examples, corpus = load_training_data(beir_train, "train")
    mine_bm25(examples, corpus, rank_range, num_negatives=3, seed=0)
    for ex in examples:
        assert len(ex.neg) == 3 and len(set(ex.neg_ids)) == 3
        assert not set(ex.neg_ids) & set(ex.pos_ids)
        assert not set(ex.neg) & set(ex.pos)  # the duplicate "dup0" of q0's positive is excluded too


def test_dense_mining_draws_from_the_rank_range_without_positives(beir_train, tiny_llama_dir):
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    examples, corpus = load_training_data(beir_train, "train")
    mine_dense(examples, corpus, enc, rank_range=(0, 4), num_negatives=4, seed=0)
    ids = list(corpus)
    docs = enc.encode([corpus[d] for d in ids], "document")
    for ex in examples:
        scores = docs @ enc.encode([ex.query], "query")[0]
        ranked = [ids[i] for i in scores.argsort(descending=True).tolist()]
        allowed = [d for d in ranked if d not in ex.pos_ids and corpus[d] not in ex.pos][:4]
        assert sorted(ex.neg_ids) == sorted(allowed)  # exactly the 4 best non-positives
        assert not set(ex.neg_ids) & set(ex.pos_ids)


def test_random_negatives_exclude_positives(beir_train):
    examples, corpus = load_training_data(beir_train, "train")
    random_negatives(examples, corpus, num_negatives=10, seed=1)
    for ex in examples:
        assert len(ex.neg) == 10 and not set(ex.neg_ids) & set(ex.pos_ids) and not set(ex.neg) & set(ex.pos)


def test_flag_jsonl_round_trip_and_tevatron(tmp_path):
    ex = TrainExample(query="q", pos=["p1"], neg=["n1", "n2"], pos_scores=[2.0], neg_scores=[1.0, 0.5], prompt="Find:")
    path = write_flag_jsonl([ex], tmp_path / "d.jsonl")
    row = json.loads(path.read_text())
    assert {k: row[k] for k in ("query", "pos", "neg", "pos_scores", "neg_scores", "prompt")} == {
        "query": "q", "pos": ["p1"], "neg": ["n1", "n2"], "pos_scores": [2.0], "neg_scores": [1.0, 0.5],
        "prompt": "Find:"}
    back, corpus = load_training_data(path)
    assert back[0].neg_scores == [1.0, 0.5] and back[0].pos_ids == [text_id("p1")] and len(corpus) == 3

    tev = tmp_path / "tev.jsonl"
    tev.write_text(json.dumps({"query_id": "7", "query": "what", "positive_passages": [
        {"docid": "a", "title": "T", "text": "body"}], "negative_passages": [{"docid": "b", "title": "", "text": "x"}]})
        + "\n")
    (ex,), corpus = load_training_data(tev)
    assert (ex.query_id, ex.pos, ex.pos_ids, ex.neg, ex.neg_ids) == ("7", ["T body"], ["a"], ["x"], ["b"])


def test_bad_jsonl(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(EffirError, match="unknown layout"):
        load_training_data(bad)
    bad.write_text(json.dumps({"query": "x", "pos": ["a"], "neg": ["b"], "pos_scores": [1.0]}) + "\n")
    with pytest.raises(EffirError, match="pos_scores/neg_scores"):
        load_training_data(bad)
    with pytest.raises(EffirError, match="LO-HI"):
        parse_rank_range("10:100")


def test_dense_teacher_scores_are_cosines(tiny_llama_dir):
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    ex = TrainExample(query="the fish", pos=["fish in the river"], neg=["the sun", "a cat"])
    dense_teacher_scores([ex], enc)
    q = enc.encode(["the fish"], "query")[0]
    d = enc.encode(ex.pos + ex.neg, "document")
    torch.testing.assert_close(torch.tensor(ex.pos_scores + ex.neg_scores), d @ q, atol=1e-5, rtol=1e-5)


def test_cross_encoder_scores_each_pair_once(tiny_tokenizer):
    from conftest import tiny_config
    from transformers import AutoModelForSequenceClassification

    cfg = tiny_config("llama")
    cfg.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(o.logits.shape[0]))
    exs = [TrainExample(query="the fish", pos=["fish"], neg=["sun", "cat"]),
           TrainExample(query="paris", pos=["france"], neg=["dog", "tree"])]
    cross_encoder_scores(exs, model, tiny_tokenizer, batch_size=4)
    assert sum(calls) == 6  # every (query, candidate) pair scored exactly once
    batch = tiny_tokenizer(["paris"], ["dog"], return_tensors="pt")
    assert exs[1].neg_scores[0] == pytest.approx(model(**batch).logits[0, 0].item(), abs=1e-5)
