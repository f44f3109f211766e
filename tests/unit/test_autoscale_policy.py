"""The scaling rule (cluster/demand.py): up fast on any signal over its target, down one
worker at a time after a quiet delay, within the pool's min and max; and the latency window
the workers report TTFT from. The clock is a variable the test advances."""

from __future__ import annotations

import pytest

from cluster.demand import ScaleDecider, WorkerDemand, pressure
from core.config import AutoscalerConfig, ConfigError, PoolConfig, load_config
from workers.latency import RecentLatencies

POOL = PoolConfig(name="acme", min_workers=1, max_workers=4, target_requests_per_worker=4,
                  target_waiting_prefill_tokens=1000, target_kv_usage=0.8, target_ttft_s=0.5)
SETTINGS = AutoscalerConfig(enabled=True, scale_up_cooldown_s=5, scale_down_cooldown_s=30,
                            scale_down_delay_s=60, max_step_up=2, scale_down_utilization=0.3)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def busy(n: int, **load) -> list[WorkerDemand]:
    return [WorkerDemand(worker_id=f"w{i}", **load) for i in range(n)]


def test_each_signal_sets_the_pressure():
    assert pressure(POOL, busy(2, waiting_prefill_tokens=3000)) == (3.0, "waiting_prefill_tokens")
    assert pressure(POOL, busy(1, kv_blocks_used=96, kv_blocks_total=100)) \
        == (pytest.approx(1.2), "kv_usage")
    assert pressure(POOL, busy(2, ttft_p90_s=1.0)) == (2.0, "ttft_p90")
    assert pressure(POOL, busy(2, running=4, waiting=2)) == (1.5, "requests")
    assert pressure(POOL, []) == (0.0, "no serving worker")


def test_scales_up_at_once_bounded_by_step_cooldown_and_max():
    clock = Clock()
    decider = ScaleDecider(POOL, SETTINGS, clock)
    # 1 worker at 5x: ceil(5) = 5 wanted, at most 2 more per step.
    assert decider.decide(busy(1, running=20), 1).target == 3
    clock.now += 1  # inside the cooldown: hold
    assert decider.decide(busy(3, running=20), 3).target == 3
    clock.now += 5
    assert decider.decide(busy(3, running=20), 3).target == 4  # the pool's max
    clock.now += 5
    assert decider.decide(busy(4, running=20), 4).target == 4


def test_scales_down_one_at_a_time_after_the_quiet_delay():
    clock = Clock()
    decider = ScaleDecider(POOL, SETTINGS, clock)
    assert decider.decide(busy(3), 3).target == 3     # quiet from now
    clock.now += 59
    assert decider.decide(busy(3), 3).target == 3
    clock.now += 1
    assert decider.decide(busy(3), 3).target == 2
    clock.now += 10  # inside the down cooldown
    assert decider.decide(busy(2), 2).target == 2
    clock.now += 20
    assert decider.decide(busy(2), 2).target == 1
    clock.now += 100
    assert decider.decide(busy(1), 1).target == 1     # the pool's min


def test_a_busy_moment_restarts_the_quiet_delay_and_starting_workers_hold_it():
    clock = Clock()
    decider = ScaleDecider(POOL, SETTINGS, clock)
    decider.decide(busy(2), 2)
    clock.now += 50
    assert decider.decide(busy(2, running=2), 2).target == 2  # 0.5x: not low
    clock.now += 50
    assert decider.decide(busy(2), 2).target == 2             # low again, for 0 s
    clock.now += 60
    assert decider.decide(busy(1), 2).target == 2             # one still starting
    assert decider.decide(busy(2), 2).target == 2
    clock.now += 60
    assert decider.decide(busy(2), 2).target == 1


def test_min_and_max_bind_at_once():
    decider = ScaleDecider(POOL, SETTINGS, Clock())
    assert decider.decide([], 0).target == 1
    assert decider.decide(busy(6), 6).target == 4


def test_recent_latencies_quantile_forgets_old_samples():
    clock = Clock()
    window = RecentLatencies(window_s=10, clock=clock)
    assert window.quantile(0.9) is None
    for ms in range(1, 11):
        window.record(ms / 1000)
    assert window.quantile(0.9) == pytest.approx(0.009)
    assert window.quantile(1.0) == pytest.approx(0.010)
    clock.now += 11
    assert window.quantile(0.9) is None


def test_pool_config_is_validated():
    with pytest.raises(ConfigError, match="exceeds max_workers"):
        load_config(env={}, overrides={"autoscaler": {"pools": [
            {"name": "acme", "min_workers": 3, "max_workers": 2}]}})
    with pytest.raises(ConfigError, match="unique"):
        load_config(env={}, overrides={"autoscaler": {"pools": [
            {"name": "acme"}, {"name": "acme"}]}})
    with pytest.raises(ConfigError):
        load_config(env={}, overrides={"autoscaler": {"pools": [{"name": "Not A Name"}]}})
    env = {"ELECTRON_AUTOSCALER__ENABLED": "true",
           "ELECTRON_AUTOSCALER__POOLS": '[{name: acme, min_workers: 1, max_workers: 3}]'}
    config = load_config(env=env)
    assert config.autoscaler.enabled and config.autoscaler.pools[0].max_workers == 3


def test_each_pool_gets_its_workers_config_and_ray_bundle():
    from cluster.autoscaler import effective_pools, pool_config, worker_bundle

    config = load_config(env={}, overrides={
        "cluster": {"workers": 2, "num_gpus_per_worker": 1, "num_cpus_per_worker": 4},
        "autoscaler": {"enabled": True, "pools": [
            {"name": "acme", "min_workers": 1, "max_workers": 3,
             "resources": {"electron_pool_acme": 1}}]}})
    shared, acme = effective_pools(config)
    # The shared pool, not listed, stays at cluster.workers.
    assert (shared.name, shared.min_workers, shared.max_workers) == ("default", 2, 2)
    worker = pool_config(config, acme)
    assert worker.cluster.pool == "acme"
    assert worker.cluster.worker_resources == {"electron_pool_acme": 1}
    assert worker.engine == config.engine
    assert worker_bundle(config, acme) == {"CPU": 4, "GPU": 1, "electron_pool_acme": 1}
    assert worker_bundle(config, shared) == {"CPU": 4, "GPU": 1}
