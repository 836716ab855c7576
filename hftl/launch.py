"""`hftl torchrun ARGS` and `hftl launch ARGS`: torchrun and `accelerate launch`, exiting 143 when preempted.

On SIGTERM, torchrun's agent passes the signal to the workers and waits (up to 30 s) for them; hftl's workers save a
checkpoint and exit 143. The agent then raises SignalException, and torchrun exits 1 with its traceback; workers that
exit 143 on their own signal are a ChildFailedError, exit 1 too; single-process `accelerate launch` turns a 143 into a
CalledProcessError. A scheduler that requeues on 143 (128 + SIGTERM) would requeue none of them. These commands run
the launchers' own entry points (every argument is theirs) and map all three to 143; any other failure exits with its
first failed worker's code, printed without a Python traceback.
"""
from __future__ import annotations

import os
import subprocess
import sys

from .checkpoint import EXIT_PREEMPTED

# What hftl's workers stop on (checkpoint.stop_signals). torchrun forwards only the signals it handles, and SIGUSR1
# (SLURM's advance warning) is not among its defaults; an explicit --signals-to-handle still wins over this default.
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
STOPS = ("SIGTERM", "SIGUSR1")


def _signal_code(code: int) -> int:
    """A child's exit code as a shell reports it: 128 + N for death by signal N (Popen gives -N)."""
    return 128 - code if code < 0 else code


def main(launcher: str, argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun's own argument default (its `env` action reads PET_<OPTION>), so accelerate launch's torchrun gets it too.
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", SIGNALS_TO_HANDLE)
    try:
        if launcher == "torchrun":
            from torch.distributed.run import main as torchrun

            torchrun(argv)
        else:
            from accelerate.commands.launch import launch_command, launch_command_parser

            launch_command(launch_command_parser().parse_args(argv))
    except SignalException as e:  # the agent forwarded the signal and waited for the workers before raising this
        code = EXIT_PREEMPTED if e.sigval.name in STOPS else 128 + int(e.sigval)
        print(f"hftl {launcher}: received {e.sigval.name} and passed it to the workers; exit code {code}"
              + (" (rerun with train.resume=auto to continue from their checkpoint)" if code == EXIT_PREEMPTED else ""),
              file=sys.stderr)
        return code
    except ChildFailedError as e:
        # The first worker to exit is the cause; the agent then stops the others with SIGTERM (hftl's workers, which stop
        # together, may be past their stop handler by then: -15).
        code = _signal_code(e.get_first_failure()[1].exitcode) or 1
        if code == EXIT_PREEMPTED:
            print(f"hftl {launcher}: the workers stopped on a signal (exit code {code}); rerun with train.resume=auto to "
                  "continue from their checkpoint", file=sys.stderr)
        else:
            print(e, file=sys.stderr)  # torchrun's table of the failed workers
        return code
    except subprocess.CalledProcessError as e:  # single-process accelerate launch: the child's code
        return _signal_code(e.returncode) or 1
    return 0
