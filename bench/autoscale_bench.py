"""Autoscaling benchmark: how fast a load step gets new workers serving, and whether any
request fails while the pool grows and shrinks.

    python bench/autoscale_bench.py [--out bench/results/autoscale.json] [--burst 10]
        [--max-workers 3]

A real local cluster (tests/support/autoscale_cluster.py): local Ray, the autoscaler with
short cooldowns, worker actors running the tiny random Llama on CPU, a router on a TCP port,
and clients using the official openai SDK (streamed requests of 24 tokens, one after
another). The shared pool starts at 1 worker (max ``--max-workers``); one client trickles
all along. At the load step ``--burst`` more clients start. Measured from the step:

- ``decision_s``: until the autoscaler starts the new workers (its reaction);
- ``ready_s``: until each new worker's actor reports ready (model loaded, gRPC up,
  registered) - the cold start of a worker process;
- ``serving_s``: until each new worker gets its first request from the router
  (``ready_to_serving_s``: the part after it was ready);
- then the burst stops and ``scale_down_s`` is the time until the pool is back to 1 worker
  (the quiet delay, then one drained worker per cooldown).

Failed requests are counted during scale-up and during scale-down (target: 0 in both).
Baseline, in the same run and on the same Ray: one worker started directly (no autoscaler,
no load), ``baseline_cold_start_s``; ``serving_over_cold_start`` is the last new worker's
``serving_s`` over it, so the autoscaler's own share (decision, registry poll, routing)
shows apart from the worker's cold start, which on a GPU node is the model's load time
(and, on Kubernetes, the pod's start).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.fleet import WorkerSet  # noqa: E402
from tests.support.autoscale_cluster import (  # noqa: E402
    Load,
    autoscale_config,
    start_cluster,
    wait_for,
)
from tests.support.tiny_model import make_tiny_llama_dir  # noqa: E402


async def cold_start(config) -> float:
    """One worker started directly on the running Ray, in a throwaway pool."""
    cluster = config.cluster.model_copy(update={"pool": f"baseline-{uuid.uuid4().hex[:4]}"})
    workers = WorkerSet(config.model_copy(update={"cluster": cluster}))
    start = time.monotonic()
    workers.start(1)
    await workers.wait_ready(1)
    elapsed = time.monotonic() - start
    await workers.stop()
    return elapsed


async def run(args: argparse.Namespace) -> dict:
    model_dir = make_tiny_llama_dir(Path(tempfile.mkdtemp(prefix="autoscale-bench-")))
    config = autoscale_config(model_dir, pools=[
        {"name": "default", "min_workers": 1, "max_workers": args.max_workers,
         "target_requests_per_worker": 2, "target_ttft_s": 30.0}])
    cluster = await start_cluster(config)
    shared = cluster.autoscaler.pools["default"]
    try:
        baseline = await cold_start(config)
        load = Load(cluster.base_url, cluster.keys)
        trickle = load.add(1)
        await asyncio.sleep(3)
        first = set(shared.workers.actors)
        failed_before = len(load.failures)

        step = time.monotonic()
        burst = load.add(args.burst)
        ready_at: dict[str, float] = {}

        def grown() -> bool:
            for worker_id in shared.serving:
                if worker_id not in first:
                    ready_at.setdefault(worker_id, time.monotonic())
            new = [w for w in shared.serving if w not in first]
            return len(new) == args.max_workers - 1 and all(
                w in cluster.decisions.first_at for w in new)

        await wait_for(grown, 180, f"{args.max_workers} workers serving")
        started = [t for t, kind, wid in shared.events if kind == "start" and wid not in first]
        serving = {w: cluster.decisions.first_at[w] - step for w in ready_at}
        failed_up = len(load.failures) - failed_before
        await asyncio.sleep(2)  # the grown pool serves the burst for a moment
        await load.remove(burst)

        down = time.monotonic()
        await wait_for(lambda: len(shared.active) == 1 and not shared.retiring, 180,
                       "the pool back at 1 worker")
        scale_down_s = time.monotonic() - down
        await asyncio.sleep(1)
        await load.remove(trickle)
        failed_down = len(load.failures) - failed_before - failed_up
        return {
            "workers": {"min": 1, "max": args.max_workers},
            "burst_clients": args.burst,
            "autoscaler": config.autoscaler.model_dump(exclude={"pools"}),
            "pool": config.autoscaler.pools[0].model_dump(),
            "baseline_cold_start_s": round(baseline, 3),
            "scale_up": {
                "decision_s": round(min(started) - step, 3),
                "ready_s": sorted(round(t - step, 3) for t in ready_at.values()),
                "serving_s": sorted(round(t, 3) for t in serving.values()),
                # Registry poll + the router connecting it + its first routed request.
                "ready_to_serving_s": sorted(round(serving[w] - (ready_at[w] - step), 3)
                                             for w in ready_at),
                "failed_requests": failed_up,
            },
            "serving_over_cold_start": round(max(serving.values()) / baseline, 2),
            "scale_down": {"scale_down_s": round(scale_down_s, 3),
                           "drained_then_stopped": [wid for _, kind, wid in shared.events
                                                    if kind == "stopped"],
                           "failed_requests": failed_down},
            "requests_ok": sum(load.ok.values()),
            "failures": load.failures[:10],
        }
    finally:
        await cluster.stop()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "autoscale.json")
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--max-workers", type=int, default=3)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    result = asyncio.run(run(args))
    result["target"] = {"failed_requests": 0,
                        "met": result["scale_up"]["failed_requests"] == 0
                        and result["scale_down"]["failed_requests"] == 0}
    result["machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                         "cpus": os.cpu_count(), "load_average_before": load_before,
                         "load_average_after": os.getloadavg(),
                         "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                         "command": " ".join([Path(sys.argv[0]).name,
                                              *(argv or sys.argv[1:])])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("baseline_cold_start_s", "scale_up", "scale_down",
                                             "serving_over_cold_start", "target")}, indent=2))
    return result


if __name__ == "__main__":
    main()
