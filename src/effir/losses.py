"""Retrieval losses as pure functions of tensors: InfoNCE over grouped candidates (+ in-batch negatives), KL
distillation towards a teacher's candidate scores, embedding matching, block-output matching and in-batch similarity KL
towards a parent model (label-free distillation), and the cross-process gather that keeps gradients.

Inputs (the layout every function here expects):
    queries ``q``: ``(B, H)`` embeddings, one row per query.
    documents ``d``: ``(B * G, H)`` embeddings in query order, ``G`` candidates per query, **positive first**:
        ``d[i * G]`` is query ``i``'s positive and ``d[i * G + 1 : (i + 1) * G]`` its hard negatives.
    With in-batch negatives every query is scored against all ``B * G`` documents; otherwise only against its own
    ``G`` candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, d: torch.Tensor, group_size: int, temperature: float = 0.02, in_batch: bool = True,
             query_offset: int = 0) -> torch.Tensor:
    """InfoNCE (softmax cross-entropy towards the positive) at ``temperature``, averaged over queries.

    Args:
        q: ``(B, H)`` query embeddings (usually L2-normalised, so scores are cosines).
        d: ``(N * G, H)`` document embeddings, ``G = group_size`` per query, positive first (module docstring).
            ``N`` may exceed ``B`` when ``d`` was gathered from other processes: this process's queries are then
            queries ``query_offset .. query_offset + B - 1`` of the gathered batch.
        group_size: ``G``, candidates per query (1 positive + hard negatives).
        temperature: softmax temperature (the paper's 0.02).
        in_batch: score each query against every document in ``d`` (in-batch negatives) or only its own group.
        query_offset: index of this process's first query in the gathered batch.

    Returns:
        Scalar loss (mean over the ``B`` local queries).
    """
    b = q.shape[0]
    idx = torch.arange(b, device=q.device) + query_offset  # (B,) global query index
    if in_batch:
        logits = q.float() @ d.float().T / temperature  # (B, N*G)
        target = idx * group_size
    else:
        own = d.view(-1, group_size, d.shape[-1])[idx]  # (B, G, H)
        logits = torch.einsum("bh,bgh->bg", q.float(), own.float()) / temperature  # (B, G)
        target = torch.zeros(b, dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)


def group_scores(q: torch.Tensor, d: torch.Tensor, group_size: int, query_offset: int = 0) -> torch.Tensor:
    """Each query's scores over its own candidates: ``(B, H)`` x ``(N * G, H)`` -> ``(B, G)``."""
    idx = torch.arange(q.shape[0], device=q.device) + query_offset
    own = d.view(-1, group_size, d.shape[-1])[idx]  # (B, G, H)
    return torch.einsum("bh,bgh->bg", q.float(), own.float())


def kl_distill(student_scores: torch.Tensor, teacher_scores: torch.Tensor, student_temperature: float = 0.02,
               teacher_temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) between softmax distributions over each query's candidates, averaged over queries.

    ``KL = sum_j p_j (log p_j - log s_j)`` with ``p = softmax(teacher / teacher_temperature)`` and
    ``s = softmax(student / student_temperature)``. It is 0 exactly when both distributions agree.

    Args:
        student_scores: ``(B, G)`` student scores (cosines) over the same candidates as the teacher.
        teacher_scores: ``(B, G)`` teacher scores (cross-encoder logits, or a dense teacher's cosines).
        student_temperature: divides the student scores (use the InfoNCE temperature for cosines).
        teacher_temperature: divides the teacher scores (1.0 for reranker logits; 0.02 for a cosine teacher).

    Returns:
        Scalar loss.
    """
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(f"student scores {tuple(student_scores.shape)} and teacher scores "
                         f"{tuple(teacher_scores.shape)} must have the same (B, G) shape")
    log_s = F.log_softmax(student_scores.float() / student_temperature, dim=-1)
    log_p = F.log_softmax(teacher_scores.float().detach() / teacher_temperature, dim=-1)
    return F.kl_div(log_s, log_p, log_target=True, reduction="batchmean")


EMBEDDING_LOSSES = ("cosine", "mse")
"""The kinds :func:`embedding_match` computes."""


def embedding_match(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """How far the student's embeddings ``(B, H)`` are from the teacher's of the same texts, in the same space:
    ``cosine`` = mean ``1 - cos``, ``mse`` = mean squared difference per element (sentence-transformers' MSELoss).
    0 exactly when they are equal."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} embeddings differ")
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float().detach(), dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float().detach())
    raise ValueError(f"unknown embedding loss {kind!r}; use one of {EMBEDDING_LOSSES}")


HIDDEN_LOSSES = ("cosine", "nmse")
"""The kinds :func:`hidden_match` computes."""


def hidden_match(student: Sequence[torch.Tensor], parent: Sequence[torch.Tensor], mask: torch.Tensor,
                 kind: str = "cosine") -> torch.Tensor:
    """How far the student's block outputs are from the parent's on the same tokens: the mean over blocks of the
    mean over non-pad tokens of ``cosine`` = ``1 - cos(s, t)`` or ``nmse`` = ``|s - t|^2 / |t|^2``, per token.
    0 exactly when they are equal.

    Both are scale-free per token because residual norms differ by orders of magnitude between blocks and between
    tokens (the first token's massive activations), and a plain MSE would train on those alone; ``nmse`` also
    counts a difference of norm, ``cosine`` direction only.

    Args:
        student: ``L`` tensors ``(B, T, H)``, the residual stream after each block of the student.
        parent: the parent's ``L`` tensors ``(B, T, H)`` on the same tokens (no gradient flows into them).
        mask: ``(B, T)`` attention mask; pad positions (0) are left out.
        kind: one of :data:`HIDDEN_LOSSES`.
    """
    if len(student) != len(parent) or not student:
        raise ValueError(f"the student has {len(student)} block outputs and the parent {len(parent)}")
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"unknown hidden-state loss {kind!r}; use one of {HIDDEN_LOSSES}")
    keep = mask.bool()
    per_block = []
    for s, t in zip(student, parent, strict=True):
        s, t = s[keep].float(), t[keep].float().detach()  # (N, H): the non-pad tokens of the batch
        if kind == "nmse":
            d = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=1e-12)
        else:  # 1 - cos as half the squared distance of the unit vectors: exactly 0 for equal states
            d = 0.5 * (F.normalize(s, dim=-1) - F.normalize(t, dim=-1)).pow(2).sum(-1)
        per_block.append(d.mean())
    return torch.stack(per_block).mean()


def similarity_kl(student_a: torch.Tensor, student_b: torch.Tensor, teacher_a: torch.Tensor,
                  teacher_b: torch.Tensor, student_temperature: float, teacher_temperature: float,
                  self_offset: int | None = None) -> torch.Tensor:
    """KL(teacher || student) between the in-batch similarity distributions of each row of ``a`` over the rows of
    ``b``: student ``softmax(a_s b_s^T / student_temperature)`` against the teacher's, row by row.

    ``a`` is ``(B, H)``, ``b`` is ``(N, H)`` (student and teacher may live in spaces of different sizes). With
    ``self_offset``, row ``i`` of ``a`` is row ``self_offset + i`` of ``b`` and that pair (trivially the most
    similar) is left out, as for document-to-document similarities.
    """
    s = student_a.float() @ student_b.float().T  # (B, N)
    t = teacher_a.float().detach() @ teacher_b.float().detach().T
    if self_offset is not None:
        keep = torch.ones_like(s, dtype=torch.bool)
        rows = torch.arange(s.shape[0], device=s.device)
        keep[rows, rows + self_offset] = False
        s, t = s[keep].view(s.shape[0], -1), t[keep].view(t.shape[0], -1)
    return kl_distill(s, t, student_temperature, teacher_temperature)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` ``(b, ...)`` from every process along dim 0 -> ``(world * b, ...)``, in rank order.

    The backward pass sums each process's gradient into the owner's tensor (``torch.distributed.nn``), so
    in-batch negatives gathered from other processes train exactly as in one process with the global batch.
    Every process must pass the same ``b``. Alone (no process group), returns ``x`` unchanged.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    if torch.distributed.get_world_size() == 1:
        return x
    import warnings

    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public autograd gather
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_fn.all_gather(x), dim=0)
