"""hftl.train.evaluate: length-sorted evaluation must score each prediction against its own row."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from hftl import metrics
from hftl.train import evaluate, make_accelerator
from hftl.config import TrainConfig


class Oracle(nn.Module):
    """Predicts the class written in the input: a perfect classifier."""

    def __init__(self, num_labels=3):
        super().__init__()
        self.num_labels = num_labels
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, labels):
        logits = nn.functional.one_hot(x, self.num_labels).float() + self.dummy
        return SimpleNamespace(logits=logits, loss=nn.functional.cross_entropy(logits, labels))


ROWS = [2, 0, 1, 1, 0, 2, 2]  # row i holds class ROWS[i]; input == label


@pytest.fixture(scope="module")
def setup():
    accelerator = make_accelerator(TrainConfig(mixed_precision="no"))
    return accelerator, metrics.load_metrics(["accuracy", "f1"])


def test_evaluate_in_row_order(setup):
    accelerator, modules = setup
    rows = [{"x": c, "labels": c} for c in ROWS]
    out = evaluate(Oracle(), DataLoader(rows, batch_size=3), accelerator, modules)
    assert out["predictions"] == ROWS
    assert out["metrics"]["accuracy"] == 1.0 and out["metrics"]["f1"] == 1.0


# Regression: evaluate() once put predictions back in row order before scoring them against the
# still-sorted references, so every final metric of a length-sorted evaluation was wrong.
def test_evaluate_reordered_scores_each_row_against_its_label(setup):
    accelerator, modules = setup
    order = sorted(range(len(ROWS)), key=lambda i: (ROWS[i], -i))  # the dataloader yields rows in this order
    rows = [{"x": ROWS[i], "labels": ROWS[i]} for i in order]
    out = evaluate(Oracle(), DataLoader(rows, batch_size=3), accelerator, modules, order)
    assert out["predictions"] == ROWS  # back in row order
    assert out["metrics"]["accuracy"] == 1.0  # a perfect model
    assert out["metrics"]["f1"] == 1.0


def test_best_state_snapshot_keeps_parameters_that_thaw_later():
    """gradual unfreezing: a layer frozen at the best evaluation but trained afterwards must be restored too."""
    from torch import nn

    from hftl.train import _snapshot

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)  # frozen now, in the optimizer for later
    held = {id(p) for p in model.parameters()}
    assert set(_snapshot(model, held)) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert set(_snapshot(model, set())) == {"1.weight", "1.bias"}  # never trained: nothing to restore
