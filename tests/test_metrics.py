import math

import pytest

from effir.metrics import evaluate, per_query
from effir.utils import EffirError

QRELS = {
    "q1": {"d1": 1, "d3": 2, "d5": 0},  # d5 judged non-relevant (BEIR: score 0)
    "q2": {"d4": 1, "d8": 1},
    "q3": {"d1": 1},
}
RUN = {
    "q1": {"d5": 0.9, "d1": 0.8, "d2": 0.7, "d3": 0.6},
    # d4 at rank 11 (outside @10, inside @100); d8 never retrieved
    "q2": {**{f"x{i}": 1.0 - i / 100 for i in range(10)}, "d4": 0.5},
    "q3": {"d1": 0.3, "d2": 0.1},
}


def _hand():
    # q1: gains by rank (d5=0, d1=1, d2=0, d3=2); discount log2(rank + 1); ideal order 2, 1
    dcg = 1 / math.log2(3) + 2 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    ndcg = {"q1": dcg / idcg, "q2": 0.0, "q3": 1.0}
    rr = {"q1": 1 / 2, "q2": 0.0, "q3": 1.0}  # first relevant (score >= 1) at rank 2; none in q2's top 10
    recall = {"q1": 1.0, "q2": 1 / 2, "q3": 1.0}
    return {"nDCG@10": ndcg, "RR@10": rr, "R@100": recall}


def test_toy_run_matches_hand_computed_means():
    got = evaluate(QRELS, RUN)
    assert list(got) == ["nDCG@10", "R@100", "RR@10"]
    for name, per_q in _hand().items():
        assert got[name] == pytest.approx(sum(per_q.values()) / 3, abs=1e-9), name
    assert got["nDCG@10"] == pytest.approx((0.5672074 + 0 + 1) / 3, abs=1e-6)  # q1 = 0.5672074, written out


def test_per_query_values():
    got = per_query(QRELS, RUN)
    for name, per_q in _hand().items():
        for q, value in per_q.items():
            assert got[q][name] == pytest.approx(value, abs=1e-9), (q, name)


def test_zero_score_qrels_are_not_relevant():
    assert evaluate({"q": {"a": 0, "b": 1}}, {"q": {"a": 2.0, "b": 1.0}})["RR@10"] == pytest.approx(0.5)
    assert evaluate({"q": {"a": 0, "b": 1}}, {"q": {"a": 2.0}})["R@100"] == 0.0


def test_other_measures_and_bad_names():
    assert evaluate(QRELS, RUN, ("P@1",))["P@1"] == pytest.approx(1 / 3)
    for bad in ("nDCG@@10", "Foo@10"):
        with pytest.raises(EffirError, match=f"unknown measure '{bad}'"):
            evaluate(QRELS, RUN, (bad,))
