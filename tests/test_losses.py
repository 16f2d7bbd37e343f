import math

import pytest
import torch
import torch.nn.functional as F

from effir.losses import gather_with_grad, group_scores, info_nce, kl_distill


def test_info_nce_equals_cross_entropy_on_hand_built_logits():
    # 2 queries, group of 2 (positive first): d = [q0+, q0-, q1+, q1-], unit vectors in 2-D.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.6, 0.8]])
    t = 0.5
    # hand-built logits: query i against all 4 docs / t; targets 0 and 2
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.6], [0.0, 1.0, 1.0, 0.8]]) / t
    expected = F.cross_entropy(logits, torch.tensor([0, 2]))
    torch.testing.assert_close(info_nce(q, d, group_size=2, temperature=t), expected)
    # by hand for query 0: -log(e^2 / (e^2 + e^0 + e^0 + e^1.2))
    q0 = -math.log(math.exp(2) / (math.exp(2) + 2 + math.exp(1.2)))
    q1 = -math.log(math.exp(2) / (math.exp(0) + math.exp(2) + math.exp(2) + math.exp(1.6)))
    assert info_nce(q, d, 2, t).item() == pytest.approx((q0 + q1) / 2, rel=1e-6)


def test_info_nce_without_in_batch_uses_own_group_only():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.6, 0.8]])
    expected = F.cross_entropy(torch.tensor([[1.0, 0.0], [1.0, 0.8]]) / 0.02, torch.tensor([0, 0]))
    torch.testing.assert_close(info_nce(q, d, 2, 0.02, in_batch=False), expected)


def test_info_nce_query_offset_matches_the_full_batch():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 8), dim=-1)
    d = F.normalize(torch.randn(4 * 3, 8), dim=-1)
    full = info_nce(q, d, 3)
    halves = (info_nce(q[:2], d, 3, query_offset=0) + info_nce(q[2:], d, 3, query_offset=2)) / 2
    torch.testing.assert_close(full, halves)
    torch.testing.assert_close(group_scores(q[2:], d, 3, query_offset=2), group_scores(q, d, 3)[2:])


def test_kl_is_zero_when_student_equals_teacher_and_hand_computed_otherwise():
    s = torch.tensor([[0.9, 0.1, -0.3], [0.2, 0.5, 0.4]])
    assert kl_distill(s, s.clone(), 0.02, 0.02).item() == pytest.approx(0.0, abs=1e-7)
    # same distribution through different temperatures is still 0
    assert kl_distill(s, s * 50, 0.02, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    # one query, two candidates, temperatures 1: p = softmax([1, 0]), s = softmax([0, 0])
    p1 = math.exp(1) / (math.exp(1) + 1)
    expected = p1 * math.log(p1 / 0.5) + (1 - p1) * math.log((1 - p1) / 0.5)
    got = kl_distill(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), 1.0, 1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() > 0


def test_kl_gradient_reaches_student_only():
    s = torch.tensor([[0.3, 0.1]], requires_grad=True)
    t = torch.tensor([[2.0, 0.0]], requires_grad=True)
    kl_distill(s, t, 1.0, 1.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kl_shape_mismatch():
    with pytest.raises(ValueError, match="same"):
        kl_distill(torch.zeros(2, 3), torch.zeros(2, 4))


def test_gather_alone_is_identity():
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


def test_embedding_match_is_zero_only_for_equal_embeddings():
    from effir.losses import embedding_match

    s = F.normalize(torch.randn(4, 8), dim=-1)
    assert embedding_match(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert embedding_match(s, s.clone(), "mse").item() == 0.0
    t = F.normalize(torch.randn(4, 8), dim=-1)
    assert embedding_match(s, t).item() == pytest.approx((1 - (s * t).sum(-1)).mean().item(), rel=1e-5)
    assert embedding_match(s, t, "mse").item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="differ"):
        embedding_match(s, t[:, :4])


def test_similarity_kl_by_hand_and_without_self_pairs():
    from effir.losses import similarity_kl

    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    ta = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # the teacher in another (3-d) space
    tb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert similarity_kl(a, b, a, b, 0.5, 0.5).item() == pytest.approx(0.0, abs=1e-7)
    s, t = a @ b.T, ta @ tb.T
    want = kl_distill(s, t, 0.5, 0.1)
    torch.testing.assert_close(similarity_kl(a, b, ta, tb, 0.5, 0.1), want)
    # self_offset=1: row i of a is row 1 + i of b; those pairs leave both distributions
    keep = torch.tensor([[True, False, True], [True, True, False]])
    want = kl_distill(s[keep].view(2, 2), t[keep].view(2, 2), 0.5, 0.1)
    torch.testing.assert_close(similarity_kl(a, b, ta, tb, 0.5, 0.1, self_offset=1), want)


def test_hidden_match_is_zero_for_equal_states_and_leaves_pads_out():
    from effir.losses import hidden_match

    s = [torch.randn(2, 3, 8) for _ in range(2)]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    moved = [x.clone() for x in s]
    moved[1][0, 2] += 5.0  # a pad position: not compared
    for kind in ("cosine", "nmse"):
        assert hidden_match(s, [x.clone() for x in s], mask, kind).item() == 0.0
        assert hidden_match(moved, s, mask, kind).item() == 0.0
        assert hidden_match(moved, s, torch.ones(2, 3, dtype=torch.long), kind).item() > 0


def test_hidden_match_by_hand():
    from effir.losses import hidden_match

    t = [torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[1.0, 0.0]]])]  # 2 blocks, 1 text, 1 token
    s = [torch.tensor([[[3.0, 0.0]]]), torch.tensor([[[0.0, 2.0]]])]
    mask = torch.ones(1, 1, dtype=torch.long)
    # nmse per block: 16 / 25 and 5 / 1; cosine: 1 - 9 / 15 and 1 - 0
    assert hidden_match(s, t, mask, "nmse").item() == pytest.approx((16 / 25 + 5) / 2)
    assert hidden_match(s, t, mask, "cosine").item() == pytest.approx((1 - 0.6 + 1) / 2)
    # scale: a block of parent norm 100 weighs as much as one of norm 1
    big, bigger = [100 * x for x in s], [100 * x for x in t]
    for kind in ("cosine", "nmse"):
        assert hidden_match(big, bigger, mask, kind).item() == pytest.approx(hidden_match(s, t, mask, kind).item())


def test_hidden_match_trains_the_student_only_and_refuses_unpaired_blocks():
    from effir.losses import hidden_match

    s, t = torch.randn(1, 2, 4, requires_grad=True), torch.randn(1, 2, 4, requires_grad=True)
    hidden_match([s], [t], torch.ones(1, 2)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match="block outputs"):
        hidden_match([s, s], [t], torch.ones(1, 2))
    with pytest.raises(ValueError, match="unknown"):
        hidden_match([s], [t], torch.ones(1, 2), "l1")
