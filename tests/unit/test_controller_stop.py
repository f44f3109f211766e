"""What the controller (`electron-serve worker`) does on SIGTERM: every serving worker is
drained (marked draining, its running requests finish) before any is stopped, so a controller
pod that goes fails no request in flight (docs/deploy-kubernetes.md, "Upgrades")."""

from __future__ import annotations

import asyncio

from cluster.autoscaler import PoolScaler
from core.config import PoolConfig, load_config


class _Remote:
    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args):
        return self._fn(*args)


class _Worker:
    def __init__(self, name: str, log: list[str], running: int):
        self.running = running

        async def drain():
            log.append(f"drain {name}")

        async def info():
            self.running = max(0, self.running - 1)  # its requests finish
            return {"running": self.running, "waiting": 0}

        self.drain, self.info = _Remote(drain), _Remote(info)


class _Workers:
    def __init__(self, log: list[str], names: list[str]):
        self.actors = {n: _Worker(n, log, running=3) for n in names}
        self.addresses = {n: f"10.0.0.{i}:50051" for i, n in enumerate(names)}
        self.log = log

    async def stop(self):
        busy = [n for n, w in self.actors.items() if w.running]
        self.log.append(f"stop all (busy: {busy})")


async def test_stop_drains_every_serving_worker_before_stopping_them():
    config = load_config(env={}, overrides={"router": {"registry_poll_s": 0.01},
                                            "cluster": {"heartbeat_s": 0.01}})
    scaler = PoolScaler(config, PoolConfig(name="default", min_workers=2, max_workers=2))
    log: list[str] = []
    scaler.workers = _Workers(log, ["default-a", "default-b"])
    await asyncio.wait_for(scaler.stop(), 10)
    assert sorted(log[:2]) == ["drain default-a", "drain default-b"]
    assert log[2:] == ["stop all (busy: [])"]


async def test_the_controller_gives_up_clearly_when_no_worker_starts_in_time():
    from cluster.fleet import StartupFailed
    from cluster.launcher import _first_worker

    class Never:
        async def wait_ready(self, minimum):
            await asyncio.sleep(3600)

    try:
        await _first_worker(Never(), 0.05)
    except StartupFailed as exc:
        assert "cluster.start_timeout_s" in str(exc) and "Pending" in str(exc)
    else:
        raise AssertionError("no StartupFailed")


async def test_a_worker_that_never_answers_drain_does_not_hold_the_stop(monkeypatch):
    """A hung worker (its actor blocked) would hold the controller's SIGTERM, and a test's
    teardown, forever: the drain call is bounded like the info calls."""
    import cluster.autoscaler as autoscaler

    monkeypatch.setattr(autoscaler, "INFO_TIMEOUT_S", 0.2)
    config = load_config(env={}, overrides={"router": {"registry_poll_s": 0.01},
                                            "cluster": {"heartbeat_s": 0.01}})
    scaler = PoolScaler(config, PoolConfig(name="default", min_workers=2, max_workers=2))
    log: list[str] = []
    scaler.workers = _Workers(log, ["default-a", "default-b"])

    async def never():
        await asyncio.sleep(3600)

    scaler.workers.actors["default-a"].drain = _Remote(never)
    await asyncio.wait_for(scaler.stop(), 10)
    assert log == ["drain default-b", "stop all (busy: ['default-a'])"]
