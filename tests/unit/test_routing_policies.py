"""Each routing policy's choice on constructed loads, driven the way the pool drives them
(choose, then count the request at the chosen worker), with simulated workers that implement
the WorkerView protocol."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from core.config import RouterConfig, load_config
from core.endpoints import StaticWorkerSource
from core.hashing import block_hashes, extra_key
from router.fleet.pool import WorkerPool
from router.routing.approx_tree import ApproxTree
from router.routing.cache_aware import CacheAware
from router.routing.cost_model import (
    BUILT_IN,
    SMOLLM2_CPU,
    CostProfile,
    resolve_profile,
)
from router.routing.factory import make_policy
from router.routing.kv_aware import KvAware
from router.routing.load import Assignment, CountsLocalLoad, LocalLoad, WorkerLoad
from router.routing.policy import Choice, RequestInfo, RoutingPolicy
from router.routing.prefix_index import PrefixIndex
from router.routing.simple import LeastLoad, PowerOfTwo, RoundRobin
from workers.engine.request import Request
from workers.engine.sampling_params import SamplingParams

BLOCK = 16
KEY = extra_key("", "electron")


@dataclass
class SimWorker(CountsLocalLoad):
    worker_id: str
    load: WorkerLoad = field(default_factory=WorkerLoad)
    local: LocalLoad = field(default_factory=LocalLoad)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def workers(*loads: WorkerLoad) -> list[SimWorker]:
    return [SimWorker(f"w{i}", load) for i, load in enumerate(loads)]


def route(policy: RoutingPolicy, candidates: list[SimWorker],
          request: RequestInfo) -> tuple[Choice[SimWorker], Assignment]:
    choice = policy.choose(candidates, request)
    return choice, choice.worker.local.assign(choice.prefill_tokens)


def tokens(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256, 49152) for _ in range(count)]


def request(ids: list[int], rid: str = "r") -> RequestInfo:
    return RequestInfo(rid, len(ids), tuple(block_hashes(ids, BLOCK, KEY)), BLOCK)


# -- round_robin, least_load, power_of_two ---------------------------------------------------------

def test_round_robin_takes_each_worker_in_turn_whatever_its_load():
    ws = workers(WorkerLoad(waiting=50), WorkerLoad(), WorkerLoad())
    policy = RoundRobin()
    picked = [route(policy, ws, RequestInfo(f"r{i}", 10))[0].worker.worker_id for i in range(6)]
    assert picked == ["w0", "w1", "w2", "w0", "w1", "w2"]


def test_least_load_picks_the_fewest_queued_tokens_plus_requests():
    ws = workers(WorkerLoad(waiting_prefill_tokens=300, running=1), WorkerLoad(running=5),
                 WorkerLoad(waiting_prefill_tokens=10, waiting=2))
    choice, _ = route(LeastLoad(), ws, RequestInfo("r", 10))
    assert choice.worker.worker_id == "w1" and "score=5" in choice.reason


def test_least_load_spreads_a_burst_before_any_load_report():
    ws = workers(WorkerLoad(), WorkerLoad(), WorkerLoad())
    policy = LeastLoad()
    for i in range(6):
        route(policy, ws, RequestInfo(f"r{i}", 10))
    assert [w.in_flight for w in ws] == [2, 2, 2]


def test_power_of_two_never_picks_the_most_loaded_of_three():
    ws = workers(WorkerLoad(running=1), WorkerLoad(running=9), WorkerLoad(running=4))
    policy = PowerOfTwo(seed=3)
    picked = Counter(policy.choose(ws, RequestInfo("r", 10)).worker.worker_id
                     for _ in range(300))
    assert picked["w1"] == 0
    assert picked["w0"] > picked["w2"] > 0


def test_power_of_two_with_one_candidate_picks_it():
    [only] = workers(WorkerLoad(running=3))
    assert PowerOfTwo(seed=1).choose([only], RequestInfo("r", 10)).worker is only


# -- cache_aware -----------------------------------------------------------------------------------

def text_request(text: str, rid: str = "r") -> RequestInfo:
    return RequestInfo(rid, len(text) // 4, text=text)


def test_cache_aware_sends_a_repeated_prefix_back_to_the_same_worker():
    ws = workers(WorkerLoad(), WorkerLoad(), WorkerLoad())
    policy = CacheAware(RouterConfig(), clock=Clock())
    system = "You are a meticulous assistant that answers in French. " * 4
    first, _ = route(policy, ws, text_request(system + "What is a cat?"))
    other, _ = route(policy, ws, text_request("Completely different text about dogs."))
    again, _ = route(policy, ws, text_request(system + "What is a dog?"))
    assert other.worker is not first.worker
    assert again.worker is first.worker and "match" in again.reason


def test_cache_aware_low_match_goes_to_the_worker_with_the_smallest_tree():
    ws = workers(WorkerLoad(), WorkerLoad())
    policy = CacheAware(RouterConfig(), clock=Clock())
    route(policy, ws, text_request("a" * 500))
    choice, _ = route(policy, ws, text_request("b" * 10))
    assert choice.worker.worker_id == "w1" and "smallest tree" in choice.reason


def test_cache_aware_imbalanced_in_flight_switches_to_the_shortest_queue():
    ws = workers(WorkerLoad(), WorkerLoad())
    policy = CacheAware(RouterConfig(), clock=Clock())
    text = "shared prefix " * 20
    home = route(policy, ws, text_request(text))[0].worker
    for _ in range(70):  # 71 in flight at home, 0 elsewhere: > 64 apart and > 1.5x
        home.local.assign(10)
    choice, _ = route(policy, ws, text_request(text))
    assert choice.worker is not home and "imbalanced" in choice.reason


def test_cache_aware_within_the_absolute_threshold_keeps_cache_affinity():
    ws = workers(WorkerLoad(), WorkerLoad())
    policy = CacheAware(RouterConfig(), clock=Clock())
    text = "shared prefix " * 20
    home = route(policy, ws, text_request(text))[0].worker
    for _ in range(60):  # 61 vs 0: not more than 64 apart
        home.local.assign(10)
    assert route(policy, ws, text_request(text))[0].worker is home


def test_cache_aware_forgets_a_worker_that_left():
    ws = workers(WorkerLoad(), WorkerLoad())
    policy = CacheAware(RouterConfig(), clock=Clock())
    route(policy, ws, text_request("hello world " * 10))
    route(policy, ws, text_request("something else"))
    assert policy.tree.tenants() == ["w0", "w1"]
    policy.remove_worker("w0")
    assert policy.tree.tenants() == ["w1"] and policy.tree.size("w0") == 0
    assert policy.tree.prefix_match("hello world", {"w0", "w1"}) == (0, None)
    policy.tree.check_integrity()


def test_approx_tree_splits_edges_and_matches_by_character():
    tree = ApproxTree()
    tree.insert("hello world", "a", now=1.0)
    tree.insert("hello there", "b", now=2.0)
    tree.insert("help", "a", now=3.0)
    tree.check_integrity()
    assert tree.prefix_match("hello world!", {"a", "b"}) == (11, "a")
    assert tree.prefix_match("hello thx", {"a", "b"}) == (8, "b")
    assert tree.prefix_match("hello", {"a", "b"}) == (5, "b")  # b used "hello" last
    assert tree.prefix_match("hello th", {"a"}) == (6, "a")    # b's branch is not a's
    assert tree.prefix_match("xyz", {"a", "b"}) == (0, None)
    assert tree.size("a") == len("hello world") + 1 and tree.size("b") == len("hello there")


def test_approx_tree_eviction_drops_least_recently_used_leaves_first():
    tree = ApproxTree()
    tree.insert("aaaa-old", "w", now=1.0)
    tree.insert("bbbb", "w", now=3.0)
    tree.insert("aaaa-new", "w", now=5.0)
    tree.evict(max_size=10)  # 15 characters: "old" (t=1), then "bbbb" (t=3) go
    tree.check_integrity()
    assert tree.size("w") <= 10
    assert tree.prefix_match("aaaa-new", {"w"}) == (8, "w")
    assert tree.prefix_match("aaaa-old", {"w"})[0] == 5
    assert tree.prefix_match("bbbb", {"w"})[0] == 0


def test_cache_aware_evicts_on_its_interval():
    clock = Clock()
    policy = CacheAware(RouterConfig(eviction_interval_s=10, max_tree_size=100), clock=clock)
    ws = workers(WorkerLoad())
    for i in range(20):
        route(policy, ws, text_request(f"{i:03d}" + "x" * 50))
    assert policy.tree.size("w0") > 100
    clock.now += 11
    route(policy, ws, text_request("y"))
    assert policy.tree.size("w0") <= 101  # trimmed to 100, then "y" inserted
    policy.tree.check_integrity()


# -- kv_aware --------------------------------------------------------------------------------------

def kv_setup(*loads: WorkerLoad, **options) -> tuple[KvAware, list[SimWorker], PrefixIndex, Clock]:
    index, clock = PrefixIndex(), Clock()
    ws = workers(*loads)
    for w in ws:
        index.join(w.worker_id).reset(0, [])
    return KvAware(index, SMOLLM2_CPU, RouterConfig(**options), clock=clock), ws, index, clock


def hold(index: PrefixIndex, worker_id: str, ids: list[int]) -> None:
    handle = index.worker(worker_id)
    assert handle is not None and handle.sequence is not None
    assert handle.store(handle.sequence + 1, block_hashes(ids, BLOCK, KEY))


def test_kv_aware_prefers_the_worker_holding_the_prefix():
    policy, ws, index, _ = kv_setup(WorkerLoad(), WorkerLoad(), WorkerLoad())
    ids = tokens(1, 640)
    hold(index, "w2", ids[:512])
    choice, _ = route(policy, ws, request(ids))
    assert choice.worker.worker_id == "w2"
    assert choice.prefill_tokens == 128 and "cached=512/640" in choice.reason


def test_kv_aware_whole_prompt_cached_still_prefills_the_last_token():
    policy, ws, index, _ = kv_setup(WorkerLoad(), WorkerLoad())
    ids = tokens(1, 64)
    hold(index, "w1", ids)
    choice, _ = route(policy, ws, request(ids))
    assert choice.worker.worker_id == "w1" and choice.prefill_tokens == 1


def test_kv_aware_leaves_a_cached_worker_whose_queue_costs_more_than_recomputing():
    policy, ws, index, _ = kv_setup(WorkerLoad(waiting_prefill_tokens=5000, waiting=3),
                                    WorkerLoad())
    ids = tokens(1, 640)
    hold(index, "w0", ids[:512])
    choice, _ = route(policy, ws, request(ids))
    assert choice.worker.worker_id == "w1" and choice.prefill_tokens == 640


def test_kv_aware_decode_pressure_breaks_a_tie_in_queued_prefill():
    policy, ws, _, _ = kv_setup(WorkerLoad(running=40), WorkerLoad(running=2))
    choice, _ = route(policy, ws, request(tokens(1, 300)))
    assert choice.worker.worker_id == "w1"
    assert SMOLLM2_CPU.predicted_ttft_s(0, 300, 40) > SMOLLM2_CPU.predicted_ttft_s(0, 300, 2)


def test_kv_aware_hot_prefix_spills_over_the_load_cap_and_replicates():
    policy, ws, index, _ = kv_setup(WorkerLoad(running=6), WorkerLoad(), WorkerLoad(),
                                    WorkerLoad())
    ids = tokens(1, 640)
    hold(index, "w0", ids[:512])
    choice, assignment = route(policy, ws, request(ids))
    # w0 would answer fastest, but 7 of the 7 requests is over max(4, 2 x 7/4).
    assert choice.worker.worker_id != "w0" and "over_cap=1/4" in choice.reason
    # Once its prefill is done (first token; its KV events not back yet), the spill-over
    # worker holds the prefix: the next request sharing it follows.
    assignment.started()
    follower, _ = route(policy, ws, request(ids[:512] + tokens(2, 128)))
    assert follower.worker is choice.worker


def test_kv_aware_under_the_cap_floor_keeps_affinity():
    policy, ws, index, _ = kv_setup(WorkerLoad(running=3), WorkerLoad())
    ids = tokens(1, 640)
    hold(index, "w0", ids[:512])
    assert route(policy, ws, request(ids))[0].worker.worker_id == "w0"


def test_kv_aware_with_every_worker_over_the_cap_still_routes():
    policy, ws, _, _ = kv_setup(WorkerLoad(running=1), WorkerLoad(running=1), load_cap=1.0,
                                load_cap_min_requests=1)
    choice, _ = route(policy, ws, request(tokens(1, 64)))
    assert "every worker over the cap" in choice.reason


def test_kv_aware_burst_sharing_a_new_prefix_lands_together_before_any_event():
    busy = WorkerLoad(waiting_prefill_tokens=2000, waiting=4)
    policy, ws, _, _ = kv_setup(busy, busy)
    prefix = tokens(1, 2000)
    choices = [route(policy, ws, request(prefix + tokens(10 + i, 48), f"r{i}"))[0]
               for i in range(3)]
    assert len({c.worker.worker_id for c in choices}) == 1
    assert "blocks pending" in choices[1].reason and choices[1].prefill_tokens < 100


def test_kv_aware_same_burst_on_idle_workers_also_lands_together():
    policy, ws, _, _ = kv_setup(WorkerLoad(), WorkerLoad())
    prefix = tokens(1, 2000)
    first = route(policy, ws, request(prefix + tokens(10, 48), "a"))[0]
    second = route(policy, ws, request(prefix + tokens(11, 48), "b"))[0]
    assert second.worker is first.worker


def test_kv_aware_short_identical_burst_spreads_over_idle_workers_when_ttft_greedy():
    # Near TTFT-greedy (a small work weight), recomputing two blocks elsewhere costs less than
    # waiting behind the first request. (At the default weight the copy's work outweighs it:
    # the next test.)
    policy, ws, _, _ = kv_setup(WorkerLoad(), WorkerLoad(), work_weight=0.25)
    ids = tokens(1, 36)
    first = route(policy, ws, request(ids, "a"))[0]
    second = route(policy, ws, request(ids, "b"))[0]
    assert second.worker is not first.worker
    assert [w.in_flight for w in ws] == [1, 1]


def test_kv_aware_short_identical_burst_stays_together_at_the_default_work_weight():
    policy, ws, _, _ = kv_setup(WorkerLoad(), WorkerLoad())
    assert policy.work_weight == RouterConfig().work_weight
    ids = tokens(1, 36)
    first = route(policy, ws, request(ids, "a"))[0]
    second = route(policy, ws, request(ids, "b"))[0]
    assert second.worker is first.worker
    assert sorted(w.in_flight for w in ws) == [0, 2]


def test_kv_aware_forgotten_assignment_no_longer_attracts_its_prefix():
    policy, ws, _, _ = kv_setup(WorkerLoad(), WorkerLoad())
    prefix = tokens(1, 2000)
    first, assignment = route(policy, ws, request(prefix + tokens(10, 48), "a"))
    policy.forget(first)          # its worker failed before the first token
    assignment.finish()
    second = route(policy, ws, request(prefix + tokens(11, 48), "b"))[0]
    assert "cached=0/" in second.reason and second.prefill_tokens == 2048


def test_kv_aware_pending_blocks_expire_after_the_predicted_prefill():
    policy, ws, index, clock = kv_setup(WorkerLoad(), WorkerLoad())
    ids = tokens(1, 320)
    first = route(policy, ws, request(ids, "a"))[0]
    assert first.predicted_ttft_s is not None
    hashes = request(ids).block_hashes
    assert index.match(hashes, now=clock.now).of(first.worker.worker_id) == 20
    clock.now += first.predicted_ttft_s + policy.pending_slack_s
    assert index.match(hashes, now=clock.now).blocks == {}


def test_kv_aware_without_block_hashes_routes_on_load_alone():
    policy, ws, _, _ = kv_setup(WorkerLoad(waiting_prefill_tokens=900), WorkerLoad(running=1))
    choice, _ = route(policy, ws, RequestInfo("r", 100))
    assert choice.worker.worker_id == "w1" and choice.prefill_tokens == 100


def test_kv_aware_equal_idle_workers_take_turns():
    policy, ws, _, _ = kv_setup(WorkerLoad(), WorkerLoad(), WorkerLoad())
    picked = [policy.choose(ws, RequestInfo(f"r{i}", 50)).worker.worker_id for i in range(3)]
    assert sorted(picked) == ["w0", "w1", "w2"]


# -- cost profile ----------------------------------------------------------------------------------

def test_cost_profile_prefill_cost_grows_with_queue_and_prompt():
    p = SMOLLM2_CPU
    assert p.prefill_s(0) == 0.0 and p.predicted_ttft_s(0, 0, 0) == 0.0
    assert 0 < p.prefill_s(16) < p.prefill_s(64) < p.prefill_s(4096)
    assert p.predicted_ttft_s(1000, 100, 0) > p.predicted_ttft_s(0, 100, 0)
    # Per token, big steps are cheaper than small ones.
    assert p.prefill_s(512) / 512 < p.prefill_s(16) / 16


def test_cost_profile_round_trips_through_json(tmp_path):
    path = tmp_path / "profile.json"
    BUILT_IN["llama3-8b-h100"].save(path)
    loaded = resolve_profile(str(path))
    assert loaded == BUILT_IN["llama3-8b-h100"]
    assert resolve_profile(None) is SMOLLM2_CPU


def test_cost_profile_reads_the_engine_benchmark_result(tmp_path):
    result = {"machine": {"model": "m", "device": "cuda", "dtype": "bfloat16", "date": "d"},
              "ours": {"engine_config": {"max_num_batched_tokens": 8192, "max_num_seqs": 128},
                       "prefill": {"1024": {"ttft_s": 0.05}, "8191": {"ttft_s": 0.30}},
                       "decode": {"1": {"decode_tps": 100.0}, "32": {"decode_tps": 2000.0}}}}
    path = tmp_path / "engine.json"
    path.write_text(json.dumps(result))
    profile = CostProfile.load(path)
    assert profile.max_batch_tokens == 8192 and profile.max_num_seqs == 128
    assert profile.prefill_s(1024) == pytest.approx(0.05)
    assert profile.decode_step_s(1) == pytest.approx(0.01)
    assert profile.decode_step_s(32) == pytest.approx(0.016)


def test_cost_profile_rejects_a_malformed_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "x", "prefill": [[16, 1e-3]]}))
    with pytest.raises(ValueError, match="not a cost profile"):
        CostProfile.load(path)


# -- configuration and hashing ---------------------------------------------------------------------

def test_config_default_policy_is_kv_aware_and_every_policy_builds():
    assert load_config(env={}).router.policy == "kv_aware"
    for name in ("kv_aware", "cache_aware", "power_of_two", "least_load", "round_robin"):
        assert make_policy(RouterConfig(policy=name), PrefixIndex()).name == name
    env = {"ELECTRON_ROUTER__POLICY": "cache_aware", "ELECTRON_ROUTER__CACHE_THRESHOLD": "0.5"}
    policy = make_policy(load_config(env=env).router)
    assert isinstance(policy, CacheAware) and policy.cache_threshold == 0.5


@pytest.mark.parametrize("salt", ["", "tenant-a"])
def test_router_and_worker_compute_identical_block_hashes(salt):
    ids = tokens(5, 100)
    pool = WorkerPool(StaticWorkerSource([]), model_id="electron", poll_s=1.0,
                      policy=make_policy("kv_aware"))
    pool.block_size = BLOCK  # what the first worker's GetInfo sets
    info = pool.request_info("r", ids, cache_salt=salt)
    # The worker's side: Engine.make_requests keys each request with extra_key(salt, model id).
    worker_side = Request(request_id="r", parent_id="r", prompt_token_ids=ids,
                          sampling=SamplingParams(), cache_key=extra_key(salt, "electron"),
                          block_size=BLOCK)
    assert list(info.block_hashes) == worker_side.block_hashes and len(info.block_hashes) == 6
    other = pool.request_info("r", ids, cache_salt="tenant-b")
    assert set(other.block_hashes).isdisjoint(info.block_hashes)
