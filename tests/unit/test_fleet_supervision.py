"""How the fleet replaces lost workers, without Ray (fake worker sets): StaticFleet starts a
replacement at once, then backs off while replacements keep failing, and resets once every
worker serves; the autoscaler's pools drop a worker whose engine failed, or that answers nothing for
``cluster.worker_hung_after_s``, as they drop a dead one. (tests/integration/test_fleet_replacement.py does it on a real Ray.) A starting fleet
adopts the live workers a previous controller left, starts only what is missing and retires
(drained) what is above its size (tests/integration/test_controller_restart.py on a real Ray).
And the config keeps the router's silence limits above the workers' progress interval."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from cluster import autoscaler
from cluster.autoscaler import PoolScaler
from cluster.fleet import StaticFleet, WorkerSet
from core.config import Config, ConfigError, PoolConfig, load_config
from tests.unit.test_controller_stop import _Remote


class _FakeWorkers:
    """A WorkerSet as StaticFleet sees it: ``lose`` makes the next reap report a worker."""

    def __init__(self) -> None:
        self.actors: dict[str, object] = {}
        self.addresses: dict[str, str] = {}
        self.started: list[str] = []
        self._lost: dict[str, str] = {}
        self._ids = itertools.count()
        self.running: list[str] = []  # live workers a previous controller left
        self.stopped: list[str] = []
        self.found_draining: list[str] = []  # adopted ones that were being retired

    def take_found_draining(self) -> list[str]:
        found, self.found_draining = self.found_draining, []
        return found

    def adopt(self) -> list[str]:
        for worker_id in self.running:
            self.actors[worker_id] = object()
        return list(self.running)

    async def stop_one(self, worker_id: str) -> None:
        self.actors.pop(worker_id)
        self.addresses.pop(worker_id, None)
        self.stopped.append(worker_id)

    def start(self, count: int) -> list[str]:
        ids = [f"w{next(self._ids)}" for _ in range(count)]
        for worker_id in ids:
            self.actors[worker_id] = object()
        self.started += ids
        return ids

    def serve(self, worker_id: str) -> None:
        self.addresses[worker_id] = "127.0.0.1:1"

    def lose(self, worker_id: str, why: str) -> None:
        self._lost[worker_id] = why

    async def reap(self) -> dict[str, str]:
        lost, self._lost = self._lost, {}
        for worker_id in lost:
            self.actors.pop(worker_id)
            self.addresses.pop(worker_id, None)
        return lost


async def test_static_fleet_replaces_at_once_then_backs_off_while_replacements_fail():
    config = load_config(env={}, overrides={"cluster": {
        "workers": 2, "restart_backoff_s": 0.2, "restart_backoff_max_s": 0.4}})
    fleet = StaticFleet(config)
    fake = fleet.workers = _FakeWorkers()  # type: ignore[assignment]
    fleet.start()
    for worker_id in list(fake.actors):
        fake.serve(worker_id)
    await fleet.step()
    assert fake.started == ["w0", "w1"]  # all serve: nothing to do

    fake.lose("w0", "its process is gone")
    await fleet.step()
    assert fake.started[-1] == "w2"  # at once
    fake.lose("w2", "it failed to start")
    await fleet.step()
    assert len(fake.started) == 3  # backing off: 0.2 s
    await asyncio.sleep(0.25)
    await fleet.step()
    assert fake.started[-1] == "w3"
    fake.lose("w3", "it failed to start")
    await asyncio.sleep(0.25)
    await fleet.step()
    assert len(fake.started) == 4  # the backoff doubled: 0.4 s
    await asyncio.sleep(0.2)
    await fleet.step()
    assert fake.started[-1] == "w4"
    fake.serve("w4")
    await fleet.step()  # every worker serves again: the backoff resets
    fake.lose("w1", "its engine failed")
    await asyncio.sleep(0.4)
    await fleet.step()
    assert fake.started[-1] == "w5"
    assert [e for _, e, w in fleet.events if e == "lost"] == ["lost"] * 4


class _InfoWorker:
    def __init__(self, worker_id: str, failure: str | None, hung: bool = False):
        async def info():
            if hung:  # a frozen process: the call never answers
                await asyncio.Event().wait()
            return {"worker_id": worker_id, "running": 0, "waiting": 0,
                    "engine_failure": failure}

        self.info = _Remote(info)


class _PoolWorkers(WorkerSet):
    """A pool's WorkerSet (its own bookkeeping of silent workers) over fake actors."""

    def __init__(self, config: Config, actors: dict[str, _InfoWorker]) -> None:
        super().__init__(config)
        self.actors = actors  # type: ignore[assignment]
        self.addresses = {w: "127.0.0.1:1" for w in actors}
        self.killed: list[str] = []

    def kill(self, worker_id: str) -> None:
        self.killed.append(worker_id)
        self.actors.pop(worker_id)
        self.addresses.pop(worker_id)


async def test_an_autoscaled_pool_drops_a_worker_whose_engine_failed():
    config = load_config(env={})
    scaler = PoolScaler(config, PoolConfig(name="default", min_workers=2, max_workers=2))
    fake = scaler.workers = _PoolWorkers(config, {  # type: ignore[assignment]
        "a": _InfoWorker("a", None), "b": _InfoWorker("b", "a step has run for more than 60 s")})
    demand = await scaler._demand()
    assert [d.worker_id for d in demand] == ["a"]
    assert fake.killed == ["b"]
    assert [(e, w) for _, e, w in scaler.events] == [("died", "b")]


async def test_an_autoscaled_pool_drops_a_worker_that_stays_silent(monkeypatch):
    """A late answer is no verdict; no answer for ``cluster.worker_hung_after_s`` is (a
    frozen process, which Ray reports alive). Before, a silent worker was kept for ever."""
    monkeypatch.setattr(autoscaler, "INFO_TIMEOUT_S", 0.01)
    config = load_config(env={"ELECTRON_CLUSTER__WORKER_HUNG_AFTER_S": "0.2"})
    scaler = PoolScaler(config, PoolConfig(name="default", min_workers=2, max_workers=2))
    fake = scaler.workers = _PoolWorkers(config, {  # type: ignore[assignment]
        "a": _InfoWorker("a", None), "b": _InfoWorker("b", None, hung=True)})
    assert [d.worker_id for d in await scaler._demand()] == ["a"]
    assert fake.killed == []  # silent once: no verdict yet
    await asyncio.sleep(0.25)
    assert [d.worker_id for d in await scaler._demand()] == ["a"]
    assert fake.killed == ["b"]
    assert [(e, w) for _, e, w in scaler.events] == [("died", "b")]


def test_router_timeouts_must_exceed_the_progress_interval():
    """A queued request's progress messages must come more often than the router's silence
    limits, or queueing would read as silence again."""
    with pytest.raises(ConfigError, match="first_token_timeout_s"):
        load_config(env={}, overrides={"engine": {"progress_interval_s": 2},
                                       "router": {"first_token_timeout_s": 2}})
    with pytest.raises(ConfigError, match="stream_stall_timeout_s"):
        load_config(env={"ELECTRON_ROUTER__STREAM_STALL_TIMEOUT_S": "0.5"})
    config = load_config(env={}, overrides={"engine": {"progress_interval_s": 0.1},
                                            "router": {"first_token_timeout_s": 0.5,
                                                       "stream_stall_timeout_s": 0.5}})
    assert config.router.stream_stall_timeout_s == 0.5


async def test_static_fleet_adopts_live_workers_and_starts_only_what_is_missing():
    config = load_config(env={}, overrides={"cluster": {"workers": 3}})
    fleet = StaticFleet(config)
    fake = fleet.workers = _FakeWorkers()  # type: ignore[assignment]
    fake.running = ["default-0000000a", "default-0000000b"]
    fleet.start()
    assert fleet.adopted == fake.running
    assert fake.started == ["w0"]  # one more for three
    assert sorted(fake.actors) == ["default-0000000a", "default-0000000b", "w0"]
    assert [e for _, e, _ in fleet.events] == ["adopt", "adopt", "start"]


async def test_static_fleet_stops_adopted_workers_above_its_size():
    config = load_config(env={}, overrides={"cluster": {"workers": 1},
                                            "router": {"registry_poll_s": 0.01}})
    fleet = StaticFleet(config)
    fake = fleet.workers = _FakeWorkers()  # type: ignore[assignment]
    fake.running = ["default-0000000a", "default-0000000b"]
    drained: list[str] = []

    class _Handle:  # answers ready() and drain() at once
        def __init__(self, worker_id: str) -> None:
            async def ready() -> str:
                return "127.0.0.1:1"

            async def drain() -> None:
                drained.append(worker_id)

            self.ready, self.drain = _Remote(ready), _Remote(drain)

    def adopt() -> list[str]:
        for worker_id in fake.running:
            fake.actors[worker_id] = _Handle(worker_id)
        return list(fake.running)

    fake.adopt = adopt  # type: ignore[method-assign]
    fleet.start()
    assert fake.started == []
    await asyncio.wait_for(asyncio.gather(*fleet._retiring), 5)
    # The one above the fleet's size: drained (routers stop choosing it), then stopped.
    assert drained == fake.stopped == ["default-0000000b"]
    assert list(fake.actors) == ["default-0000000a"]


async def test_the_autoscaler_adopts_each_pools_live_workers_before_starting_any():
    from cluster.autoscaler import Autoscaler

    config = load_config(env={}, overrides={
        "cluster": {"workers": 2},
        "autoscaler": {"enabled": True, "interval_s": 60, "pools": [
            {"name": "acme", "min_workers": 1, "max_workers": 2}]}})
    autoscaler = Autoscaler(config)
    fakes = {}
    for name, running in (("default", ["default-0000000a"]), ("acme", ["acme-0000000b"])):
        fake = autoscaler.pools[name].workers = _FakeWorkers()  # type: ignore[assignment]
        fake.running = running
        fakes[name] = fake
    autoscaler.start()
    try:
        assert sorted(autoscaler.adopted) == ["acme-0000000b", "default-0000000a"]
        assert fakes["default"].started == ["w0"]  # 2 wanted, 1 adopted
        assert fakes["acme"].started == []         # its minimum (1) is the adopted one
        assert [e for _, e, _ in autoscaler.pools["acme"].events] == ["adopt"]
    finally:
        await autoscaler._stop_loop()


async def test_static_fleet_finishes_retiring_an_adopted_worker_found_draining():
    config = load_config(env={}, overrides={"cluster": {"workers": 2},
                                            "router": {"registry_poll_s": 0.01}})
    fleet = StaticFleet(config)
    fake = fleet.workers = _FakeWorkers()  # type: ignore[assignment]
    fake.running = ["default-0000000a", "default-0000000b"]

    class _Handle:  # answers ready() and drain() at once
        async def _none(self) -> None:
            return None

        def __init__(self) -> None:
            self.ready = self.drain = _Remote(self._none)

    def adopt() -> list[str]:
        for worker_id in fake.running:
            fake.actors[worker_id] = _Handle()
            fake.serve(worker_id)
        return list(fake.running)

    fake.adopt = adopt  # type: ignore[method-assign]
    fleet.start()
    assert fake.started == []
    # Its previous controller was retiring it (the autoscaler's drain) when it died.
    fake.found_draining = ["default-0000000b"]
    await fleet.step()
    await asyncio.wait_for(asyncio.gather(*fleet._retiring), 5)
    assert fake.stopped == ["default-0000000b"]
    await fleet.step()  # and a new one takes its place
    assert fake.started == ["w0"]
    assert [e for _, e, _ in fleet.events] == ["adopt", "adopt", "retire", "start"]
