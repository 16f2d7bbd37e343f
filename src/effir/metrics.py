"""Retrieval metrics through ir-measures (pytrec_eval underneath, as BEIR uses): no hand-written metric code.

Qrels use BEIR's convention: relevance 0 is judged non-relevant; nDCG gains are the relevance levels; recall and
reciprocal rank count relevance >= 1. Averages run over the queries of the run that have qrels.
"""

from __future__ import annotations

import ir_measures

from .utils import EffirError

DEFAULT_MEASURES = ("nDCG@10", "R@100", "RR@10")


def evaluate(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]],
             measures: tuple[str, ...] = DEFAULT_MEASURES) -> dict[str, float]:
    """Mean of each measure (ir-measures names, e.g. ``nDCG@10``) over the queries -> ``{name: value}``."""
    parsed = [_parse(m) for m in measures]
    agg = ir_measures.calc_aggregate(parsed, qrels, run)
    return {name: float(agg[m]) for name, m in zip(measures, parsed, strict=True)}


def per_query(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]],
              measures: tuple[str, ...] = DEFAULT_MEASURES) -> dict[str, dict[str, float]]:
    """``{query id: {measure: value}}``, for error analysis."""
    parsed = {_parse(m): m for m in measures}
    out: dict[str, dict[str, float]] = {}
    for metric in ir_measures.iter_calc(list(parsed), qrels, run):
        out.setdefault(metric.query_id, {})[parsed[metric.measure]] = float(metric.value)
    return out


def _parse(name: str):
    try:
        return ir_measures.parse_measure(name)
    except (ValueError, NameError) as e:
        raise EffirError(f"unknown measure {name!r} ({e}); use ir-measures names such as nDCG@10, R@100, "
                         "RR@10") from None
