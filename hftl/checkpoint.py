"""Training checkpoints: Accelerate's save_state/load_state, written atomically and checked before use.

    <train.checkpoint_dir, default OUTPUT_DIR.checkpoints>/
        step-12/   model.safetensors  optimizer.bin  random_states_<process>.pkl
                   scheduler.json  loop.json  loop_best.safetensors (the loop's own state: no pickle, so
                   resuming a checkpoint from elsewhere runs no code; Accelerate's own files load weights_only)
                   hftl_checkpoint.json   <- completion marker: every file's size and sha256
        .step-16.tmp/                     <- being written (or left by a crash); never resumed from

Every process writes its part into the temporary folder; the main process then records the files
in the marker and renames the folder into place, so a `step-N` folder with a marker is complete.
Before resuming, every recorded file is checked, and a missing, truncated or altered one is an
error that names it: Accelerate's load_state would otherwise skip a missing RNG file silently.
A marker can also be rewritten to match (by another tool, or by hand), so what the files hold is
checked too: a file the marker does not list, a file its loader refuses, loop.json values that do
not fit this run, and an RNG state that load_state did not restore (it logs that at info level and
goes on) are each an error that names the file.
The folder must be on a filesystem every process (every node) sees, as for Accelerate's save_state.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import zipfile
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object
from accelerate.utils import load as accelerate_load
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import outdir
from .config import Config, ConfigError
from .errors import UserError

MARKER = "hftl_checkpoint.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
# What each file Accelerate writes holds, for error messages (first matching prefix wins).
ROLES = (
    ("model", "model weights"),
    ("pytorch_model", "model weights"),
    ("optimizer", "optimizer state"),
    ("scheduler", "learning-rate scheduler state"),
    ("loop", "training-loop state (step, epoch, history, best evaluation)"),
    ("random_states", "random-number-generator state"),
    ("scaler", "gradient-scaler state"),
    ("sampler", "sampler state"),
)
EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a shell and batch schedulers read as "terminated, may be requeued"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from, or a checkpoint folder in the way; the message says what to do."""


class Preempted(SystemExit):
    """Raised after the checkpoint a stop signal asked for is complete; the process exits with 143."""

    def __init__(self):
        super().__init__(EXIT_PREEMPTED)


def root(cfg: Config) -> Path:
    return Path(cfg.train.checkpoint_dir or f"{cfg.output.dir}.checkpoints")


def check_settings(cfg: Config) -> None:
    t = cfg.train
    if t.save_every is not None and t.save_every < 1:
        raise ConfigError(f"train.save_every={t.save_every}; give a number of optimizer steps >= 1, or null for no periodic checkpoints.")
    if t.keep_last < 1:
        raise ConfigError(f"train.keep_last={t.keep_last}; keep at least 1 checkpoint.")


def _role(name: str) -> str:
    return next((role for prefix, role in ROLES if name.split("/")[0].startswith(prefix)), "checkpoint file")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        os.fsync(f.fileno())  # on disk before the folder is declared complete
    return h.hexdigest()


def complete(folder: Path) -> list[Path]:
    """Complete checkpoints (step-N with a marker) under `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


# loop.json: train.LoopState's fields (less best_state, kept in loop_best.safetensors) and the JSON types each must have.
LOOP_FIELDS = {"step": int, "epoch": int, "batches": int, "stopped": bool, "history": list, "log": list,
               "best": (dict, type(None)), "bad_evals": int, "running": (int, float), "n_running": int, "seconds": (int, float)}
# What Accelerate's load_state unpickles (with weights_only=True) from the folder: weights, optimizer, sampler, scaler, RNG state.
PICKLED = (".bin", ".pt", ".pkl")
CUSTOM_STATE = re.compile(r"^custom_checkpoint_\d+\.pkl$")  # Accelerate's register_for_checkpointing files


def _reason(e: Exception) -> str:
    """Why a loader refused a file, in one line (torch.load's weights_only message is a paragraph)."""
    text = str(e).strip()
    if "WeightsUnpickler error:" in text:
        why = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].split(" Please use")[0].rstrip(".")
        return f"torch.load(weights_only=True) refuses it: {why}"
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# Settings a checkpoint's run record holds since a later version, and what a checkpoint without one ran with.
RECORDED_LATER = {"train.optimizer": "adamw"}


def verify(path: Path, run: dict, bounds: dict | None = None) -> dict:
    """Check `path` is a complete checkpoint of a run like `run`; return its marker. Raises CheckpointError.

    `bounds` (this run's total_steps, steps_per_epoch, batches_per_epoch, accumulation): loop.json's step, epoch and
    batch must fit them."""
    fix = f"Delete '{path}' to resume from an earlier checkpoint, or set train.resume to another step folder."
    marker = path / MARKER
    if not path.is_dir():
        raise CheckpointError(f"train.resume: checkpoint folder '{path}' does not exist.")
    if not marker.is_file():
        if complete(path):
            raise CheckpointError(f"train.resume: '{path}' holds checkpoints; name one (train.resume={complete(path)[-1]}) or set train.resume=auto.")
        raise CheckpointError(f"checkpoint '{path}' is incomplete: it has no {MARKER} (written last, once every file is saved). {fix}")
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
        if not (isinstance(files, dict) and isinstance(info["run"], dict) and isinstance(info["step"], int)
                and all(isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str) for r in files.values())):
            raise ValueError("expected step, run and files (each file's bytes and sha256)")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint '{path}': {MARKER} is unreadable ({e}). {fix}") from None
    for name, rec in files.items():
        f = path / name
        what = f"checkpoint '{path}': file '{name}' ({_role(name)})"
        if not f.is_file():
            raise CheckpointError(f"{what} is missing. {fix}")
        if f.stat().st_size != rec["bytes"]:
            raise CheckpointError(f"{what} has {f.stat().st_size} bytes, {rec['bytes']} were written: it is truncated or was replaced. {fix}")
        if _sha256(f) != rec["sha256"]:
            raise CheckpointError(f"{what} does not match the sha256 recorded when it was written: it is corrupted. {fix}")
    # Accelerate's load_state reads files by name, recorded or not: a file added later would be loaded unchecked.
    unlisted = sorted({p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - set(files) - {MARKER})
    if unlisted:
        raise CheckpointError(f"checkpoint '{path}' holds files its {MARKER} does not list: {unlisted}. They were added after "
                              f"it was written; remove them, or {fix[0].lower()}{fix[1:]}")
    for key, value in run.items():
        if info["run"].get(key, RECORDED_LATER.get(key)) != value:
            raise CheckpointError(
                f"checkpoint '{path}' was written with {key}={info['run'].get(key, RECORDED_LATER.get(key))}; this run has {key}={value}, so it "
                f"cannot continue exactly. Resume with the same setting, or start afresh in another train.checkpoint_dir."
            )
    needed = ["scheduler.json", "loop.json", *(f"random_states_{i}.pkl" for i in range(info["run"].get("processes", 1)))]
    for name in needed:
        if name not in files:
            raise CheckpointError(f"checkpoint '{path}': {MARKER} lists no '{name}' ({_role(name)}), which every hftl checkpoint "
                                  f"holds: without it the run cannot continue exactly. {fix}")
    for name in files:
        what = f"checkpoint '{path}': file '{name}' ({_role(name)})"
        if CUSTOM_STATE.match(name):
            raise CheckpointError(f"{what} is Accelerate's register_for_checkpointing state, which hftl never writes (Accelerate "
                                  f"would unpickle it with weights_only=False, which can run code). {fix}")
        if "/" in name:
            continue  # FSDP / DeepSpeed subfolders: their own loaders read them
        f = path / name
        try:  # as load_state will (weights_only), so a refusal names the file; mapped, not read into memory
            if name.endswith(PICKLED):
                accelerate_load(f, map_location="cpu", mmap=zipfile.is_zipfile(f), weights_only=True)
            elif name.endswith(".safetensors"):
                with safe_open(str(f), "pt") as st:
                    st.keys()
            elif name.endswith(".json"):
                json.loads(f.read_text())
        except Exception as e:  # noqa: BLE001 - any loader's refusal, reported as one line
            raise CheckpointError(f"{what} cannot be loaded ({_reason(e)}). {fix}") from None
    state = json.loads((path / "loop.json").read_text())
    problem = _loop_problem(state, info["step"], bounds)
    if problem:
        raise CheckpointError(f"checkpoint '{path}': file 'loop.json' ({_role('loop.json')}) {problem}. {fix}")
    scheduler = json.loads((path / "scheduler.json").read_text())
    if not isinstance(scheduler, dict) or scheduler.get("last_epoch") != state["step"]:
        raise CheckpointError(f"checkpoint '{path}': file 'scheduler.json' ({_role('scheduler.json')}) is not the state of a "
                              f"scheduler stepped {state['step']} times (loop.json's step). {fix}")
    return info


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _loop_problem(state, marker_step: int, bounds: dict | None) -> str | None:
    """What in loop.json's values cannot be this run's state after `marker_step` optimizer steps, or None."""
    if not isinstance(state, dict):
        return f"holds a JSON {type(state).__name__}, not an object"
    if set(state) != set(LOOP_FIELDS):
        return f"has the keys {sorted(state)}, not {sorted(LOOP_FIELDS)}"
    for key, types in LOOP_FIELDS.items():
        value = state[key]
        if isinstance(value, bool) != (types is bool) or not isinstance(value, types):
            return f"has {key}={_short(value)}; expected {' or '.join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))}"
        if type(value) in (int, float) and not (math.isfinite(value) and (value >= 0 or key == "running")):
            return f"has {key}={value!r}; expected a finite number" + ("" if key == "running" else " >= 0")
    step = state["step"]
    if bounds is not None:
        total, per_epoch, batches, acc = bounds["total_steps"], bounds["steps_per_epoch"], bounds["batches_per_epoch"], bounds["accumulation"]
        if not 0 < step <= total:
            return f"has step={step}; this run has {total} optimizer steps"
        if state["batches"] >= batches or state["batches"] % acc:
            return (f"has batches={state['batches']}; an epoch of this run has {batches} batches, and a checkpoint follows a "
                    f"multiple of train.gradient_accumulation_steps={acc} of them")
        if step != state["epoch"] * per_epoch + state["batches"] // acc:
            return (f"has step={step}, epoch={state['epoch']}, batches={state['batches']}, which disagree: this run has "
                    f"{per_epoch} optimizer steps an epoch, of {acc} batches each")
    if step != marker_step:
        return f"has step={step}, but {MARKER} records step {marker_step}"
    if len(state["log"]) != step or any(not isinstance(e, dict) or e.get("step") != i + 1 for i, e in enumerate(state["log"])):
        return f"has a log of {len(state['log'])} entries; expected one per optimizer step done, steps 1 to {step}"
    if any(not isinstance(e, dict) or type(e.get("step")) is not int or not 0 < e["step"] <= step for e in state["history"]):
        return f"has a history entry that is not an evaluation at a step from 1 to {step}"
    best = state["best"]
    if best is not None and not (type(best.get("step")) is int and 0 < best["step"] <= step and isinstance(best.get("metrics"), dict)):
        return f"has best={_short(best)}; expected the step (1 to {step}) and metrics of an evaluation"
    return None


def _on_main(accelerator, fn):
    """Run `fn` on the main process only; every process gets its result or raises its error (none waits forever)."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every process
            error = e
    if accelerator.num_processes > 1:
        result, shared = broadcast_object_list([result, error])
        error = error or shared
    if error is not None:
        raise error
    return result


def find_resume(cfg: Config, run: dict, accelerator, bounds: dict | None = None) -> Path | None:
    """The checkpoint to resume from (verified; `bounds` as for verify), or None to start afresh. Same answer on every process."""
    t, folder = cfg.train, root(cfg)

    def choose() -> str | None:
        existing = complete(folder)
        if t.resume is None:
            if existing:
                if not cfg.output.overwrite:
                    raise CheckpointError(
                        f"'{folder}' holds checkpoints of an earlier run (newest: {existing[-1].name}). Set train.resume=auto "
                        "to continue it, output.overwrite=true to start afresh and replace them, or another train.checkpoint_dir."
                    )
                try:
                    verify(existing[-1], run)
                    could = "train.resume=auto would have continued it"
                except CheckpointError as e:
                    could = f"train.resume=auto could not have continued it: {e}"
                print(f"output.overwrite=true: deleting '{folder}', the checkpoints of an earlier run (newest: "
                      f"{existing[-1].name}); {could}", flush=True)
                shutil.rmtree(folder)
            return None
        path = (existing[-1] if existing else None) if t.resume == "auto" else Path(t.resume)
        if path is not None:
            verify(path, run, bounds)  # auto never falls back past a bad newest checkpoint: that would silently lose steps
        return None if path is None else str(path)

    path = _on_main(accelerator, choose)
    return None if path is None else Path(path)


def _save_states(folder: Path, scheduler, loop) -> None:
    """Scheduler and loop state as JSON, the best weights as safetensors: Accelerate's register_for_checkpointing
    would pickle them, and unpickling a checkpoint from elsewhere could run code."""
    (folder / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    state = loop.state_dict()
    best = state.pop("best_state")
    (folder / "loop.json").write_text(json.dumps(state))
    if best is not None:
        save_file({k: v.contiguous() for k, v in best.items()}, str(folder / "loop_best.safetensors"))


def load_states(folder: Path, scheduler, loop) -> None:
    """Counterpart of _save_states, after accelerator.load_state."""
    state = json.loads((folder / "scheduler.json").read_text())
    if set(state) != set(scheduler.state_dict()):
        raise CheckpointError(f"checkpoint '{folder}': file 'scheduler.json' ({_role('scheduler.json')}) has the keys {sorted(state)}; "
                              f"this run's train.scheduler has {sorted(scheduler.state_dict())}.")
    scheduler.load_state_dict(state)
    state = json.loads((folder / "loop.json").read_text())
    best = folder / "loop_best.safetensors"
    state["best_state"] = load_file(str(best)) if best.is_file() else None
    loop.load_state_dict(state)


def _rng_restored(folder: Path, process: int) -> None:
    """Raise unless this process's RNG state is the one its file holds. Accelerate's load_state restores it inside a
    `try` that only logs a failure (at info level): the run would go on with other dropout masks, not exactly."""
    name = f"random_states_{process}.pkl"
    what = f"checkpoint '{folder}': file '{name}' ({_role(name)})"
    try:
        states = accelerate_load(folder / name, weights_only=True)
        py, numpy_state, cpu = states["random_state"], states["numpy_random_seed"], states["torch_manual_seed"]
        cuda = states["torch_cuda_manual_seed"] if torch.cuda.is_available() else []
    except KeyError as e:  # e.g. written without CUDA, resumed with it
        raise CheckpointError(f"{what} holds no {e.args[0]!r} state, which this machine's load_state needs.") from None
    except Exception as e:  # noqa: BLE001 - any loader's refusal, reported as one line
        raise CheckpointError(f"{what} cannot be loaded ({_reason(e)}).") from None
    now = np.random.get_state()
    restored = (random.getstate() == py and now[0] == numpy_state[0] and np.array_equal(now[1], numpy_state[1])
                and tuple(now[2:]) == tuple(numpy_state[2:]) and torch.equal(torch.get_rng_state(), cpu)
                and (not torch.cuda.is_available() or len(cuda) == torch.cuda.device_count()
                     and all(torch.equal(a, b.cpu()) for a, b in zip(torch.cuda.get_rng_state_all(), cuda))))
    if not restored:
        raise CheckpointError(f"{what} holds a state that Accelerate's load_state could not restore (it went on without "
                              "it), so the run would not continue exactly.")


def load(accelerator, folder: Path, scheduler, loop) -> None:
    """Resume from the verified checkpoint `folder` on every process: Accelerate's load_state, then the RNG check and
    the loop's own state. A failure on any process is a CheckpointError on every process (none waits forever)."""
    error = None
    try:
        try:
            accelerator.load_state(str(folder))
        except Exception as e:  # noqa: BLE001 - e.g. weights of another model: one line, not a traceback
            raise CheckpointError(f"checkpoint '{folder}' does not load into this run ({_reason(e)}).") from None
        _rng_restored(folder, accelerator.process_index)
        load_states(folder, scheduler, loop)
    except CheckpointError as e:
        error = str(e)
    errors = gather_object([error]) if accelerator.num_processes > 1 else [error]
    if any(errors):
        raise CheckpointError(next(e for e in errors if e) + f" Delete '{folder}' to resume from an earlier checkpoint, or set "
                              "train.resume to another step folder.")


def save(accelerator, folder: Path, step: int, keep_last: int, run: dict, publish=lambda path: None,
         scheduler=None, loop=None) -> Path:
    """Write a complete checkpoint of step `step` atomically; keep the newest `keep_last`. Call on every process.

    `publish(path)` runs on the main process once the checkpoint is in place (hub.push_checkpoint)."""
    final, tmp = folder / f"step-{step}", folder / f".step-{step}.tmp"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a run that died while writing this step
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except Exception as e:
        _failed(accelerator, folder, tmp, e)
    accelerator.wait_for_everyone()

    def finish() -> None:
        if loop is not None:
            _save_states(tmp, scheduler, loop)
        missing = [f"random_states_{i}.pkl" for i in range(accelerator.num_processes) if not (tmp / f"random_states_{i}.pkl").is_file()]
        if missing:
            raise CheckpointError(
                f"checkpoint '{tmp}': {missing} written by other processes are not visible here; train.checkpoint_dir "
                "must be on a filesystem that every node shares."
            )
        files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        with open(tmp / MARKER, "w") as f:
            json.dump({"step": step, "run": run, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step again (a resume from an earlier checkpoint): the new one wins
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete(folder)[:-keep_last]:
            shutil.rmtree(old)
        publish(final)

    try:
        _on_main(accelerator, finish)
    except Exception as e:
        _failed(accelerator, folder, tmp, e)
    accelerator.wait_for_everyone()  # nobody exits (e.g. on SIGTERM) before the checkpoint is in place
    return final


def _failed(accelerator, folder: Path, tmp: Path, e: Exception):
    """A checkpoint write failed: remove the partial folder (complete checkpoints stay), and say "disk full" in one
    line when that is why."""
    full = outdir.disk_full(e, tmp)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    if not full:
        raise e
    kept = complete(folder)
    then = (f"continue from its newest complete checkpoint, {kept[-1]}, with train.resume=auto" if kept else
            "start again (no checkpoint of this run is complete yet)")
    raise CheckpointError(f"disk full: writing checkpoint '{tmp}' failed ({str(e).strip().splitlines()[0]}); the partial "
                          f"folder was removed. Free some space on that disk (or lower train.keep_last), then {then}.") from e


@contextlib.contextmanager
def stop_signals():
    """Record SIGTERM/SIGUSR1 (SLURM's advance warning) instead of dying; the loop stops at a step boundary."""
    received: list[str] = []
    signals = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None]
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set from the main thread
        yield received
        return
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signal.Signals(signum).name)) for s in signals}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
