"""effir.training: data order, log truncation, the schedule's errors, the loop's divergence check (the loop's
training itself runs in the stage tests)."""

import json

import pytest
import torch

from effir.train_checkpoints import truncate_log
from effir.training import batch_indices, mean_pairwise_cosine, steps_per_epoch, train_steps
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


def _diverging_run(tmp_path, bad_step: int, what: str):
    """train_steps on one weight for 5 steps, checkpointing after each; step ``bad_step`` goes wrong in ``what``."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    saved = []

    def micro_batch(step, micro):
        w = model.weight.sum()
        if step + 1 == bad_step and what == "loss":
            w = w * float("nan")
        elif step + 1 == bad_step and what == "gradient":
            w.register_hook(lambda g: g * float("inf"))  # the loss stays finite, its gradient does not
        elif step + 1 == bad_step:
            optimizer.param_groups[0]["lr"] = float("inf")  # the step itself is fine; the update it applies is not
        return w * w, {"doc_cos": torch.tensor(0.0), "tokens": torch.tensor(1.0)}, 0

    with pytest.raises(EffirError, match=f"diverged at step {bad_step}") as info:
        train_steps(acc, model, optimizer, scheduler, micro_batch, start=0, total=5, grad_accum=1,
                    max_grad_norm=None, log_path=tmp_path / "log.jsonl", save=saved.append, save_every=1,
                    save_last=True, progress=False)
    return saved, str(info.value)


@pytest.mark.parametrize("what", ["loss", "gradient", "weights"])
def test_a_diverged_step_stops_the_loop_before_it_is_saved(tmp_path, what):
    saved, message = _diverging_run(tmp_path, 3, what)
    # loss / gradient: caught before step 3 is applied; weights: caught before step 3's checkpoint is written
    assert saved == [1, 2], saved
    expected = {"loss": "the loss is nan", "gradient": "gradient norm is inf", "weights": "no longer finite"}
    assert expected[what] in message
    assert "\n" not in message
