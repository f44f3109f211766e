"""tests/support/multi_node.py's retry of a Ray node whose raylet missed Ray's 30 s
registration window or whose GCS exited at startup (``started_once_more``), with real processes
standing in for the node's: the half-started node's processes are killed, and only those
failures are retried, once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.multi_node import started_once_more

TIMED_OUT = Exception("The current node timed out during startup. This could happen because "
                      "some of the raylet failed to startup or the GCS has become overloaded.")


def a_node_process(temp_dir: Path) -> subprocess.Popen:
    """A process whose command line names ``temp_dir``, as a raylet's does; returned once it
    does (between fork and exec a child's command line is still its parent's)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             str(temp_dir)])
    deadline = time.monotonic() + 10
    while str(temp_dir).encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the stand-in process did not start"
        time.sleep(0.01)
    return proc


GCS_EXITED = FileNotFoundError(2, "No such file or directory",
                               "/tmp/ray/session_x/logs/gcs_server.err")


@pytest.mark.parametrize("failure", [TIMED_OUT, GCS_EXITED], ids=["timed_out", "gcs_exited"])
def test_a_node_that_failed_to_start_is_killed_and_started_once_more(tmp_path, failure):
    started, retried = [], []

    def start() -> str:
        started.append(a_node_process(tmp_path))
        if len(started) == 1:
            raise failure
        return "node"

    assert started_once_more(start, tmp_path, lambda: retried.append(True)) == "node"
    assert len(started) == 2 and retried == [True]
    assert started[0].wait(timeout=10) == -9  # the half-started node: SIGKILLed
    assert started[1].poll() is None          # the node that started runs on
    started[1].kill()
    started[1].wait()


@pytest.mark.parametrize("failure", [ValueError("no such resource"),
                                     FileNotFoundError(2, "No such file", "/models/tiny.gguf")],
                         ids=["other_error", "other_missing_file"])
def test_any_other_failure_is_raised_at_once_and_its_processes_killed(tmp_path, failure):
    started = []

    def start() -> str:
        started.append(a_node_process(tmp_path))
        raise failure

    with pytest.raises(type(failure)):
        started_once_more(start, tmp_path)
    assert len(started) == 1 and started[0].wait(timeout=10) == -9


def test_a_second_timeout_is_raised(tmp_path):
    def start() -> str:
        raise TIMED_OUT

    with pytest.raises(Exception, match="timed out during startup"):
        started_once_more(start, tmp_path)
