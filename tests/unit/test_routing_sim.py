"""The routing simulator (bench/routing_sim.py, bench/sim/): trace replay, the simulated
worker's step loop and cache, the lagging views the router's policies read, and the
report -- driving the router's real policies and prefix index."""

from __future__ import annotations

import json
import math
import random

import pytest

from bench import routing_sim
from bench.sim.cluster import Simulation
from bench.sim.report import jain, max_over_mean, percentile, summarise
from bench.sim.service import H100_8B, ServiceModel, scaled
from bench.sim.trace import TraceRequest, ideal_hit_ratio, load_trace, spread_steps
from bench.sim.worker import Delays
from core.config import RouterConfig
from router.routing.cost_model import CostProfile
from router.routing.load import WorkerLoad
from tests.support.data import data_path

MOONCAKE = data_path("traces", "mooncake", "conversation_trace.jsonl")

# A truth with round numbers: 1 ms per prefill token, 10 ms per decode step, no noise.
FLAT = CostProfile(name="flat", max_batch_tokens=1000, max_num_seqs=8,
                   prefill=((1, 1e-3), (1000, 1e-3)), decode=((1, 0.010), (8, 0.010)))
EXACT = ServiceModel(FLAT, noise_sigma=0.0)
NO_DELAY = Delays(event_delay_s=0.0, load_interval_s=0.0, load_delay_s=0.0)
H100_NOISY = ServiceModel(H100_8B, noise_sigma=0.1, attention_context_tokens=32768,
                          kv_read_s_per_token=4e-8)


def req(i: int, at: float, hashes: tuple[int, ...], *, tokens: int | None = None,
        out: int = 1) -> TraceRequest:
    return TraceRequest(i, at, tokens if tokens is not None else 100 * len(hashes), out, hashes)


def simulate(requests: list[TraceRequest], policy: str = "round_robin", *, workers: int = 1,
             cache_blocks: int = 100, block_size: int = 100, service: ServiceModel = EXACT,
             delays: Delays = NO_DELAY, settings: RouterConfig | None = None,
             seed: int = 0) -> Simulation:
    sim = Simulation(requests, policy_name=policy, workers=workers, cache_blocks=cache_blocks,
                     block_size=block_size, service=service, policy_profile=FLAT,
                     settings=settings or RouterConfig(), delays=delays, seed=seed)
    sim.run()
    return sim


# -- traces ----------------------------------------------------------------------------------------

def test_requests_sharing_a_timestamp_spread_over_its_step():
    assert spread_steps([0, 0, 0, 3, 3]) == [0, 1, 2, 3, 4.5]  # the last step: the median gap
    assert spread_steps([5.0]) == [5.0]


def test_ideal_hit_ratio_counts_the_leading_run_seen_before():
    trace = [req(0, 0, (1, 2, 3)), req(1, 1, (1, 2, 4)), req(2, 2, (5, 2, 3)),
             req(3, 3, (1, 2, 3, 6))]
    assert ideal_hit_ratio(trace) == pytest.approx((0 + 2 + 0 + 3) / 13)


def test_mooncake_trace_loads_with_the_readmes_ideal_hit_ratio():
    trace = load_trace(MOONCAKE)
    assert len(trace) == 12_031 and trace[0].block_hashes[0] == 0
    assert [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)
    assert ideal_hit_ratio(trace) == pytest.approx(0.366, abs=5e-4)
    assert load_trace(MOONCAKE, limit=10, speed=2.0)[-1].arrival_s * 2 == \
        pytest.approx(trace[9].arrival_s)


# -- one simulated worker --------------------------------------------------------------------------

def test_a_repeated_prompt_hits_every_block_but_recomputes_its_last_token():
    sim = simulate([req(0, 0.0, (1, 2, 3)), req(1, 10.0, (1, 2, 3))])
    first, second = sim.outcome.ttft_s
    assert first == pytest.approx(0.300)                 # 300 tokens at 1 ms
    # At most (300 - 1) // 100 = 2 blocks hit: 100 tokens are recomputed.
    assert second == pytest.approx(0.100)
    assert sim.outcome.hit_blocks == 2


def test_a_short_prompt_queues_behind_a_long_prefill_in_token_budget_chunks():
    long, short = req(0, 0.0, (), tokens=1500), req(1, 0.001, (), tokens=100)
    sim = simulate([long, short])
    # Step 1: 1000 tokens of the long prompt (1 s). Step 2: its last 500 and the short 100.
    assert sim.outcome.ttft_s[0] == pytest.approx(1.6)
    assert sim.outcome.ttft_s[1] == pytest.approx(1.6 - 0.001)


def test_an_arrival_cuts_a_decode_stretch_at_the_step_in_progress():
    decoding, late = req(0, 0.0, (), tokens=100, out=101), req(1, 0.155, (), tokens=50)
    sim = simulate([decoding, late])
    # Prefill ends at 0.1 s; 10 ms decode steps; the arrival at 0.155 s waits for the step
    # ending at 0.16 s, then shares a step with the decode: 50 ms prefill + 10 ms decode.
    assert sim.outcome.ttft_s[1] == pytest.approx(0.16 + 0.06 - 0.155)
    # 100 decode steps for the first request, one of them 60 ms long.
    assert sim.outcome.e2e_s[0] == pytest.approx(0.1 + 99 * 0.010 + 0.060)


def test_the_worker_cache_evicts_least_recently_used_blocks_tail_first_and_the_index_follows():
    # 250-token prompts: 2 full blocks and a partial one (never cached), 3 blocks held while
    # running. With 6 blocks, C evicts A's tail block (2) first, as the engine frees tail
    # first, and keeps A's head block (1), which D then hits.
    trace = [req(0, 0.0, (1, 2, 10), tokens=250), req(1, 1.0, (3, 4, 11), tokens=250),
             req(2, 2.0, (5, 6, 12), tokens=250)]
    sim = simulate(trace, cache_blocks=6)
    worker = sim.workers[0]
    worker.pool.check_integrity()
    sim.index.check_integrity()
    assert sim.index.worker("w000").hashes == set(worker.log.snapshot()[1]) == {1, 3, 4, 5, 6}
    again = simulate([*trace, req(3, 3.0, (1, 2, 13), tokens=250)], cache_blocks=6)
    assert again.outcome.hit_blocks == 1


def test_kv_events_reach_the_index_only_after_their_delay():
    delays = Delays(event_delay_s=0.5, load_interval_s=0.0, load_delay_s=0.0)
    sim = Simulation([req(0, 0.0, (1, 2, 3))], policy_name="kv_aware", workers=1,
                     cache_blocks=10, block_size=100, service=EXACT, policy_profile=FLAT,
                     settings=RouterConfig(), delays=delays)
    seen: list[tuple[float, set[int]]] = []
    original = sim.workers[0].deliver

    def deliver(upto: int) -> None:
        original(upto)
        seen.append((sim.now, set(sim.index.worker("w000").hashes)))

    sim.workers[0].deliver = deliver  # type: ignore[method-assign]
    sim.run()
    assert seen == [(pytest.approx(0.8), {1, 2, 3})]  # stored at 0.3 s (the prefill's end)


def test_the_router_sees_load_as_of_the_last_report_tick():
    delays = Delays(event_delay_s=0.0, load_interval_s=1.0, load_delay_s=0.25)
    sim = Simulation([], policy_name="least_load", workers=1, cache_blocks=10,
                     block_size=100, service=EXACT, policy_profile=FLAT,
                     settings=RouterConfig(), delays=delays)
    view, worker = sim.views[0], sim.workers[0]
    view._phase = 0.0
    worker.history.append((0.5, WorkerLoad(running=3)))
    sim.now = 1.2  # tick 1.0 is seen from 1.25 on
    assert view.load.running == 0
    sim.now = 1.3
    assert view.load.running == 3


# -- policies through the simulator ----------------------------------------------------------------

def conversations(n: int, turns: int, *, gap: float, seed: int = 0) -> list[TraceRequest]:
    """Conversations that grow by 2 blocks a turn, all opening with block 0 (a system
    prompt); turns of different conversations interleave."""
    rng = random.Random(seed)
    out, next_id = [], 1
    for c in range(n):
        blocks = [0]
        t = rng.uniform(0, gap)
        for _ in range(turns):
            blocks += [next_id, next_id + 1]
            next_id += 2
            out.append((t, tuple(blocks)))
            t += rng.uniform(0.5, 1.5) * gap
    out.sort()
    return [TraceRequest(i, t, 100 * len(b), 5, b) for i, (t, b) in enumerate(out)]


def test_kv_aware_keeps_conversations_on_their_cache_where_round_robin_scatters_them():
    trace = conversations(12, 6, gap=4.0)
    ideal = ideal_hit_ratio(trace)
    kv = simulate(trace, "kv_aware", workers=4, cache_blocks=100)
    rr = simulate(trace, "round_robin", workers=4, cache_blocks=100)
    kv_hits = kv.outcome.hit_blocks / kv.outcome.prompt_blocks
    rr_hits = rr.outcome.hit_blocks / rr.outcome.prompt_blocks
    assert kv_hits > 0.9 * ideal and rr_hits < 0.6 * kv_hits
    assert sorted(kv.outcome.ttft_s)[len(trace) // 2] < sorted(rr.outcome.ttft_s)[len(trace) // 2]


def test_kv_aware_gives_cold_workers_traffic_when_nothing_spills():
    # Light load: every request opens with block 0, which warm workers hold; cold workers
    # (empty caches) must still get requests, or most of the fleet idles.
    trace = conversations(80, 2, gap=5.0)
    sim = simulate(trace, "kv_aware", workers=16, cache_blocks=200,
                   delays=Delays(event_delay_s=0.1, load_interval_s=0.1, load_delay_s=0.01))
    assert min(sim.outcome.requests_per_worker) > 0
    # Conversations move as units of two turns, so one extra conversation on a worker is
    # +20 % here; without cold-worker seeding this measured 2.3 with 6 workers idle.
    assert max_over_mean(sim.outcome.requests_per_worker) <= 1.7


def test_power_of_two_replays_the_same_run_for_the_same_seed():
    trace = conversations(10, 3, gap=0.5)
    a = simulate(trace, "power_of_two", workers=4, seed=3, service=H100_NOISY)
    b = simulate(trace, "power_of_two", workers=4, seed=3, service=H100_NOISY)
    assert a.outcome.requests_per_worker == b.outcome.requests_per_worker
    assert a.outcome.ttft_s == b.outcome.ttft_s


def test_service_model_adds_noise_attention_and_kv_reads_to_the_profile():
    exact = ServiceModel(H100_8B, noise_sigma=0.0, attention_context_tokens=32768,
                         kv_read_s_per_token=1e-7)
    base = H100_8B.prefill_s_per_token(8192) * 8192
    assert exact.prefill_s(8192, 0.0) == pytest.approx(base)
    assert exact.prefill_s(8192, 8192 * 32768) == pytest.approx(2 * base)
    assert exact.decode_s(32, 10_000) == pytest.approx(H100_8B.decode_step_s(32) + 1e-3)
    rng = random.Random(0)
    factors = [H100_NOISY.noise(rng) for _ in range(20_000)]
    assert sum(factors) / len(factors) == pytest.approx(1.0, abs=0.01) and min(factors) > 0
    assert scaled(H100_8B, 0.5).prefill_s(1024) == pytest.approx(H100_8B.prefill_s(1024) / 2)


# -- report and command line -----------------------------------------------------------------------

def test_balance_measures():
    assert jain([1, 1, 1, 1]) == 1.0 and jain([4, 0, 0, 0]) == 0.25
    assert max_over_mean([1, 1, 2]) == pytest.approx(1.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0 and math.isnan(percentile([], 99))


def test_summary_compares_hits_with_the_ideal():
    sim = simulate([req(0, 0.0, (1, 2, 3)), req(1, 10.0, (1, 2, 3))])
    result = summarise(sim.outcome, ideal_hit_ratio(sim.requests))
    assert result["hit_ratio"] == pytest.approx(2 / 6, abs=1e-4)
    assert result["ideal_hit_ratio"] == 0.5 and result["load_max_over_mean"] == 1.0
    assert result["ttft_p50"] == pytest.approx(0.1) and result["ttft_p99"] == pytest.approx(0.3)


def test_command_line_writes_every_policy_side_by_side(tmp_path):
    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": int(r.arrival_s * 1000), "input_length": 512 * r.num_blocks,
             "output_length": 20, "hash_ids": list(r.block_hashes)}
            for r in conversations(20, 3, gap=3.0)]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sim.json"
    assert routing_sim.main(["--trace", str(trace), "--workers", "4", "--cache-blocks", "50",
                             "--set", "work_weight=2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["policies"]) == list(routing_sim.POLICIES)
    for policy in result["policies"].values():
        assert {"hit_ratio", "ideal_hit_ratio", "ttft_p50", "ttft_p99",
                "load_max_over_mean"} <= policy.keys()
    assert result["settings"]["router"]["work_weight"] == 2
    assert out.with_suffix(".md").read_text().count("| 4 |") == 5
