"""The server's pool inference runs on every core and leaves the caller's thread setting alone."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from fedapps import training
from fedapps.models import build_model


class ThreadSpy(nn.Module):
    """Identity-like model that records how many torch threads each forward pass had."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        return self.linear(x)


@pytest.fixture
def one_thread():
    """The state a client handler leaves behind in an in-process run: one torch thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_torch_threads_raises_then_restores(one_thread):
    with training.torch_threads(3):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == 1


def test_torch_threads_restores_after_an_error(one_thread):
    with pytest.raises(RuntimeError), training.torch_threads(3):
        raise RuntimeError("inference failed")
    assert torch.get_num_threads() == 1


def test_predict_all_gives_one_model_every_core(one_thread, monkeypatch):
    monkeypatch.setattr(training, "available_cores", lambda: 3)
    spy = ThreadSpy()
    training.predict_all([spy], torch.randn(10, 4), torch.device("cpu"))
    assert spy.seen == [3]
    assert torch.get_num_threads() == 1


def test_predict_all_runs_models_side_by_side_one_thread_each(monkeypatch):
    monkeypatch.setattr(training, "available_cores", lambda: 2)
    together = threading.Barrier(2, timeout=10)  # broken unless two passes run at once

    class Together(ThreadSpy):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            together.wait()
            return super().forward(x)

    spies = [Together() for _ in range(4)]
    previous = torch.get_num_threads()
    training.predict_all(spies, torch.randn(10, 4), torch.device("cpu"))
    assert [spy.seen for spy in spies] == [[1]] * 4
    assert torch.get_num_threads() == previous


def test_predict_all_outputs_equal_one_model_at_a_time(one_thread, monkeypatch):
    monkeypatch.setattr(training, "available_cores", lambda: 2)
    torch.manual_seed(0)
    models = [build_model(name, (1, 28, 28), 10) for name in ("cnn1", "cnn2")]
    pool = torch.randn(50, 1, 28, 28)
    expected = [training.predict(model, pool, torch.device("cpu")) for model in models]
    outputs = training.predict_all(models, pool, torch.device("cpu"))
    for got, want in zip(outputs, expected):
        assert torch.equal(got, want)

