"""Training loops and losses shared by every method: plain PyTorch, explicit loops.

Local training (CE), deep mutual learning (FedMe), reverse/forward distillation (async scheme),
evaluation and batched inference all live here, so the Flower layer only moves tensors around.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Optim:
    """SGD settings of the paper (momentum 0.9, weight decay 1e-4) plus gradient clipping."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_norm: float = 10.0  # 0 disables clipping
    batch_size: int = 20

    def sgd(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), self.clip_norm)
        optimizer.step()


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA GPU is visible to this process")
    return torch.device(name)


def batches(
    x: torch.Tensor, y: torch.Tensor | None, batch_size: int, generator: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Shuffled minibatches when ``generator`` is given, in order otherwise."""
    order = (
        torch.randperm(len(x), generator=generator)
        if generator is not None
        else torch.arange(len(x))
    )
    for start in range(0, len(x), batch_size):
        index = order[start : start + batch_size]
        yield x[index], (y[index] if y is not None else None)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    optim: Optim,
    generator: torch.Generator,
    device: torch.device,
) -> float:
    """Cross-entropy training; returns the mean loss of the last epoch (nan if no data)."""
    model.to(device).train()
    optimizer = optim.sgd(model)
    last = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for xb, yb in batches(x, y, optim.batch_size, generator):
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            optim.step(model, optimizer, loss)
            total, count = total + loss.item() * len(yb), count + len(yb)
        last = total / max(count, 1)
    return last


def mutual_learning_losses(
    logits_p: torch.Tensor,
    logits_ex: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deep mutual learning (FedMe eq. 5-6): each model's CE plus KL from the detached peer.

    L_p = CE(y, p_p) + w * KL(p_ex || p_p),  L_ex = CE(y, p_ex) + w * KL(p_p || p_ex);
    KL is averaged per sample ('batchmean') and scaled by T^2 so the gradient size does not
    depend on the temperature.
    """
    return (
        F.cross_entropy(logits_p, labels)
        + kl_weight * soft_kl(logits_p, logits_ex.detach(), temperature),
        F.cross_entropy(logits_ex, labels)
        + kl_weight * soft_kl(logits_ex, logits_p.detach(), temperature),
    )


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """KL(teacher || student) on temperature-softened outputs, 'batchmean', times T^2."""
    return (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=1),
            F.log_softmax(teacher_logits / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )


def train_mutual(
    personal: nn.Module,
    exchange: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    optim: Optim,
    generator: torch.Generator,
    device: torch.device,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
) -> tuple[float, float]:
    """Train both models on the same minibatches; returns their last-epoch mean losses."""
    models = (personal.to(device).train(), exchange.to(device).train())
    optimizers = [optim.sgd(model) for model in models]
    last = (float("nan"), float("nan"))
    for _ in range(epochs):
        totals, count = [0.0, 0.0], 0
        for xb, yb in batches(x, y, optim.batch_size, generator):
            xb, yb = xb.to(device), yb.to(device)
            losses = mutual_learning_losses(
                models[0](xb), models[1](xb), yb, temperature, kl_weight
            )
            for model, optimizer, loss, slot in zip(models, optimizers, losses, (0, 1)):
                optim.step(model, optimizer, loss)
                totals[slot] += loss.item() * len(yb)
            count += len(yb)
        last = (totals[0] / max(count, 1), totals[1] / max(count, 1))
    return last


def distill(
    student: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    epochs: int,
    optim: Optim,
    generator: torch.Generator,
    device: torch.device,
    temperature: float = 1.0,
) -> float:
    """Fit ``student`` to ``teacher``'s soft outputs on unlabeled ``x``; returns last mean KL."""
    student.to(device).train()
    teacher.to(device).eval()
    optimizer = optim.sgd(student)
    last = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for xb, _ in batches(x, None, optim.batch_size, generator):
            xb = xb.to(device)
            with torch.no_grad():
                target = teacher(xb)
            loss = soft_kl(student(xb), target, temperature)
            optim.step(student, optimizer, loss)
            total, count = total + loss.item() * len(xb), count + len(xb)
        last = total / max(count, 1)
    return last


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 1024):
    """Logits for all of ``x`` in large batches (one pass per model, as FedMe's server needs)."""
    model.to(device).eval()
    outputs = [model(xb.to(device)).float().cpu() for xb, _ in batches(x, None, batch_size, None)]
    return torch.cat(outputs) if outputs else torch.empty(0)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the whole machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads, then restore the caller's setting.

    Whoever ran before may have lowered it: client handlers set one thread
    (``fedapps.client``), so in-process runs leave the server on one core, and Ray's cluster
    launcher exports OMP_NUM_THREADS=1 to the commands it runs on nodes.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def predict_all(
    models: Sequence[nn.Module], x: torch.Tensor, device: torch.device
) -> list[torch.Tensor]:
    """Every model's logits on ``x``, on all cores: the server's pool inference.

    The clients are idle while the server runs the models on its unlabeled pool, so the pass
    may take the whole machine. On a CPU the models run side by side, one per core with one
    torch thread each, because a small CNN on a few hundred images can scale badly across
    threads (benchmarks/round_time.py measures both: rates "pool" per core and
    "pool_all_cores"); the price is up to one forward pass per core in memory at once. On a GPU
    the models run one after another; the thread count only affects host-side work there.
    """
    cores = available_cores()
    workers = max(1, min(cores, len(models))) if device.type == "cpu" else 1
    # Set in this thread before the pool's threads start (fresh threads every call): a thread
    # takes the process's setting when it first uses torch, and then keeps its own.
    with torch_threads(cores // workers):
        if workers == 1:
            return [predict(model, x, device) for model in models]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda model: predict(model, x, device), models))


@torch.inference_mode()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> EvalResult:
    if len(y) == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    logits = predict(model, x, device)
    loss = F.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return EvalResult(loss, accuracy, len(y))


def average_states(
    states: list[Mapping[str, torch.Tensor]], weights: list[float] | None = None
) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts of one architecture (integer buffers keep the first)."""
    weights = weights or [1.0] * len(states)
    total = float(sum(weights))
    result = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            stacked = torch.stack([s[name].double() * w for s, w in zip(states, weights)])
            result[name] = (stacked.sum(dim=0) / total).to(first.dtype)
        else:
            result[name] = first.clone()
    return result
