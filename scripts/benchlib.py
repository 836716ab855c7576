"""What the benchmark and evidence scripts share: timed child processes, the machine, and a work folder of results
that a rerun reuses (so a benchmark cut short continues where it stopped)."""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The real data sets beside the checkout (../shared/data); HFTL_SHARED_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("HFTL_SHARED_DATA", ROOT.parent / "shared" / "data"))
HFTL_PYTHON = ROOT / ".venv" / "bin" / "python"
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"  # scripts/setup_peers.sh


def machine() -> str:
    """One line: CPU, cores, torch threads' environment, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def timed(cmd: list[str], log: Path, env: dict | None = None, cwd: Path = ROOT) -> dict:
    """Run `cmd` in its own process, its output to `log`; {'rc', 'seconds' (start to exit), 'peak_mib' (its resident
    peak and its children's, from wait4's rusage), 'load' (the load average before it started)}."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start, load_before = time.perf_counter(), load()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    return {"rc": os.waitstatus_to_exitcode(status), "seconds": round(seconds, 2), "peak_mib": round(usage.ru_maxrss / 1024, 1),
            "load": load_before}


class Results:
    """A JSON file of finished jobs by key; `get(key, run)` runs `run()` only for a key not there yet."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, key: str, run) -> dict:
        if key not in self.data:
            result = run()
            result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
            self.data[key] = result
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)
        return self.data[key]


def command_line() -> str:
    """How this script was run, as a line to paste (with hftl's interpreter)."""
    return shlex.join([".venv/bin/python", *sys.argv])
