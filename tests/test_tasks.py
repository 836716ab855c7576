"""The task seam (hftl/tasks/): single-label's train.class_weights and train.label_smoothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import ClassLabel, Dataset
from torch.nn import functional as F

from hftl.config import ConfigError, load_config
from hftl.tasks.single_label import SingleLabel


def _task(labels, *overrides):
    task = SingleLabel(["a", "b", "c"])
    task.observe_train(Dataset.from_dict({"labels": labels}, features=None).cast_column("labels", ClassLabel(names=["a", "b", "c"])))
    task.configure(load_config(None, list(overrides)))
    return task


def test_balanced_class_weights_and_label_smoothing_shape_the_loss():
    task = _task([0, 0, 0, 0, 1, 1, 2, 2], "train.class_weights=balanced", "train.label_smoothing=0.1")
    # scikit-learn's balanced weights: 8 rows / (3 classes x rows of the class)
    assert task.weight.tolist() == pytest.approx([8 / 12, 8 / 6, 8 / 6])
    logits, labels = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1])
    want = F.cross_entropy(logits, labels, weight=torch.tensor([8 / 12, 8 / 6, 8 / 6]), label_smoothing=0.1)
    assert float(task.loss(logits, labels)) == pytest.approx(float(want))
    assert float(task.loss(logits, labels)) != pytest.approx(float(F.cross_entropy(logits, labels)))
    listed = _task([0, 1, 2], "train.class_weights=[1, 2, 0.5]")
    assert listed.weight.tolist() == [1.0, 2.0, 0.5] and listed.smoothing == 0.0
    # the solved head minimises plain log-loss: it hands such a run to AdamW
    assert isinstance(listed.solve(None, None, None, None, None, None), str)


@pytest.mark.parametrize("spec", ["[1, 2]", "[1, 2, -1]", "heavy"])
def test_class_weights_that_do_not_fit_the_labels_are_refused(spec):
    with pytest.raises(ConfigError, match=r"train.class_weights=.*3 weights of at least 0, one per label in this order: a, b, c"):
        _task([0, 1, 2], f"train.class_weights={spec}")


def test_a_weighted_smoothed_run_trains_and_saves(make_cfg, tmp_path):
    from hftl.recipe import train

    cfg = make_cfg(tmp_path, adapt__mode="head", train__class_weights="balanced", train__label_smoothing=0.1, train__epochs=2)
    results = train(cfg)
    saved = json.loads((Path(cfg.output.dir) / "results.json").read_text())
    assert saved["solver"] is None  # trained with AdamW on the weighted, smoothed loss, not solved
    assert 0 <= results["validation"]["accuracy"] <= 1
