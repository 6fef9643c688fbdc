"""The one training loop every classification study uses, so differences come from the norm, not the loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as tnn
import torch.nn.functional as F
from torch import Tensor

from .data import Split

DIVERGED_LOSS = 1e3


@dataclass
class History:
    """What one run recorded: per-step training loss, per-epoch accuracies, and whether it blew up."""

    step_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    diverged: bool = False

    def to_dict(self) -> dict:
        return {
            "step_loss": self.step_loss,
            "train_acc": self.train_acc,
            "test_acc": self.test_acc,
            "test_loss": self.test_loss,
            "diverged": self.diverged,
            "final_train_acc": self.train_acc[-1] if self.train_acc else math.nan,
            "final_test_acc": self.test_acc[-1] if self.test_acc else math.nan,
            "final_test_loss": self.test_loss[-1] if self.test_loss else math.nan,
        }


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global generator (init, dropout) and return a generator for data order."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def evaluate(model: tnn.Module, x: Tensor, y: Tensor, batch: int = 500) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode, restoring the previous mode."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        logits = model(x[i : i + batch])
        loss += float(F.cross_entropy(logits, y[i : i + batch], reduction="sum"))
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    model.train(was_training)
    return loss / len(x), correct / len(x)


def make_optimizer(model: tnn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 (the setting of the BN/GN papers) or Adam."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def train_classifier(
    model: tnn.Module,
    data: Split,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str = "cpu",
    optimizer: str = "sgd",
    on_step: Callable[[int, tnn.Module], None] | None = None,
) -> History:
    """Mini-batch training with a seeded shuffle and drop-last batches; stops early once the loss diverges."""
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    opt = make_optimizer(model, optimizer, lr)
    history = History()
    step = 0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator).to(device)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            value = float(loss.detach())
            history.step_loss.append(value)
            if not math.isfinite(value) or value > DIVERGED_LOSS:
                history.diverged = True
                return history
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if on_step is not None:
                on_step(step, model)
        history.train_acc.append(evaluate(model, x_train, y_train)[1])
        test_loss, test_acc = evaluate(model, x_test, y_test)
        history.test_loss.append(test_loss)
        history.test_acc.append(test_acc)
    return history
