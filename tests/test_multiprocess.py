"""Several processes: two real CPU processes (gloo) started by torchrun, as `accelerate launch` starts them on GPUs.

`accelerate launch --cpu --num_processes 2` starts one process, so these use
`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m hftl train ...`. Run under torchrun as a
script, this file is the child of the NaN test: `hftl train` with a NaN loss injected on process 1.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hftl import models
from test_resume import cli_overrides, recorded_run

REPO_ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def torchrun(args: list[str], use_cpu: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    env.pop("ACCELERATE_USE_CPU", None)
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    # --standalone: a free rendezvous port, so parallel runs on one machine do not collide.
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)


@pytest.fixture
def nine_rows_cfg(make_cfg, tmp_path):
    """Nine validation rows, evaluated two at a time: the last batch is short, and on two processes
    Accelerate pads it with rows it already evaluated (even_batches), which gather_for_metrics must drop."""
    from conftest import toy_rows, write_rows

    validation = write_rows(tmp_path / "validation9.csv", toy_rows(9, seed=1))

    def make(**extra):
        # 64 rows, 16 a batch on each of 2 processes: 2 optimizer steps an epoch, 4 in all; a checkpoint every 2.
        return make_cfg(tmp_path, extra={"data.validation_file": str(validation), "train.eval_batch_size": 2,
                                         "train.batch_size": 16, "train.epochs": 2, "train.save_every": 2, **extra})

    return make


_reference: dict[str, object] = {}


@pytest.fixture
def two_process_run(nine_rows_cfg, tmp_path_factory):
    """Config of the uninterrupted two-process run, whose output.dir holds its results (run once per session)."""
    if "cfg" not in _reference:
        cfg = nine_rows_cfg(**{"output.dir": str(tmp_path_factory.mktemp("two_processes") / "out")})
        done = torchrun(["-m", "hftl", "train", *cli_overrides(cfg)])
        assert done.returncode == 0, done.stderr[-4000:]
        _reference["cfg"] = cfg
    return _reference["cfg"]


def test_two_processes_evaluate_every_example_once_and_only_the_main_process_writes(two_process_run):
    from conftest import read_json
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hftl.data import load_splits
    from hftl.metrics import load_metrics
    from hftl.train import eval_dataloader, evaluate
    from recipes.text_classification import TEXT

    cfg = two_process_run
    out = Path(cfg.output.dir)
    saved = read_json(out / "results.json")
    assert len(saved["step_log"]) == 4
    assert len(read_json(out / "predictions_validation.json")) == 9  # the pipeline reload check ran on all 9
    # Checkpoints written by both processes: the weights once, each process's RNG state.
    step = Path(f"{out}.checkpoints/step-4")
    assert {"model.safetensors", "random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in step.iterdir()}
    assert recorded_run(step)["processes"] == 2
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no temporary folders left

    # The same model evaluated by a single process, batch size 2 (the last batch holds one row).
    model = AutoModelForSequenceClassification.from_pretrained(out)
    splits, _ = load_splits(cfg.data, cfg.train.seed, TEXT.input_keys)
    encoded, collator = TEXT.prepare(splits, AutoTokenizer.from_pretrained(out), cfg)
    order, dl = eval_dataloader(encoded["validation"], collator, 2)
    accelerator = Accelerator()
    single = evaluate(accelerator.prepare(model), accelerator.prepare(dl), accelerator, load_metrics(cfg.train.metrics), order)
    # The mean loss sums the rows in another order on two processes: equal up to float rounding.
    assert single["metrics"] == pytest.approx(saved["results"]["validation"], rel=1e-6)
    assert [model.config.id2label[p] for p in single["predictions"]] == read_json(out / "predictions_validation.json")


def test_nan_on_one_process_stops_every_process_at_the_same_step_and_the_rerun_resumes(nine_rows_cfg, two_process_run):
    from conftest import read_json
    from hftl import checkpoint

    cfg = nine_rows_cfg()
    done = torchrun([__file__, "3", *cli_overrides(cfg)])  # NaN in step 3, after step-2 is saved
    assert done.returncode != 0
    text = done.stdout + done.stderr
    # Each process reports the stop itself (hftl's CLI prints the error and exits 2).
    assert text.count("hftl: error: non-finite training loss (nan) at optimizer step 3 on at least one process") == 2, text[-4000:]
    folder = Path(f"{cfg.output.dir}.checkpoints")
    assert [p.name for p in folder.iterdir()] == ["step-2"]
    checkpoint.verify(folder / "step-2", recorded_run(folder / "step-2"))  # intact
    assert f"last complete checkpoint, {folder / 'step-2'}, is untouched" in text
    assert not Path(cfg.output.dir).exists()

    # Resumed on two processes (no NaN this time), the run is the uninterrupted one.
    cfg.train.resume = "auto"
    done = torchrun([__file__, "0", *cli_overrides(cfg)])
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"Resumed from {folder / 'step-2'}: step 2 of 4" in done.stdout
    got, want = read_json(Path(cfg.output.dir) / "results.json"), read_json(Path(two_process_run.output.dir) / "results.json")
    assert got["step_log"] == want["step_log"] and got["history"] == want["history"] and got["results"] == want["results"]


def test_torchrun_on_cpu_without_accelerate_use_cpu_is_refused(nine_rows_cfg):
    """Without ACCELERATE_USE_CPU=1, a CPU torchrun starts two single-process runs that would both write."""
    cfg = nine_rows_cfg()
    done = torchrun(["-m", "hftl", "train", *cli_overrides(cfg)], use_cpu=False)
    assert done.returncode != 0
    assert "WORLD_SIZE=2" in done.stderr and "ACCELERATE_USE_CPU=1" in done.stderr, done.stderr[-4000:]
    assert not Path(cfg.output.dir).exists() and not Path(f"{cfg.output.dir}.checkpoints").exists()


def nan_at(load_classifier, forward: int):
    """Wrap models.load_classifier so the classifier's output turns NaN in its `forward`-th training call."""

    def load(*args, **kwargs):
        model, new_keys = load_classifier(*args, **kwargs)
        calls = itertools.count(1)
        model.classifier.register_forward_hook(
            lambda module, inputs, output: output * float("nan") if module.training and next(calls) == forward else None
        )
        return model, new_keys

    return load


if __name__ == "__main__":
    from hftl.cli import main

    step, *args = sys.argv[1:]  # step 0: no NaN
    if int(os.environ["RANK"]) == 1 and int(step):
        models.load_classifier = nan_at(models.load_classifier, int(step))
    raise SystemExit(main(["train", *args]))


def test_compare_on_two_processes_trains_each_run_once_and_writes_one_report(nine_rows_cfg, tmp_path):
    """Every process takes part in every run; results.json is read only after the main process wrote it, and
    only the main process writes the cards' verdicts and the report."""
    from conftest import read_json

    cfg = nine_rows_cfg(**{"train.save_every": None})
    report = tmp_path / "report"
    overrides = [o for o in cli_overrides(cfg) if not o.startswith(("output.dir=", "adapt.mode="))]
    done = torchrun(["-m", "hftl", "compare", "--modes", "head", "--seeds", "0", "--out", str(report), *overrides])
    assert done.returncode == 0, done.stderr[-4000:]
    saved = read_json(report / "report.json")
    assert [(r["mode"], r["seed"]) for r in saved["runs"]] == [("scratch", 0), ("head", 0)]
    assert done.stdout.count("| mode |") == 1  # the report printed once, by the main process
    card = (report / "runs" / "head-all-s0" / "README.md").read_text()
    assert card.count("## Transfer check") == 1
