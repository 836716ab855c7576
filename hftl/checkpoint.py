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
The folder must be on a filesystem every process (every node) sees, as for Accelerate's save_state.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path

from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file

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


def verify(path: Path, run: dict) -> dict:
    """Check `path` is a complete checkpoint of a run like `run`; return its marker. Raises CheckpointError."""
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
    except (ValueError, KeyError) as e:
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
    for key, value in run.items():
        if info["run"].get(key) != value:
            raise CheckpointError(
                f"checkpoint '{path}' was written with {key}={info['run'].get(key)}; this run has {key}={value}, so it "
                f"cannot continue exactly. Resume with the same setting, or start afresh in another train.checkpoint_dir."
            )
    return info


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


def find_resume(cfg: Config, run: dict, accelerator) -> Path | None:
    """The checkpoint to resume from (verified), or None to start afresh. Same answer on every process."""
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
                shutil.rmtree(folder)
            return None
        path = (existing[-1] if existing else None) if t.resume == "auto" else Path(t.resume)
        if path is not None:
            verify(path, run)  # auto never falls back past a bad newest checkpoint: that would silently lose steps
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
    scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
    state = json.loads((folder / "loop.json").read_text())
    best = folder / "loop_best.safetensors"
    state["best_state"] = load_file(str(best)) if best.is_file() else None
    loop.load_state_dict(state)


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
    accelerator.save_state(str(tmp))
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

    _on_main(accelerator, finish)
    accelerator.wait_for_everyone()  # nobody exits (e.g. on SIGTERM) before the checkpoint is in place
    return final


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
