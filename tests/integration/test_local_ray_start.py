"""A local Ray whose raylet misses Ray's fixed start deadline is stopped and started again.

Ray gives a new node's raylet 30 s to register with the GCS and then raises, leaving the
processes it started running; on a loaded 2-core machine one start can miss it. The first
start here is made to miss it for real (Ray's own wait loop runs with its clock moved past
the deadline once the GCS and raylet are up), so the test sees what the launcher must clean.
"""

from __future__ import annotations

import logging
import time
import types

import pytest
import ray

from cluster import launcher
from cluster.launcher import live_processes, start_local_ray
from core.config import Config
from tests.support.environ import SavedEnviron

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _miss_the_start_deadline_once(monkeypatch) -> list[bool]:
    """Ray's node start sees its deadline pass on its first wait; returns a list that holds
    one item once that happened."""
    node_module = ray._private.node
    real_get_node = ray._private.services.get_node
    shift = [0.0]
    missed: list[bool] = []

    def get_node(gcs_address, node_id):
        if not missed:
            missed.append(True)
            shift[0] = 3600.0  # the loop's next look at its clock is past the 30 s
            raise RuntimeError("node info not available yet (made to miss the deadline)")
        return real_get_node(gcs_address, node_id)

    clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time)
                                     if not name.startswith("__")})
    clock.monotonic = lambda: time.monotonic() + shift[0]
    monkeypatch.setattr(node_module, "time", clock)
    monkeypatch.setattr(ray._private.services, "get_node", get_node)
    return missed


def test_a_missed_start_deadline_stops_that_ray_and_starts_a_fresh_one(monkeypatch, caplog):
    saved = SavedEnviron("RAY_AUTH_MODE", "PYTHONPATH")
    missed = _miss_the_start_deadline_once(monkeypatch)
    before = set(live_processes(lambda pid, ppid, cmdline: "ray" in cmdline))
    stopped: list[list[int]] = []
    real_stop = launcher.stop_failed_local_ray

    def stop_and_record(began: float, wait_s: float = 10.0) -> dict[str, str]:
        # What the failed start left: its GCS, raylet and reaper, running until stopped.
        stopped.append(sorted(set(live_processes(
            lambda pid, ppid, cmdline: "ray" in cmdline)) - before))
        return real_stop(began, wait_s)

    monkeypatch.setattr(launcher, "stop_failed_local_ray", stop_and_record)
    try:
        with caplog.at_level(logging.WARNING, logger="cluster.launcher"):
            start_local_ray(Config())
        assert missed and len(stopped) == 1, "the first start did not fail as arranged"
        assert len(stopped[0]) >= 3, stopped  # it did leave processes to clean
        alive = set(live_processes(lambda pid, ppid, cmdline: True))
        assert not alive & set(stopped[0]), "the failed start's processes still run"
        assert "local Ray did not start" in caplog.text
        assert "raylet" in caplog.text  # its log's tail, for whoever reads the warning
        # The second start is a working cluster.
        assert ray.get(ray.put(41)) + 1 == 42
        session = ray._private.worker._global_node.get_session_dir_path()
        assert live_processes(lambda pid, ppid, cmdline: session in cmdline)
    finally:
        ray.shutdown()
        saved.restore()


def test_other_start_errors_are_not_retried(monkeypatch):
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        raise ValueError("some other problem")

    monkeypatch.setattr(ray, "init", init)
    saved = SavedEnviron("RAY_AUTH_MODE", "PYTHONPATH")
    try:
        with pytest.raises(ValueError, match="some other problem"):
            start_local_ray(Config())
    finally:
        saved.restore()
    assert len(calls) == 1
