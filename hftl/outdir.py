"""The folders a run writes, on disk: one run at a time on each, what a killed run left put back or removed, free
space checked before training, and the atomic exchange that puts a finished output folder in place.

Beside OUT (output.dir) and C (train.checkpoint_dir, default OUT.checkpoints), in their parent folder:

    .OUT.lock  .C.lock        fcntl.flock-ed by the run's main process from start to end; hold its pid
    .OUT.reserve              free space set aside for the final write while the run trains
    .OUT.tmp-XXXXXXXX         the new output being written and checked (hub.save_output)
    .OUT.old-XXXXXXXX         the previous output for an instant, where the OS cannot exchange two folders atomically

A run that dies leaves the lock file (the kernel drops the lock itself), the reserve and the temporary folders;
the next run on OUT removes them, or restores a lone .OUT.old-* when OUT is missing, and says so.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs on the same folder are not kept apart there
    fcntl = None

from .errors import UserError

MB = 2**20


class OutputError(UserError, RuntimeError):
    """The output folder, or the disk it is on, is in the way; the message says what to do."""


class DiskFullError(OutputError):
    """Not enough free space for what the run writes (before training), or a write that ran out of it."""


def real(path: str | Path) -> Path:
    """`path`, or the folder it points to when it is a symbolic link: the run writes there and the link stays
    (swapping a new folder in at the link's path would replace the link by a folder and leave the old one)."""
    p = Path(path)
    if not p.is_symlink():
        return p
    try:
        return p.resolve()
    except (OSError, RuntimeError) as e:  # a loop of links
        raise OutputError(f"'{path}' is a symbolic link that cannot be followed ({e}); give a folder path.") from None


# ---------------------------------------------------------------- one run at a time


@contextlib.contextmanager
def lock(folder: Path, key: str):
    """Hold `.NAME.lock` beside `folder` while the block runs; refuse when another process holds it.

    flock is dropped by the kernel when its holder dies, so a lock file left by a killed run does not block."""
    if fcntl is None:
        yield
        return
    path = folder.parent / f".{folder.name}.lock"
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{key} '{folder}': cannot create '{path}' ({e.strerror}); choose a folder you can write to.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError(f"cannot lock '{path}' for {key} '{folder}' ({e.strerror}); put it on a filesystem that "
                                  "supports file locks.") from None
            raise OutputError(f"{key} '{folder}' is in use by another hftl run (pid {holder}, lock file '{path}'); wait for "
                              f"it to finish, or give this run another {key}.") from None
        try:  # the holder we raced with may have removed the file as it finished: then lock the new one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # still holding it: whoever opens the path next gets a fresh file
        os.close(fd)


# ---------------------------------------------------------------- what a killed run left


def leftovers(folder: Path) -> list[Path]:
    """The temporary folders, backups and reserve of earlier writes of `folder`, in its parent."""
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(?:(?:tmp|old)-[0-9a-f]{{8}}|reserve)")
    return sorted(p for p in folder.parent.iterdir() if pattern.fullmatch(p.name)) if folder.parent.is_dir() else []


def recover(folder: Path, say=print) -> None:
    """Put back, or remove, what runs killed while writing `folder` left beside it. Call with its lock held: no live
    run is writing there then. Each action is one line through `say`."""
    left = leftovers(folder)
    backups = [p for p in left if ".old-" in p.name]
    if backups and not os.path.lexists(folder):
        if len(backups) > 1:
            raise OutputError(f"'{folder}' is missing and {len(backups)} earlier versions of it are beside it "
                              f"({', '.join(p.name for p in backups)}); rename the one to keep to '{folder.name}'.")
        os.rename(backups[0], folder)
        left.remove(backups[0])
        say(f"Restored '{folder}' from '{backups[0].name}': a run was killed while replacing it, before the new folder was in place.")
    for p in left:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        say(f"Removed '{p}', left by a run that was killed while writing '{folder}'.")


# ---------------------------------------------------------------- the swap


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


RENAMEAT2 = _renameat2()
AT_FDCWD, RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` (both exist) in one atomic step: Linux renameat2(RENAME_EXCHANGE). False where the
    OS or the filesystem cannot; the caller then renames one after the other."""
    if RENAMEAT2 is None:
        return False
    if RENAMEAT2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush `folder`'s files and directories to disk: renamed into place after this, it is whole even after a power loss."""
    for p in [*folder.rglob("*"), folder]:
        if p.is_file() or p.is_dir():
            fsync(p)


# ---------------------------------------------------------------- free space


def _existing(folder: Path) -> Path:
    folder = Path(os.path.abspath(folder))
    while not folder.exists():
        folder = folder.parent
    return folder


def free_bytes(folder: Path) -> int:
    """Free bytes on the filesystem `folder` is (or will be) on."""
    return shutil.disk_usage(_existing(folder)).free


def check_space(needs: list[tuple[str, Path, int]]) -> None:
    """Refuse (DiskFullError) when what the run will write does not fit. `needs`: (what, folder, bytes); folders on the
    same filesystem add up."""
    by_fs: dict[int, list] = {}
    for what, folder, size in needs:
        by_fs.setdefault(os.stat(_existing(folder)).st_dev, []).append((what, folder, size))
    for items in by_fs.values():
        need, free = sum(size for *_, size in items), free_bytes(items[0][1])
        if need > free:
            what = " and ".join(f"{w} '{f}' (about {size / MB:.1f} MB)" for w, f, size in items)
            raise DiskFullError(f"disk full: not enough space for {what}: {need / MB:.1f} MB needed, {free / MB:.1f} MB free "
                                "there. Free some space, or choose a folder on another disk.")


def reserve(folder: Path, size: int) -> Path:
    """Set `size` bytes aside beside `folder` (.NAME.reserve), so that what fills the disk while the run trains cannot
    take the space the final write needs; `unreserve` hands it back just before that write."""
    path = folder.parent / f".{folder.name}.reserve"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        os.close(fd)
        path.unlink()
        if e.errno == errno.ENOSPC:
            raise DiskFullError(f"disk full: cannot set {size / MB:.1f} MB aside for output.dir '{folder}' ({path}); free "
                                "some space, or choose a folder on another disk.") from None
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem that cannot allocate ahead: nothing set aside
            return path
        raise
    os.close(fd)
    return path


def unreserve(folder: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (folder.parent / f".{folder.name}.reserve").unlink()


def disk_full(e: BaseException | None, folder: Path) -> bool:
    """Whether `e`, raised while writing under `folder`, means that its filesystem is full: an OSError ENOSPC or EDQUOT,
    safetensors' error that wraps one, or torch.save's RuntimeError (which keeps no errno: then no room is left there)."""
    for _ in range(10):  # along __cause__ / __context__
        if e is None:
            return False
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        if "inline_container" in text or "PytorchStreamWriter" in text:
            return free_bytes(folder) < MB
        e = e.__cause__ or e.__context__
    return False
