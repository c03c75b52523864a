"""The per-step checks and the loss never wait for the device on a GPU (no ``int(t)``,
``nonzero``, boolean indexing): forced here on the CPU by declaring host syncs expensive, as
they are on CUDA, and counted with a TorchFunctionMode."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from gam.constants import IGNORE_INDEX
from gam.models import inputs as inputs_module
from gam.models.ops import losses
from gam.models.registry import build_model

SYNCS = {"__int__", "__bool__", "__float__", "item", "nonzero", "tolist", "argwhere",
         "masked_select", "unique"}


class SyncCounter(TorchFunctionMode):
    """Records the tensor operations that read a value on the host."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        boolean_index = name == "__getitem__" and len(args) > 1 and isinstance(
            args[1], torch.Tensor) and args[1].dtype == torch.bool
        if name in SYNCS or boolean_index:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def as_on_gpu(monkeypatch):
    for module in (inputs_module, losses):
        monkeypatch.setattr(module, "host_sync_is_cheap", lambda device: False)


def _loss_and_grads(x, w, targets):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = losses.linear_cross_entropy(x, w, targets, chunk_rows=8)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def test_masked_loss_is_bit_identical_to_the_nonzero_one(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 16, generator=g), torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (40,), generator=g)
    targets[::3] = IGNORE_INDEX
    before = _loss_and_grads(x, w, targets)
    monkeypatch.setattr(losses, "host_sync_is_cheap", lambda device: False)
    after = _loss_and_grads(x, w, targets)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["gam", "gam-delta", "mamba", "transformer"])
def test_training_forward_and_backward_read_nothing_on_the_host(as_on_gpu, name):
    torch.manual_seed(0)
    model = build_model(name, "tiny")
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    targets = idx.clone()
    targets[:, :3] = IGNORE_INDEX
    with SyncCounter() as counter:
        _, loss = model(idx, targets=targets, return_logits=False)
        loss.backward()
    assert counter.syncs == []


def test_sync_free_checks_still_refuse_bad_ids(as_on_gpu):
    model = build_model("gam", "tiny")
    bad = torch.tensor([[1, model.config.vocab_size]])
    with pytest.raises(RuntimeError, match="token id is outside"):
        model(bad)
    with pytest.raises(RuntimeError, match="target id is outside"):
        model(bad.clamp(max=3), targets=torch.tensor([[-5, 1]]))


def test_the_counter_sees_the_cpu_checks():
    model = build_model("gam", "tiny")
    idx = torch.randint(0, model.config.vocab_size, (1, 8))
    with SyncCounter() as counter:
        model(idx, targets=idx)
    assert "__int__" in counter.syncs  # on the CPU the checks read min/max: cheap there
