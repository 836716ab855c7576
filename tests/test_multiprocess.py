"""Several processes: two real CPU processes (gloo) started by torchrun, as `accelerate launch` starts them on GPUs.

`accelerate launch --cpu --num_processes 2` starts one process, so these use
`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m hftl train ...`. Run under torchrun as a
script, this file is the child of the NaN test: `hftl train` with a NaN loss injected on process 1;
and of the SIGTERM test: with HFTL_TEST_SIGNAL_GATE=FOLDER, each process says when it trains (a
file in FOLDER) and waits there until it has received SIGTERM.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
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
    from hftl.modalities.text import TEXT
    from hftl.tasks.single_label import SingleLabel

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
    single = evaluate(accelerator.prepare(model), accelerator.prepare(dl), accelerator,
                      load_metrics(SingleLabel([]).configure(cfg).train.metrics), order)
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


def launched(command: list[str], folder: Path, **env) -> subprocess.Popen:
    """`command` on two CPU processes, its output in `folder`/stdout and stderr (a pipe nobody reads could fill up)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", **env}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=err, text=True)


def test_sigterm_to_hftl_torchrun_saves_exits_143_and_the_rerun_finishes(nine_rows_cfg, two_process_run, tmp_path):
    """A scheduler signals the launcher (srun, Kubernetes, `kill PID`); it must exit 143 so the job is requeued.
    Plain torchrun exits 1 with a SignalException traceback, though its workers saved and exited 143."""
    from conftest import read_json
    from hftl import checkpoint

    cfg = nine_rows_cfg(**{"train.save_every": None})
    hftl = [sys.executable, "-m", "hftl", "torchrun", "--standalone", "--nproc_per_node", "2"]
    gate = tmp_path / "gate"
    gate.mkdir()
    run = launched([*hftl, __file__, "0", *cli_overrides(cfg)], tmp_path / "stopped", HFTL_TEST_SIGNAL_GATE=str(gate))
    while len(list(gate.iterdir())) < 2 and run.poll() is None:  # both processes are training
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=300) == 143, (tmp_path / "stopped" / "stderr").read_text()[-4000:]
    stderr = (tmp_path / "stopped" / "stderr").read_text()
    assert "Traceback" not in stderr and "received SIGTERM and passed it to the workers; exit code 143" in stderr, stderr[-4000:]
    folder = Path(f"{cfg.output.dir}.checkpoints")
    assert [p.name for p in folder.iterdir()] == ["step-1"]  # no periodic checkpoints: the one the signal asked for
    checkpoint.verify(folder / "step-1", recorded_run(folder / "step-1"))  # complete
    assert not Path(cfg.output.dir).exists()

    cfg.train.resume = "auto"
    rerun = launched([*hftl, "-m", "hftl", "train", *cli_overrides(cfg)], tmp_path / "resumed")
    assert rerun.wait(timeout=300) == 0, (tmp_path / "resumed" / "stderr").read_text()[-4000:]
    assert f"Resumed from {folder / 'step-1'}: step 1 of 4" in (tmp_path / "resumed" / "stdout").read_text()
    got, want = read_json(Path(cfg.output.dir) / "results.json"), read_json(Path(two_process_run.output.dir) / "results.json")
    assert got["step_log"] == want["step_log"] and got["history"] == want["history"] and got["results"] == want["results"]


# A worker without hftl's imports (seconds, not a training run): `stop` waits for SIGTERM, saves nothing and exits 143
# as hftl's workers do; `exit N` exits N at once.
WORKER = """
import os, pathlib, signal, sys, time
if sys.argv[1] == "exit":
    sys.exit(int(sys.argv[2]))
got = []
signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
pathlib.Path(sys.argv[2], "started-" + os.environ["RANK"]).touch()
deadline = time.monotonic() + 300
while not got and time.monotonic() < deadline:
    time.sleep(0.01)
sys.exit(143 if got else 1)
"""
LAUNCHERS = {"torchrun": ["torchrun", "--standalone", "--nproc_per_node", "2"],
             # accelerate launch --multi_gpu runs torchrun's agent in its own process
             "accelerate-launch": ["launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_hftl_launchers_exit_143_when_the_signal_reaches_them(launcher, tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    gate = tmp_path / "gate"
    gate.mkdir()
    run = launched([sys.executable, "-m", "hftl", *LAUNCHERS[launcher], str(tmp_path / "worker.py"), "stop", str(gate)], tmp_path)
    while len(list(gate.iterdir())) < 2 and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 143, (tmp_path / "stderr").read_text()[-4000:]
    assert "Traceback" not in (tmp_path / "stderr").read_text()


@pytest.mark.parametrize("code", [143, 2])
def test_hftl_torchrun_exits_with_its_workers_code_without_a_traceback(code, tmp_path):
    """Workers stopped by their own signal (143: requeue), or failed (an hftl error: 2); plain torchrun exits 1 for both."""
    (tmp_path / "worker.py").write_text(WORKER)
    run = launched([sys.executable, "-m", "hftl", *LAUNCHERS["torchrun"], str(tmp_path / "worker.py"), "exit", str(code)], tmp_path)
    assert run.wait(timeout=120) == code
    stderr = (tmp_path / "stderr").read_text()
    assert "Traceback" not in stderr
    assert (f"exitcode  : {code}" in stderr) == (code != 143), stderr[-4000:]  # a failure: torchrun's table of failed workers


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


def wait_for_sigterm(load_classifier, folder: Path):
    """Wrap models.load_classifier so that in its first training forward the model writes `folder`/started-RANK and
    waits until this process has received SIGTERM (hftl's stop handler, installed before training, has run too): the
    signal lands in the middle of training however fast the steps are."""

    def load(*args, **kwargs):
        model, new_keys = load_classifier(*args, **kwargs)
        calls = itertools.count(1)

        def hook(module, inputs):
            if not module.training or next(calls) != 1:
                return
            got, stop = [], signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, lambda signum, frame: (got.append(signum), stop(signum, frame)))
            (folder / f"started-{os.environ['RANK']}").touch()
            deadline = time.monotonic() + 300  # a guard, not a measurement: the test fails on the exit code then
            while not got and time.monotonic() < deadline:
                time.sleep(0.01)

        model.register_forward_pre_hook(hook)
        return model, new_keys

    return load


if __name__ == "__main__":
    from hftl.cli import main

    step, *args = sys.argv[1:]  # step 0: no NaN
    if int(os.environ["RANK"]) == 1 and int(step):
        models.load_classifier = nan_at(models.load_classifier, int(step))
    if os.environ.get("HFTL_TEST_SIGNAL_GATE"):
        models.load_classifier = wait_for_sigterm(models.load_classifier, Path(os.environ["HFTL_TEST_SIGNAL_GATE"]))
    raise SystemExit(main(["train", *args]))


def test_compare_on_two_processes_trains_each_run_once_and_writes_one_report(nine_rows_cfg, tmp_path):
    """Every process takes part in every run; results.json is read only after the main process wrote it, and
    only the main process writes the cards' verdicts and the report."""
    from conftest import read_json

    cfg = nine_rows_cfg(**{"train.save_every": None})
    report = tmp_path / "report"
    overrides = [o for o in cli_overrides(cfg) if not o.startswith(("output.dir=", "adapt.mode="))]
    done = torchrun(["-m", "hftl", "compare", "--modes", "head", "--seeds", "0", "--lr-scales", "1", "--out", str(report), *overrides])
    assert done.returncode == 0, done.stderr[-4000:]
    saved = read_json(report / "report.json")
    assert [(r["mode"], r["seed"]) for r in saved["runs"]] == [("scratch", 0), ("head", 0)]
    assert done.stdout.count("| mode |") == 1  # the report printed once, by the main process
    card = (report / "runs" / f"head-all-lr{cfg.train.learning_rate:g}-s0" / "README.md").read_text()
    assert card.count("## Transfer check") == 1


def test_token_classification_on_two_processes_scores_every_sentence_once(tiny_bert, tmp_path):
    """Per-token outputs: the two processes' evaluation batches differ in length (pad_across_processes) and the last
    one is padded with sentences already scored (even_batches). The scores written must be one process's on the saved
    model (`hftl evaluate`), with a prediction for each of the 9 sentences, and the pipeline reload check passes."""
    from conftest import read_json, write_rows
    from hftl.predict import evaluate
    from test_tokens import ner_rows

    train, validation = write_rows(tmp_path / "train.jsonl", ner_rows(64, 0)), write_rows(tmp_path / "validation.jsonl", ner_rows(9, 1))
    out = tmp_path / "out"
    # 64 sentences, 8 a batch on each process: 4 steps an epoch, 32 in all; validation 2 sentences a batch per process
    done = torchrun(["-m", "hftl", "train", "task=token-classification", f"model.name_or_path={tiny_bert}",
                     f"data.train_file={train}", f"data.validation_file={validation}", "data.max_length=24",
                     f"output.dir={out}", "train.batch_size=8", "train.eval_batch_size=2", "train.epochs=8",
                     "train.min_steps=null", "train.learning_rate=0.02"])
    assert done.returncode == 0, done.stderr[-4000:]
    saved = read_json(out / "results.json")["results"]["validation"]
    assert saved["entity_f1"] > 0  # it learned something, so equal scores compare real predictions
    assert len(read_json(out / "predictions_validation.json")) == 9
    single = evaluate(str(out), str(validation), str(tmp_path / "evaluated"))["metrics"]
    assert single == pytest.approx(saved, rel=1e-5)
