import pytest
import torch

from effir.utils import init_distributed_from_env


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
