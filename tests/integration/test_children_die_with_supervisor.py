"""Children of a supervisor that is killed (SIGKILL, no chance to stop them) are stopped by
the kernel: PR_SET_PDEATHSIG, set by a wrapper that execs the real program (setpriv, or a
two-line Python exec), not by Python code between fork and exec."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from myelin.stack.process import _PDEATHSIG_EXEC

pytestmark = pytest.mark.integration

SUPERVISOR = """
import sys, time
from pathlib import Path
from myelin.stack.process import ManagedProcess
p = ManagedProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"], Path(sys.argv[1]))
p.start()
print(p.pid, flush=True)
time.sleep(120)
"""


def test_children_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    sup = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(tmp_path / "sleeper.log")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sup.stdout is not None
    child = psutil.Process(int(sup.stdout.readline()))
    time.sleep(0.3)  # the wrapper has exec'd the real program
    assert child.is_running() and "time.sleep(120)" in " ".join(child.cmdline())
    os.kill(sup.pid, signal.SIGKILL)
    sup.wait()
    sup.stdout.close()
    gone, _ = psutil.wait_procs([child], timeout=10)
    assert gone, "the child outlived its supervisor"


def test_the_fallback_wrapper_execs_the_program() -> None:
    """Where setpriv is missing, a Python exec wrapper sets the signal and becomes the
    program (same pid, its output, its exit status)."""
    done = subprocess.run(
        [sys.executable, "-c", _PDEATHSIG_EXEC, "sh", "-c", "echo $$; exit 3"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 3 and done.stdout.strip().isdigit()
