"""effir.training: data order, log truncation, the schedule's errors (the loop itself runs in the stage tests)."""

import json

import pytest
import torch

from effir.training import batch_indices, mean_pairwise_cosine, steps_per_epoch, truncate_log
from effir.utils import EffirError


def _indices(step, micro=0, *, world=1, rank=0, batch=4, accum=1, n=20):
    return batch_indices(n, step, micro, batch_size=batch, grad_accum=accum, world=world, rank=rank,
                         per_epoch=n // (batch * world * accum), seed=7, perms={})


def test_ranks_and_micro_batches_split_one_process_batch_exactly():
    one = _indices(1)[1]
    assert _indices(1, world=2, rank=0, batch=2)[1] + _indices(1, world=2, rank=1, batch=2)[1] == one
    assert _indices(1, 0, accum=2, batch=2)[1] + _indices(1, 1, accum=2, batch=2)[1] == one


def test_an_epoch_visits_every_example_once_and_the_next_epoch_reshuffles():
    epoch0 = [i for step in range(5) for i in _indices(step)[1]]
    epoch1 = [i for step in range(5, 10) for i in _indices(step)[1]]
    assert sorted(epoch0) == sorted(epoch1) == list(range(20))
    assert epoch0 != epoch1 and _indices(5)[0] == 1


def test_fewer_examples_than_one_step_is_an_error():
    assert steps_per_epoch(17, 4, 2, 2) == 1
    with pytest.raises(EffirError, match="fewer than one step's 32"):
        steps_per_epoch(31, 4, 2, 4)


def test_truncate_log_drops_only_matching_lines_past_the_step(tmp_path):
    path = tmp_path / "log.jsonl"
    records = [{"phase": "gates", "step": s} for s in (1, 2, 3)] + [{"phase": "recover", "step": s} for s in (1, 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    truncate_log(path, 1, {"phase": "recover"})
    assert [json.loads(x) for x in path.read_text().splitlines()] == records[:4]
    truncate_log(path, 2)
    assert [json.loads(x) for x in path.read_text().splitlines()] == [records[0], records[1], records[3]]


def test_mean_pairwise_cosine_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    pairs = [0.0, 2 ** -0.5, 2 ** -0.5]  # (0,1), (0,2), (1,2)
    assert mean_pairwise_cosine(x).item() == pytest.approx(sum(pairs) / 3)
    assert mean_pairwise_cosine(torch.ones(5, 3) * torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(4)).item() == pytest.approx(0.0)
