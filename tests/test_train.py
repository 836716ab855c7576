"""hftl.train.evaluate: length-sorted evaluation must score each prediction against its own row."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from hftl import metrics
from hftl.train import cpu_mmap_threshold, evaluate, make_accelerator, return_freed_blocks
from hftl.config import TrainConfig


class Oracle(nn.Module):
    """Predicts the class written in the input: a perfect classifier."""

    def __init__(self, num_labels=3):
        super().__init__()
        self.num_labels = num_labels
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):  # called as hftl's loop calls a model: without labels (the task computes the loss)
        return SimpleNamespace(logits=nn.functional.one_hot(x, self.num_labels).float() + self.dummy)


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


def test_token_budget_slices_give_the_same_evaluation(tiny_bert, toy_rows_validation):
    """train.eval_batch_tokens runs a batch in row slices; predictions, metrics and loss must not change."""
    from datasets import Dataset
    from transformers import AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding

    from hftl.train import eval_dataloader, token_slices

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    ds = Dataset.from_list([{"text": r["text"] + " a b c d" * (i % 7), "labels": int(r["label"] == "positive")}
                            for i, r in enumerate(toy_rows_validation)])
    ds = ds.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    accelerator, modules = make_accelerator(TrainConfig(mixed_precision="no")), metrics.load_metrics(["accuracy"])
    order, dl = eval_dataloader(ds, DataCollatorWithPadding(tokenizer), 16)
    whole = evaluate(model, dl, accelerator, modules, order)
    sliced = evaluate(model, dl, accelerator, modules, order, max_tokens=40)
    assert sliced["predictions"] == whole["predictions"]
    assert sliced["metrics"] == pytest.approx(whole["metrics"], rel=1e-5)
    batch = next(iter(dl))
    parts = list(token_slices(batch, 40))
    width = batch["input_ids"].shape[1]
    assert len(parts) > 1 and all(p["input_ids"].numel() <= max(40, width) for p in parts)
    assert torch.equal(torch.cat([p["labels"] for p in parts]), batch["labels"])  # every row once, in order
    assert list(token_slices(batch, None))[0] is batch


@pytest.mark.parametrize("last_is_best", [True, False])
def test_last_evaluation_runs_once_and_is_the_final_result(make_cfg, tmp_path, monkeypatch, last_is_best):
    """The last step's evaluation runs after training (optimizer state freed) and, when those weights are the best,
    is not repeated: the final metrics are its. When an earlier one is best, its weights come back and are evaluated."""
    import hftl.train
    from conftest import read_json
    from hftl.recipe import train as main

    calls, thresholds = [], []
    real = hftl.train.evaluate
    monkeypatch.setattr(hftl.train, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(hftl.train, "return_freed_blocks", lambda mib, device: thresholds.append((mib, device.type)))
    # Validation loss falls from the first evaluation to the second on the toy data; "best" is the lowest (last) or,
    # with greater_is_better, the highest (first).
    cfg = make_cfg(tmp_path, extra={"train.epochs": 2, "train.evals_per_epoch": 1, "train.metric_for_best": "loss",
                                    "train.greater_is_better": not last_is_best, "output.verify_reload": 0})
    results = main(cfg)
    saved = read_json(tmp_path / "out" / "results.json")
    first, last = saved["history"]
    assert last["eval_loss"] < first["eval_loss"]
    assert saved["best_step"] == (last if last_is_best else first)["step"]
    assert len(calls) == (2 if last_is_best else 3)
    assert thresholds == [(2.0, "cpu")]  # training on the CPU set the malloc threshold, once
    assert results["validation"]["loss"] == pytest.approx((last if last_is_best else first)["eval_loss"])


MMAP_PROBE = """
import ctypes, sys

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Mallinfo2, ctypes.c_void_p, [ctypes.c_void_p]
if sys.argv[1] == "hftl":  # before the blocks below, as fit() does before training
    import torch
    from hftl.train import return_freed_blocks
    assert return_freed_blocks(1.0, torch.device("cpu"))
libc.free(libc.malloc(30 << 20))  # glibc's adaptive threshold follows the largest block freed: now 30 MiB
before = libc.mallinfo2().hblkhd
block = libc.malloc(3 << 20)
print(libc.mallinfo2().hblkhd - before)  # bytes mapped for the 3 MiB block: 0 when it came from the heap
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_runs_map_freed_blocks_on_their_own(monkeypatch):
    """train.cpu_mmap_threshold_mib: a 3 MiB block (an activation tensor) gets its own mapping, which free() returns,
    instead of a heap hole glibc keeps; without it glibc's adaptive threshold puts the block on the heap."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}

    def mapped(setting):
        return int(subprocess.run([sys.executable, "-c", MMAP_PROBE, setting], env=env, capture_output=True, text=True,
                                  check=True).stdout)

    assert mapped("glibc") == 0
    assert mapped("hftl") >= 3 << 20
    cpu = torch.device("cpu")
    assert return_freed_blocks(1.0, torch.device("cuda")) is False  # GPU runs: host memory is not the training's
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # the user's own setting is left alone
    assert return_freed_blocks(1.0, cpu) is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert return_freed_blocks(None, cpu) is False and return_freed_blocks(0, cpu) is False  # glibc's default
    # null: 2 MiB for length-grouped batches; random ones (token classification) keep glibc's default
    assert cpu_mmap_threshold(TrainConfig(group_by_length=True)) == 2.0 and cpu_mmap_threshold(TrainConfig()) == 2.0
    assert cpu_mmap_threshold(TrainConfig(group_by_length=False)) is None
    # grouped batches in random order (token classification's default) change shape every step, as random ones do
    assert cpu_mmap_threshold(TrainConfig(group_by_length=True, shuffle_grouped_batches=True)) is None
    assert cpu_mmap_threshold(TrainConfig(group_by_length=False, cpu_mmap_threshold_mib=4)) == 4
    for bad in (-1, 64):
        with pytest.raises(ValueError, match="train.cpu_mmap_threshold_mib"):
            return_freed_blocks(bad, cpu)
        with pytest.raises(ValueError, match="train.cpu_mmap_threshold_mib"):  # at the start of a run
            make_accelerator(TrainConfig(cpu_mmap_threshold_mib=bad))
