"""Routing decision micro-benchmark: how long one routing decision takes.

    python bench/routing_decision_bench.py [--out bench/results/routing_decision.json]
        [--workers 64] [--blocks 1000000] [--decisions 20000] [--seed 0]
        [--profile llama3-8b-h100]

The index holds ``--blocks`` (worker, block) entries over ``--workers`` workers, shaped like
a prefix cache: shared system prompts replicated on a few workers each, and per-worker
conversations that extend them. Every worker carries a random load. Each timed decision is
what the pool does per request: ``policy.choose`` over every worker (for kv_aware: one pass
of the prompt's block hashes over the index, a predicted TTFT per worker, the load cap, and
recording the pending blocks) plus counting the request at the chosen worker. Prompts mix
hits (a conversation's prefix plus new blocks), partial hits (a system prompt only) and
misses, 16 to 256 blocks long. A simulated clock advances 1 ms per decision, so pending
assignments accumulate and expire as they would at 1,000 requests/s; requests finish after
200 decisions. The cost profile (default: the built-in H100 estimate, since 64 workers is a
GPU deployment) sets the predicted TTFTs and so how long pending assignments live.

Each decision is timed twice: wall clock (``perf_counter``) and the thread's CPU time
(``thread_time``). On a quiet machine they agree; on a shared one (this project's 2-core
development box runs several jobs at once) the wall clock also counts the 4 ms time slices
the scheduler gives other processes in the middle of a decision, so the CPU time is the
decision's own cost, and ``machine.load_average`` says how busy the box was.

Block hashes are random 64-bit integers here (the index only compares them); the cost of
computing real ones (core.hashing, which the router pays once per request, before the
decision) is measured separately for a 2,048-token prompt. Target (the issue): decision
p99 <= 1 ms with 64 workers and 1,000,000 indexed blocks.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from core.config import RouterConfig  # noqa: E402
from core.hashing import block_hashes, extra_key  # noqa: E402
from router.routing.factory import make_policy  # noqa: E402
from router.routing.load import Assignment, CountsLocalLoad, LocalLoad, WorkerLoad  # noqa: E402
from router.routing.policy import RequestInfo, RoutingPolicy  # noqa: E402
from router.routing.prefix_index import PrefixIndex  # noqa: E402

BLOCK_SIZE = 16
TARGET_P99_MS = 1.0


@dataclass
class Worker(CountsLocalLoad):
    worker_id: str
    load: WorkerLoad
    local: LocalLoad = field(default_factory=LocalLoad)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Corpus:
    """What the index holds: system prompts and conversations, as hash chains."""

    systems: list[list[int]]
    conversations: list[list[int]]  # each starts with one of the system prompts


def build_index(rng: random.Random, workers: list[Worker], total: int
                ) -> tuple[PrefixIndex, Corpus]:
    index = PrefixIndex()
    handles = {w.worker_id: index.join(w.worker_id) for w in workers}
    systems = [[rng.getrandbits(64) for _ in range(rng.randint(8, 32))] for _ in range(256)]
    per_worker = total // len(workers)
    conversations: list[list[int]] = []
    held: dict[str, set[int]] = {w.worker_id: set() for w in workers}
    for system in systems:  # each system prompt cached on 4 workers
        for worker in rng.sample(workers, 4):
            held[worker.worker_id].update(system)
    for worker in workers:
        blocks = held[worker.worker_id]
        while len(blocks) < per_worker:
            system = rng.choice(systems)
            blocks.update(system)  # a conversation's worker holds its system prompt
            room = per_worker - len(blocks)
            if room <= 0:
                break
            turns = [rng.getrandbits(64) for _ in range(min(rng.randint(8, 200), room))]
            conversations.append(system + turns)
            blocks.update(turns)
        handles[worker.worker_id].reset(0, blocks)
    return index, Corpus(systems, conversations)


def make_prompts(rng: random.Random, corpus: Corpus, count: int) -> list[tuple[int, ...]]:
    prompts = []
    for _ in range(count):
        length = rng.randint(16, 256)
        roll = rng.random()
        if roll < 0.5:    # a later turn of a cached conversation
            base = rng.choice(corpus.conversations)
            base = base[: rng.randint(1, len(base))]
        elif roll < 0.8:  # a new conversation on a cached system prompt
            base = rng.choice(corpus.systems)
        else:             # nothing cached
            base = []
        tail = [rng.getrandbits(64) for _ in range(max(0, length - len(base)))]
        prompts.append(tuple((base + tail)[:length]))
    return prompts


def random_load(rng: random.Random) -> WorkerLoad:
    running = rng.randint(0, 64)
    return WorkerLoad(running=running, waiting=rng.randint(0, 8),
                      waiting_prefill_tokens=rng.randint(0, 8192), kv_blocks_used=0,
                      kv_blocks_total=100_000, running_decode_tokens=running * 200)


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000

    return {"p50_us": at(0.50), "p90_us": at(0.90), "p99_us": at(0.99),
            "max_us": ordered[-1] / 1000, "mean_us": statistics.fmean(ordered) / 1000}


def time_decisions(policy: RoutingPolicy, workers: list[Worker], requests: list[RequestInfo],
                   clock: Clock, warmup: int) -> dict[str, dict[str, float]]:
    wall: list[int] = []
    cpu: list[int] = []
    running: deque[Assignment] = deque()
    for i, request in enumerate(requests):
        clock.now += 0.001
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        choice = policy.choose(workers, request)
        assignment = choice.worker.local.assign(choice.prefill_tokens)
        end_cpu, end = time.thread_time_ns(), time.perf_counter_ns()
        if i >= warmup:
            wall.append(end - start)
            cpu.append(end_cpu - start_cpu)
        running.append(assignment)
        if len(running) > 200:  # the oldest request finished
            running.popleft().finish()
    while running:
        running.popleft().finish()
    return {"cpu": percentiles(cpu), "wall": percentiles(wall)}


def time_match(index: PrefixIndex, prompts: list[tuple[int, ...]]) -> dict[str, float]:
    samples = []
    for prompt in prompts:
        start = time.thread_time_ns()
        index.match(prompt)
        samples.append(time.thread_time_ns() - start)
    return percentiles(samples)


def time_hashing(rng: random.Random, tokens: int, repeats: int) -> dict[str, float]:
    key = extra_key("tenant", "electron")
    samples = []
    for _ in range(repeats):
        ids = [rng.randrange(49152) for _ in range(tokens)]
        start = time.thread_time_ns()
        block_hashes(ids, BLOCK_SIZE, key)
        samples.append(time.thread_time_ns() - start)
    return percentiles(samples)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/routing_decision.json")
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--blocks", type=int, default=1_000_000)
    p.add_argument("--decisions", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="llama3-8b-h100",
                   help="cost profile: a built-in name or a JSON file (router/routing/cost_model.py)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)

    rss_before = rss_mib()
    build_start = time.perf_counter()
    workers = [Worker(f"w{i:02d}", random_load(rng)) for i in range(args.workers)]
    index, corpus = build_index(rng, workers, args.blocks)
    build_s = time.perf_counter() - build_start
    print(f"index: {index.num_entries:,} entries, {index.num_hashes:,} distinct hashes, "
          f"{args.workers} workers, built in {build_s:.1f} s", file=sys.stderr)
    prompts = make_prompts(rng, corpus, args.decisions)
    requests = [RequestInfo(f"r{i}", len(p) * BLOCK_SIZE + rng.randint(0, BLOCK_SIZE - 1),
                            block_hashes=p, block_size=BLOCK_SIZE)
                for i, p in enumerate(prompts)]
    texts = ["".join(chr(0x4E00 + (h & 0xFFF)) for h in p[:64]) for p in prompts]

    gc.freeze()  # the index is long-lived: keep it out of the collector's scans
    warmup = min(1000, args.decisions // 10)
    result: dict[str, Any] = {
        "workers": args.workers, "indexed_entries": index.num_entries,
        "distinct_hashes": index.num_hashes, "decisions": args.decisions - warmup,
        "prompt_blocks": {"min": min(map(len, prompts)), "max": max(map(len, prompts)),
                          "mean": statistics.fmean(map(len, prompts))},
        "index_build_s": build_s,
        "cost_profile": args.profile,
        "policies": {},
    }
    result["match_only"] = time_match(index, prompts[:5000])
    for name in ("kv_aware", "cache_aware", "power_of_two", "least_load", "round_robin"):
        clock = Clock()
        policy = make_policy(RouterConfig(policy=name, cost_profile=args.profile), index,
                             clock=clock)
        reqs = requests
        if name == "cache_aware":  # matches characters: one per block of the prompt's head
            reqs = [RequestInfo(r.request_id, r.num_prompt_tokens, text=t)
                    for r, t in zip(requests, texts)]
        result["policies"][name] = time_decisions(policy, workers, reqs, clock, warmup)
        print(f"{name}: cpu {result['policies'][name]['cpu']}", file=sys.stderr)
    result["hashing_2048_tokens"] = time_hashing(rng, 2048, 200)
    result["rss_mib"] = {"before": rss_before, "after": rss_mib()}
    kv = result["policies"]["kv_aware"]
    result["target"] = {"kv_aware_p99_ms": TARGET_P99_MS,
                        "met_cpu": kv["cpu"]["p99_us"] / 1000 <= TARGET_P99_MS,
                        "met_wall": kv["wall"]["p99_us"] / 1000 <= TARGET_P99_MS}
    result["machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                         "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                         "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                         "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"kv_aware": kv, "match_only": result["match_only"],
                      "hashing_2048_tokens": result["hashing_2048_tokens"],
                      "target": result["target"],
                      "load_average": result["machine"]["load_average"]}, indent=2))
    return result


if __name__ == "__main__":
    main()
