import numpy as np
import pytest
import torch

from effir.search import TopK, exact_search


def _full(queries, corpus, k):
    return torch.topk(queries @ corpus.T, k, dim=1)


@pytest.mark.parametrize("corpus_chunk, query_chunk", [(1, 1), (3, 2), (7, 5), (1000, 1000)])
def test_chunked_equals_full_matmul(corpus_chunk, query_chunk):
    g = torch.Generator().manual_seed(0)
    queries, corpus = torch.randn(9, 8, generator=g), torch.randn(23, 8, generator=g)
    scores, indices = exact_search(queries, corpus, k=5, corpus_chunk=corpus_chunk, query_chunk=query_chunk)
    ref = _full(queries, corpus, 5)
    torch.testing.assert_close(scores, ref.values)
    assert torch.equal(indices, ref.indices)


def test_hand_computed_ranking():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    corpus = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [-1.0, 0.0]])
    scores, indices = exact_search(queries, corpus, k=3, corpus_chunk=2)
    assert indices.tolist() == [[0, 2, 1], [1, 2, 0]]
    torch.testing.assert_close(scores, torch.tensor([[0.9, 0.5, 0.2], [0.8, 0.5, 0.1]]))


def test_exclude_drops_one_document_per_query_in_any_chunk():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    corpus = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [-1.0, 0.0]])
    exclude = torch.tensor([0, 3, -1])  # q0 may not see doc 0, q1 not doc 3, q2 excludes nothing
    for chunk in (1, 3, 10):
        _, indices = exact_search(queries, corpus, k=4, exclude=exclude, corpus_chunk=chunk)
        assert indices[0].tolist() == [2, 1, 3, -1]  # excluded slot reported as -1, never as doc 0
        assert indices[1].tolist() == [1, 2, 0, -1]
        assert sorted(indices[2].tolist()) == [0, 1, 2, 3]


def test_k_larger_than_corpus_and_memmap(tmp_path):
    corpus = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)  # unit vectors: each row is its own best match
    np.save(tmp_path / "c.npy", corpus)
    mm = np.load(tmp_path / "c.npy", mmap_mode="r")
    queries = torch.from_numpy(corpus[:2].copy())
    scores, indices = exact_search(queries, mm, k=100, corpus_chunk=2)
    assert scores.shape == (2, 5) and indices[:, 0].tolist() == [0, 1]


def test_topk_incremental_offsets_match_one_shot():
    g = torch.Generator().manual_seed(1)
    queries, corpus = torch.randn(4, 6, generator=g), torch.randn(10, 6, generator=g)
    top = TopK(queries, 3)
    top.add(corpus[6:], offset=6)  # chunks may arrive in any order when given their offset
    top.add(corpus[:6], offset=0)
    ref = _full(queries, corpus, 3)
    assert torch.equal(top.result()[1], ref.indices)


def test_bad_k():
    with pytest.raises(ValueError, match="k must be >= 1"):
        TopK(torch.zeros(1, 2), 0)


def test_cosine_ranks_by_angle_not_length():
    q = torch.tensor([[1.0, 0.0]])
    docs = torch.tensor([[10.0, 10.0], [0.5, 0.0]])  # the long one wins on dot product, the aligned one on cosine
    dot, cos = TopK(q, 2), TopK(q, 2, cosine=True)
    dot.add(docs)
    cos.add(docs)
    assert dot.result()[1].tolist() == [[0, 1]] and cos.result()[1].tolist() == [[1, 0]]
    torch.testing.assert_close(cos.result()[0], torch.tensor([[1.0, 2 ** -0.5]]))
