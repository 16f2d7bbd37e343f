import pytest
import torch

from effir.utils import EffirError, check_device, init_distributed_from_env, lr_schedule


@pytest.mark.parametrize("cuda, device, backend", [
    (True, None, "nccl"), (True, "cuda:0", "nccl"), (True, "cpu", "gloo"), (False, None, "gloo"),
])
def test_process_group_backend_follows_the_device(monkeypatch, cuda, device, backend):
    """nccl cannot move CPU tensors: --device cpu under torchrun on a GPU machine must join a gloo group."""
    seen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: seen.append(backend))
    assert init_distributed_from_env(device) is True
    assert seen == [backend]


def test_alone_no_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: pytest.fail("must not join"))
    assert init_distributed_from_env("cpu") is False


# -- check_device: only the devices this machine has (faked: two GPUs, no mps) --------------------------------------
@pytest.mark.parametrize(("device", "message"), [
    ("cpu", None), ("cpu:0", None), ("cuda", None), ("cuda:0", None), ("cuda:1", None), (None, None),
    ("cpu:1", "--device cpu:1: this machine has no such device; use one of cpu, cuda:0, cuda:1$"),
    ("cuda:2", "--device cuda:2: this machine has no such device; use one of cpu, cuda:0, cuda:1$"),
    ("mps", "--device mps: this machine has no such device"),
    ("meta", "--device meta: this machine has no such device"),
    ("gpu0", "--device 'gpu0' is not a device; use one of cpu, cuda:0, cuda:1$"),
])
def test_check_device_accepts_only_devices_that_exist(monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if message is None:
        check_device(device)
    else:
        with pytest.raises(EffirError, match=message):
            check_device(device)


# -- lr_schedule: multipliers of the peak lr, by hand -----------------------------------------------------------------
@pytest.mark.parametrize(("warmup_ratio", "schedule", "total", "expected"), [
    # 10 steps, 20 % warm-up = 2 steps: (step + 1) / 3, then decay over the 8 steps left (progress = (step - 2) / 8)
    (0.2, "linear", 10, {0: 1 / 3, 1: 2 / 3, 2: 1.0, 6: 0.5, 9: 0.125, 10: 0.0}),
    (0.2, "cosine", 10, {0: 1 / 3, 2: 1.0, 4: 0.5 + 0.25 * 2 ** 0.5, 6: 0.5, 10: 0.0}),
    (0.2, "constant", 10, {0: 1 / 3, 1: 2 / 3, 2: 1.0, 9: 1.0}),
    (0.0, "linear", 4, {0: 1.0, 1: 0.75, 3: 0.25}),  # no warm-up: the peak at step 0
    (0.15, "linear", 10, {0: 0.5, 1: 1.0, 10: 0.0}),  # 1.5 warm-up steps round down to 1
    (1.0, "linear", 4, {0: 0.2, 3: 0.8}),  # warm-up over every step: the peak is never reached
    (0.5, "linear", 4, {2: 1.0, 3: 0.5, 7: 0.0}),  # past the last step: stays at 0
])
def test_lr_schedule_values_by_hand(warmup_ratio, schedule, total, expected):
    f = lr_schedule(warmup_ratio, schedule, total)
    assert {step: f(step) for step in expected} == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("warmup_ratio", "schedule", "total", "message"), [
    (0.1, "step", 10, "--schedule must be one of linear, cosine, constant, got 'step'"),
    (-0.1, "linear", 10, "--warmup-ratio must be in [0, 1], got -0.1"),
    (1.5, "linear", 10, "--warmup-ratio must be in [0, 1], got 1.5"),
    (float("nan"), "linear", 10, "--warmup-ratio must be in [0, 1], got nan"),
    (0.1, "linear", 0, "needs at least 1 step, got 0"),
])
def test_lr_schedule_errors(warmup_ratio, schedule, total, message):
    with pytest.raises(EffirError) as info:
        lr_schedule(warmup_ratio, schedule, total)
    assert message in str(info.value)
