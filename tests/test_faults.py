"""Faults at the edges of a run: nothing the user has is lost (issue 14, "data loss").

The default preset does not overwrite; a kill at the final swap leaves the old or the new folder whole and the next
start cleans up; two runs on one folder cannot both train; a full disk is refused before training and, during a write,
gives one line and loses no trained model; a symbolic-link output.dir is written through.

Disk-full tests run on a small real tmpfs where `mount` is allowed (root), and by injecting ENOSPC everywhere. Run as
a script, this file is the child process of the kill and lock tests:

    python tests/test_faults.py swap OUT POINT    # hub.save_output over an existing OUT, SIGKILL-ing itself at POINT
    python tests/test_faults.py hold FOLDER       # hold FOLDER's run lock (hftl/outdir.py) until stdin closes
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the child processes import hftl from this checkout
    sys.path.insert(0, str(REPO_ROOT))

from hftl import outdir  # noqa: E402

CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
             "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc renames in the child: strace counts only save_output's


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (None for a folder), with each file's bytes."""
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes() for p in sorted(Path(folder).rglob("*"))}


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def error_line(err: str) -> str:
    """The CLI's one error line (stderr also has the model-loading report and progress bars), checking there is one."""
    assert err.count("hftl: error:") == 1 and "Traceback" not in err, err[-3000:]
    start = err.index("hftl: error: ")  # after a progress bar's carriage return
    return err[start:err.index("\n", start)]


def train_args(tiny_bert, toy_data, out, *extra) -> list[str]:
    """`hftl train` on the embedded default preset (no CONFIG), with the tiny model and toy data."""
    return ["train", f"model.name_or_path={tiny_bert}", f"data.train_file={toy_data['train']}",
            f"data.validation_file={toy_data['validation']}", "data.max_length=16", "train.batch_size=8",
            "train.learning_rate=0.005", "train.max_steps=2", "output.verify_reload=4", f"output.dir={out}", *extra]


# ---------------------------------------------------------------- 1. no preset overwrites


def test_no_preset_turns_overwrite_on():
    from hftl.cli import DEFAULT_CONFIG
    from hftl.config import load_config

    presets = sorted((REPO_ROOT / "recipes" / "configs").rglob("*.yaml"))
    assert DEFAULT_CONFIG in presets and len(presets) > 5
    assert [p.name for p in presets if load_config(p).output.overwrite] == []


def test_rerun_of_the_default_preset_refuses_and_overwrite_says_what_it_deletes(tiny_bert, toy_data, tmp_path, capsys):
    """The README's `hftl train data.train_file=... output.dir=X` twice: the second refuses and changes nothing."""
    from hftl.cli import main

    out = tmp_path / "X"
    args = train_args(tiny_bert, toy_data, out, "train.save_every=1")
    assert main(args) == 0
    assert (out / "model.safetensors").is_file() and (tmp_path / "X.checkpoints" / "step-2").is_dir()
    before = tree(tmp_path)
    capsys.readouterr()

    assert main(args) == 2
    err = error_line(capsys.readouterr().err)
    assert f"'{out}' exists and is not empty" in err and "output.overwrite=true" in err
    assert tree(tmp_path) == before  # X and X.checkpoints as they were, nothing beside them

    # Asked for: the run says, before deleting them, which checkpoints go and that train.resume=auto would have continued.
    assert main([*args, "output.overwrite=true"]) == 0
    said = capsys.readouterr().out
    assert (f"output.overwrite=true: deleting '{tmp_path / 'X.checkpoints'}', the checkpoints of an earlier run (newest: step-2); "
            "train.resume=auto would have continued it") in said
    assert said.index("deleting") < said.index("Saved")


# ---------------------------------------------------------------- 2. a kill at the final swap

OLD = {"old.txt": b"the previous run", "model.safetensors": b"old weights " * 50_000}
NEW = {"config.json": b'{"new": true}', "model.safetensors": bytes(range(256)) * 4096, "tokenizer.json": b"{}",
       "README.md": b"# new card\n"}


class _Parts:
    """Stand-ins for model, processor and card: they write NEW's files (the swap does not care what they are)."""

    def __init__(self, names):
        self.names = names

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name in self.names:
            (Path(folder) / name).write_bytes(NEW[name])

    def save(self, path):
        Path(path).write_bytes(NEW["README.md"])


def _swap_child(out: str, point: str) -> None:
    from hftl import hub

    def die(*_):
        os.kill(os.getpid(), signal.SIGKILL)

    exchange = outdir.exchange
    if point == "before-exchange":
        outdir.exchange = die
    elif point == "after-exchange":
        outdir.exchange = lambda a, b: (exchange(a, b), die())
    elif point in ("fallback", "between-renames"):  # as on an OS without renameat2(RENAME_EXCHANGE)
        outdir.exchange = lambda a, b: False
    if point == "between-renames":
        calls, replace = itertools.count(1), os.replace
        os.replace = lambda a, b: die() if next(calls) == 2 else replace(a, b)
    hub.save_output(out, _Parts(["config.json", "model.safetensors"]), _Parts(["tokenizer.json"]), _Parts([]), {}, overwrite=True)


def _old_output(out: Path) -> None:
    out.mkdir()
    for name, data in OLD.items():
        (out / name).write_bytes(data)


def _left(out: Path, kind: str) -> dict:
    (folder,) = [p for p in outdir.leftovers(out) if f".{kind}-" in p.name]
    return tree(folder)


# After a kill at each point: what is at output.dir, what is beside it, and what the next start makes of it.
KILLS = {
    "before-exchange": {"out": OLD, "tmp": NEW, "after": OLD},
    "after-exchange": {"out": NEW, "tmp": OLD, "after": NEW},
    "between-renames": {"out": None, "old": OLD, "tmp": NEW, "after": OLD},
}


def _check_killed(out: Path, expect: dict) -> None:
    assert (tree(out) if out.exists() else None) == expect["out"]
    for kind in ("tmp", "old"):
        if kind in expect:
            assert _left(out, kind) == expect[kind]
    said = []
    outdir.recover(out, say=said.append)  # what the next run does first (run.claim), with the lock held
    assert tree(out) == expect["after"]
    assert siblings(out) == []
    assert len(said) == len(expect) - 2 and all("killed" in line for line in said)
    if expect["out"] is None:
        assert said[0].startswith(f"Restored '{out}' from '.out.old-")


@pytest.mark.parametrize("point", KILLS)
def test_kill_at_the_swap_leaves_old_or_new_whole_and_the_next_start_cleans_up(point, tmp_path):
    out = tmp_path / "out"
    _old_output(out)
    child = subprocess.run([sys.executable, __file__, "swap", str(out), point], env=CHILD_ENV, capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    _check_killed(out, KILLS[point])


def _strace() -> str | None:
    strace = shutil.which("strace")
    if strace and subprocess.run([strace, "-f", "-qq", "-o", os.devnull, "true"], capture_output=True).returncode == 0:
        return strace
    return None


@pytest.mark.skipif(_strace() is None, reason="strace is not installed or cannot trace here")
@pytest.mark.parametrize("syscall,point,kill", [("renameat2", "exchange", "before-exchange"),
                                                ("rename", "fallback", "between-renames")])
def test_sigkill_injected_at_the_rename_syscall(syscall, point, kill, tmp_path):
    """The issue's reproduction: strace kills the process at the swap's first (exchange) or second (rename) syscall."""
    if syscall == "renameat2" and outdir.RENAMEAT2 is None:
        pytest.skip("no renameat2 here")
    out = tmp_path / "out"
    _old_output(out)
    when = 2 if point == "fallback" else 1
    child = subprocess.run([_strace(), "-f", "-qq", "-o", os.devnull, "-e", f"inject={syscall}:signal=SIGKILL:when={when}",
                            sys.executable, __file__, "swap", str(out), point], env=CHILD_ENV, capture_output=True, text=True,
                           timeout=120)
    assert child.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), child.stderr[-3000:]
    _check_killed(out, KILLS[kill])


def test_exchange_swaps_two_folders(tmp_path):
    if outdir.RENAMEAT2 is None:
        pytest.skip("no renameat2 here: save_output renames one folder after the other")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "f").write_text("a"), (tmp_path / "b" / "f").write_text("b")
    assert outdir.exchange(tmp_path / "a", tmp_path / "b") is True
    assert (tmp_path / "a" / "f").read_text() == "b" and (tmp_path / "b" / "f").read_text() == "a"


def test_a_run_starts_by_restoring_a_lone_backup_and_removing_leftovers(tiny_bert, toy_data, tmp_path, capsys):
    """output.dir missing beside a .old- backup (killed between the renames), a .tmp- folder and a checkpoint the kill
    cut off: the run puts the backup back, which it then refuses to overwrite; the leftovers are gone."""
    from hftl.cli import main

    out = tmp_path / "out"
    _old_output(tmp_path / ".out.old-0123abcd")
    (tmp_path / ".out.tmp-89abcdef").mkdir()
    (tmp_path / ".out.tmp-89abcdef" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "out.checkpoints" / ".step-3.tmp").mkdir(parents=True)
    assert main(train_args(tiny_bert, toy_data, out)) == 2
    captured = capsys.readouterr()
    assert f"Restored '{out}' from '.out.old-0123abcd'" in captured.out
    assert f"Removed '{tmp_path / '.out.tmp-89abcdef'}'" in captured.out
    assert f"Removed '{tmp_path / 'out.checkpoints' / '.step-3.tmp'}'" in captured.out
    assert f"'{out}' exists and is not empty" in captured.err
    assert tree(out) == OLD
    assert siblings(out) == ["out.checkpoints"] and list((tmp_path / "out.checkpoints").iterdir()) == []


# ---------------------------------------------------------------- 3. one run at a time


def _hold_child(folder: str) -> None:
    with outdir.lock(Path(folder), "output.dir"):
        print("held", flush=True)
        sys.stdin.read()


def _holder(folder: Path) -> subprocess.Popen:
    """A separate process that holds `folder`'s lock until its stdin is closed."""
    child = subprocess.Popen([sys.executable, __file__, "hold", str(folder)], env=CHILD_ENV, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "held\n"
    return child


@pytest.mark.parametrize("held", ["output.dir", "train.checkpoint_dir"])
def test_a_second_run_on_a_folder_in_use_refuses_naming_the_holder(held, tiny_bert, toy_data, tmp_path, capsys):
    from hftl.cli import main

    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    _old_output(out)
    holder = _holder(out if held == "output.dir" else ckpt)
    (tmp_path / ".out.tmp-0badcafe").mkdir()  # as if the holder were writing its output: not a leftover to remove
    (ckpt / ".step-2.tmp").mkdir(parents=True)
    try:
        before = tree(tmp_path)
        # Another output.dir, the same checkpoint folder: the checkpoints' lock catches it.
        run_out = out if held == "output.dir" else tmp_path / "other"
        assert main(train_args(tiny_bert, toy_data, run_out, f"train.checkpoint_dir={ckpt}", "output.overwrite=true")) == 2
        err = error_line(capsys.readouterr().err)
        lock = out.parent / f".{(out if held == 'output.dir' else ckpt).name}.lock"
        assert f"is in use by another hftl run (pid {holder.pid}, lock file '{lock}')" in err
        assert f"{held} '" in err
        assert tree(tmp_path) == before
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    assert not lock.exists()  # released and removed by its holder


def test_a_killed_holder_does_not_block(tmp_path):
    """The kernel drops a dead process's flock: its lock file, still naming its pid, does not stop the next run."""
    out = tmp_path / "out"
    holder = _holder(out)
    holder.kill()
    holder.wait(timeout=60)
    lock = tmp_path / ".out.lock"
    assert lock.read_text() == f"{holder.pid}\n"  # left behind by the kill
    with outdir.lock(out, "output.dir"):
        assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()


# ---------------------------------------------------------------- 4. a full disk


@pytest.fixture
def small_fs(tmp_path):
    """A real 64 MB tmpfs (skipped where mounting is not allowed)."""
    fs = tmp_path / "fs"
    fs.mkdir()
    mount = shutil.which("mount")
    done = subprocess.run([mount, "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(fs)], capture_output=True, text=True) if mount else None
    if done is None or done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() if done else 'no mount command'})")
    yield fs
    if subprocess.run(["umount", str(fs)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def fill(fs: Path, leave: int = 0) -> Path:
    """Take all of `fs`'s free space but `leave` bytes."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, shutil.disk_usage(fs).free - leave)
    finally:
        os.close(fd)
    return filler


def at_training_forward(monkeypatch, n: int, action):
    """Run `action` at the n-th training forward of the model the run loads."""
    import hftl.models

    load = hftl.models.load_classifier

    def loading(*args, **kwargs):
        model, new_keys = load(*args, **kwargs)
        calls = itertools.count(1)

        def hook(module, inputs):  # returns None: the inputs stay as they are
            if module.training and next(calls) == n:
                action()

        model.register_forward_pre_hook(hook)
        return model, new_keys

    monkeypatch.setattr(hftl.models, "load_classifier", loading)


def no_training(monkeypatch):
    import hftl.recipe

    def fit(*args, **kwargs):
        raise AssertionError("training started: the free-space check must come first")

    monkeypatch.setattr(hftl.recipe, "fit", fit)


def test_too_little_space_is_refused_before_training(small_fs, tiny_bert, toy_data, tmp_path, monkeypatch, capsys):
    from hftl.cli import main

    fill(small_fs, leave=8 * outdir.MB)  # less than a model folder's 16 MB margin
    out = small_fs / "out"
    no_training(monkeypatch)
    assert main(train_args(tiny_bert, toy_data, out)) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("hftl: error: disk full: not enough space for output.dir")
    assert f"'{out}'" in err and "MB needed, 8.0 MB free" in err
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]  # no lock, no reserve, no folder


def test_too_little_space_for_the_checkpoints_is_refused(tiny_bert, toy_data, tmp_path, monkeypatch, capsys):
    """Injected: a filesystem with room for the model folder but not for train.keep_last + 1 checkpoints."""
    from hftl.cli import main

    needs = []
    check = outdir.check_space
    monkeypatch.setattr(outdir, "check_space", lambda n: (needs.append(n), check(n)))
    no_training(monkeypatch)
    free = 17 * outdir.MB  # the tiny model's folder needs a little over 16 MB (its margin), its checkpoints ~0.4 MB each
    monkeypatch.setattr(outdir, "free_bytes", lambda folder: free)
    assert main(train_args(tiny_bert, toy_data, tmp_path / "out", "train.save_every=1", "train.keep_last=4")) == 2
    (((_, _, output), (what, folder, ckpts)),) = needs
    assert output < free < output + ckpts and what == "5 checkpoint(s) in" and folder == tmp_path / "out.checkpoints"
    err = error_line(capsys.readouterr().err)
    assert f"disk full: not enough space for output.dir '{tmp_path / 'out'}'" in err and f"5 checkpoint(s) in '{folder}'" in err
    assert siblings(tmp_path / "out") == []


def enospc(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_disk_full_during_a_checkpoint_real(small_fs, tiny_bert, toy_data, tmp_path, monkeypatch, capsys):
    """Checkpoints on a tmpfs that fills up after the first one: one line, the partial one gone, and train.resume=auto
    continues from the complete one once there is room."""
    from hftl.checkpoint import MARKER, complete
    from hftl.cli import main

    ckpt = small_fs / "ckpt"
    args = train_args(tiny_bert, toy_data, tmp_path / "out", "train.save_every=1", "train.max_steps=3", f"train.checkpoint_dir={ckpt}")
    filler = []
    at_training_forward(monkeypatch, 2, lambda: filler.append(fill(small_fs)))  # step 1's checkpoint is written by then
    assert main(args) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"hftl: error: disk full: writing checkpoint '{ckpt / '.step-2.tmp'}' failed")
    assert f"continue from its newest complete checkpoint, {ckpt / 'step-1'}, with train.resume=auto" in err
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-1"] and (ckpt / "step-1" / MARKER).is_file()
    assert not (tmp_path / "out").exists()

    filler[0].unlink()
    monkeypatch.undo()
    assert main([*args, "train.resume=auto"]) == 0
    assert f"Resumed from {ckpt / 'step-1'}: step 1 of 3" in capsys.readouterr().out
    assert [p.name for p in complete(ckpt)] == ["step-2", "step-3"]


def test_disk_full_during_a_checkpoint_injected(tiny_bert, toy_data, tmp_path, monkeypatch, capsys):
    """The same, with ENOSPC raised while the scheduler state is written (no tmpfs needed)."""
    import hftl.checkpoint
    from hftl.cli import main

    ckpt = tmp_path / "out.checkpoints"
    calls = itertools.count(1)
    real = hftl.checkpoint._save_states

    def failing(folder, scheduler, loop):
        real(folder, scheduler, loop)
        if next(calls) == 2:
            enospc(folder / "loop.json")

    monkeypatch.setattr(hftl.checkpoint, "_save_states", failing)
    assert main(train_args(tiny_bert, toy_data, tmp_path / "out", "train.save_every=1")) == 2
    err = error_line(capsys.readouterr().err)
    assert f"disk full: writing checkpoint '{ckpt / '.step-2.tmp'}' failed ([Errno 28] No space left on device" in err
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-1"]
    assert siblings(tmp_path / "out") == ["out.checkpoints"]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("how", ["real", "injected"])
def test_disk_full_at_the_final_write_loses_no_trained_model(how, tiny_bert, toy_data, tmp_path, monkeypatch, capsys, request):
    """The final write fails (tmpfs filled once training is done, or ENOSPC injected): one line that names the
    checkpoint of the last step; nothing half-written; train.resume=auto then writes the model without training."""
    import hftl.hub
    from hftl.cli import main

    fs = request.getfixturevalue("small_fs") if how == "real" else tmp_path
    out, ckpt = fs / "out", tmp_path / "ckpt"
    # 3 steps, a checkpoint every 2: the last step's own checkpoint (step-3) holds the trained model.
    args = train_args(tiny_bert, toy_data, out, "train.save_every=2", "train.max_steps=3", f"train.checkpoint_dir={ckpt}")
    save, filler = hftl.hub.save_output, []

    class FullDisk:
        def __init__(self, processor):
            self.processor = processor

        def save_pretrained(self, folder):
            self.processor.save_pretrained(folder)
            enospc(Path(folder) / "tokenizer.json")

    def failing(out_dir, model, processor, *args, **kwargs):
        if how == "real":
            filler.append(fill(fs))  # the space the run set aside is free again at this point: take it
        return save(out_dir, model, processor if how == "real" else FullDisk(processor), *args, **kwargs)

    monkeypatch.setattr(hftl.hub, "save_output", failing)
    assert main(args) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"hftl: error: disk full: writing output.dir '{out}' failed")
    assert f"The trained model is kept in checkpoint '{ckpt / 'step-3'}', this run's last step" in err and "train.resume=auto" in err
    assert sorted(p.name for p in fs.iterdir()) == (["filler"] if how == "real" else ["ckpt"])  # no output, no .out.tmp-*

    for f in filler:
        f.unlink()
    monkeypatch.undo()
    assert main([*args, "train.resume=auto"]) == 0
    said = capsys.readouterr().out
    assert f"Resumed from {ckpt / 'step-3'}: step 3 of 3" in said and "Training" not in said
    final, kept = _weights(out), _weights(ckpt / "step-3")
    assert "classifier.weight" in final and all((final[k] == kept[k]).all() for k in final if k in kept)


def test_the_space_set_aside_keeps_the_final_write_possible(small_fs, tiny_bert, toy_data, monkeypatch):
    """Something fills the disk while the run trains: the final write still fits, in the space set aside before training."""
    from hftl.cli import main

    at_training_forward(monkeypatch, 1, lambda: fill(small_fs))
    assert main(train_args(tiny_bert, toy_data, small_fs / "out")) == 0
    assert (small_fs / "out" / "model.safetensors").is_file()
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler", "out"]  # the reserve went into the output


def test_disk_full_error_is_recognised_from_each_library(tmp_path):
    """torch.save's RuntimeError has no errno: it counts when the disk it wrote to has no room left."""
    assert outdir.disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert outdir.disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"), tmp_path)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert not outdir.disk_full(torch_error, tmp_path)  # this disk has room
    assert not outdir.disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)


# ---------------------------------------------------------------- 5. a symbolic link as output.dir


def test_symlink_output_dir_is_written_through(make_cfg, tmp_path, capsys):
    from hftl.recipe import train as main

    real, link = tmp_path / "disk" / "model", tmp_path / "link"
    real.parent.mkdir()
    _old_output(real)
    link.symlink_to(real, target_is_directory=True)
    main(make_cfg(tmp_path, extra={"output.dir": str(link), "output.overwrite": True, "train.max_steps": 2,
                                   "output.verify_reload": 4}))
    assert f"output.dir '{link}' is a symbolic link: writing into '{real}'" in capsys.readouterr().out
    assert link.is_symlink() and link.resolve() == real
    assert (real / "model.safetensors").is_file() and not (real / "old.txt").exists()
    assert siblings(real) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["disk", "link"]


def test_symlink_loop_is_refused(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(outdir.OutputError, match="symbolic link that cannot be followed"):
        outdir.real(tmp_path / "a")


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    {"swap": _swap_child, "hold": _hold_child}[command](*rest)
