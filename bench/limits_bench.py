"""Tenancy benchmark: the limiter's cost, limits shared by two replicas, priority under load.

    python bench/limits_bench.py [--out bench/results/limits.json] [--checks 3000]
        [--redis-url redis://127.0.0.1:6379/0] [--database-url postgresql://...]
        [--flood-tenants 12] [--flood-tokens 256] [--samples 80] [--probe-gap-ms 25]
        [--skip-serving]

1. **Limiter check latency** with Redis: ``RedisLimiter.admit`` (one EVALSHA round trip:
   revocation, sliding-window RPM and concurrency lease, atomically), timed ``--checks``
   times on loopback, beside a Redis ``PING`` measured in the same run (the round trip's
   floor) and the in-process limiter. Target: p99 <= 1 ms.
2. **Two replicas, one 200 RPM**: two real router apps (uvicorn) sharing Redis and
   PostgreSQL, in front of one worker running the tiny random Llama; an enterprise tenant
   (200 RPM, 20 concurrent) sends 600 requests, alternating replicas, 16 at a time, well
   inside a minute. Every request past the 200th must get 429: admitted within 2 % of 200.
3. **Enterprise TTFT under a standard flood**: the enterprise tenant's time to first token
   (streamed, ``--samples`` sequential requests) unloaded, then while ``--flood-tenants``
   standard tenants each keep their 3 allowed streams busy (``--flood-tokens`` tokens each,
   EOS ignored) against a worker whose batch holds ``--max-num-seqs`` sequences; the ratio
   loaded / unloaded, target <= 2. Each probe starts after a random pause (uniform in
   0..``--probe-gap-ms``): a client's requests arrive at any point of the engine's step, not
   in step with it (back to back, an unloaded probe finds the worker warm from the one before,
   and a flooded one is sent as the step that finished the one before ends, lands just after
   the next step began and waits most of it; ``--probe-gap-ms 0`` measures that). The
   flood's clients run in a process of their own (other tenants' clients are not this one's
   event loop); it reports when each of its streams ran, so the result shows how many flood
   streams were in flight as each loaded probe started (the flood must still fill the batch:
   a standard plan allows only 10 requests a minute, so streams are long). Standard requests
   shed (503) or limited (429) during the flood are counted. The random Llama is made wide
   enough (``--hidden``) that decoding, not the router, is the bottleneck.

Writes the machine's load average and the exact command into the results file: the
development box (2 cores) is shared, so absolute timings are noisy; the ratios are measured
in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from router.tenancy.limits import InProcessLimiter, RedisLimiter  # noqa: E402
from router.tenancy.store import Plan, Principal  # noqa: E402

MODEL = "electron"
ADMIN = "sk-bench-admin"
TARGET_P99_MS = 1.0
TARGET_RPM_ERROR = 0.02
TARGET_TTFT_RATIO = 2.0


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50_ms": round(q[49], 4), "p90_ms": round(q[89], 4), "p99_ms": round(q[98], 4),
            "max_ms": round(ms[-1], 4), "n": len(ms)}


# -- 1. limiter check latency -----------------------------------------------------------------------

async def limiter_latency(redis_url: str, checks: int) -> dict[str, Any]:
    import redis.asyncio as aioredis

    prefix = f"electron-bench-{uuid.uuid4().hex[:8]}"
    plan = Plan("bench", rpm=10**9, concurrency=10**9, tpm=None, priority=0,
                max_context=None, shed_queue_per_worker=1)
    tenants = [Principal(f"bench-{i}", f"k{i}", plan, "", None) for i in range(16)]
    redis_limiter = RedisLimiter(redis_url, prefix=prefix, slot_lease_s=30)
    await redis_limiter.start()
    client = aioredis.Redis.from_url(redis_url)
    try:
        for i in range(200):  # warm: connections, the script cache
            (await redis_limiter.admit(tenants[i % 16])).release()
            await client.ping()
        ping, admit = [], []
        server_before = await _evalsha_stats(client)
        for i in range(checks):
            t0 = time.perf_counter()
            await client.ping()
            t1 = time.perf_counter()
            slot = await redis_limiter.admit(tenants[i % 16])
            t2 = time.perf_counter()
            slot.release()
            ping.append(t1 - t0)
            admit.append(t2 - t1)
        server_after = await _evalsha_stats(client)
        local = InProcessLimiter()
        in_process = []
        for i in range(checks):
            t0 = time.perf_counter()
            slot = await local.admit(tenants[i % 16])
            in_process.append(time.perf_counter() - t0)
            slot.release()
    finally:
        await redis_limiter.stop()
        keys = [k async for k in client.scan_iter(match=prefix + ":*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    result = {"redis_admit": percentiles(admit), "redis_ping_baseline": percentiles(ping),
              "in_process_admit": percentiles(in_process)}
    calls = server_after[0] - server_before[0]
    # The script's own time inside Redis (INFO commandstats), which the machine's load
    # barely touches: what a check costs beyond the network round trip.
    result["redis_server_us_per_evalsha"] = round(
        (server_after[1] - server_before[1]) / calls, 2) if calls else None
    result["p99_target_ms"] = TARGET_P99_MS
    result["meets_target"] = result["redis_admit"]["p99_ms"] <= TARGET_P99_MS
    result["admit_over_ping_p50"] = round(result["redis_admit"]["p50_ms"]
                                          / result["redis_ping_baseline"]["p50_ms"], 3)
    return result


async def _evalsha_stats(client) -> tuple[int, int]:
    stats = (await client.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


# -- 2 and 3: real routers --------------------------------------------------------------------------

class Serving:
    """One worker (the random Llama) and two router replicas sharing Redis and PostgreSQL
    (a schema of its own, dropped at the end), each in a process of its own: the load
    generator's event loop must not be the routers' or the worker's."""

    def __init__(self, redis_url: str, database_url: str, max_num_seqs: int, hidden: int):
        self.redis_url, self.database_url = redis_url, database_url
        self.max_num_seqs, self.hidden = max_num_seqs, hidden
        self.procs: list[subprocess.Popen[str]] = []

    def _spawn(self, *argv: str) -> int:
        proc = subprocess.Popen([sys.executable, __file__, "--serve", *argv], cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"a serving process failed to start: {line!r}")
        return int(line.split()[1])

    async def __aenter__(self) -> Serving:
        import psycopg

        from tests.support.tenancy import unique_prefix, with_search_path
        from tests.support.tiny_model import make_tiny_llama_dir

        self.tmp = Path(tempfile.mkdtemp(prefix="limits-bench-"))
        # Wide enough that the worker, not the router, is what a flood saturates.
        tiny = make_tiny_llama_dir(self.tmp / "tiny", hidden=self.hidden, layers=4,
                                   heads=4, kv_heads=2)
        self.schema = "bench_" + uuid.uuid4().hex[:10]
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {self.schema}")
        self.prefix = unique_prefix()
        port = await asyncio.to_thread(self._spawn, "worker", str(tiny), str(self.max_num_seqs))
        self.worker = self.procs[-1]
        self.worker_report: dict[str, Any] = {}
        self.routers = []
        for i in range(2):
            overrides = {
                "engine": {"model": str(tiny)},
                "auth": {"admin_key": ADMIN},
                "tenancy": {"redis_url": self.redis_url, "redis_prefix": self.prefix,
                            "database_url": with_search_path(self.database_url, self.schema),
                            "spool_path": str(self.tmp / f"spool{i}.jsonl")}}
            router_port = await asyncio.to_thread(self._spawn, "router", str(port),
                                                  json.dumps(overrides))
            self.routers.append(f"http://127.0.0.1:{router_port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        import psycopg

        from tests.support.tenancy import drop_redis_prefix

        for proc in reversed(self.procs):  # routers first, then the worker
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()
            if proc is self.worker:
                self.worker_report = json.loads(await asyncio.to_thread(proc.stdout.readline))
            await asyncio.to_thread(proc.wait, 60)
        await drop_redis_prefix(self.prefix, self.redis_url)
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {self.schema} CASCADE")

    def start_flood(self, keys: list[str], tokens: int) -> subprocess.Popen[str]:
        self._spawn("flood", json.dumps(self.routers), json.dumps(keys), str(tokens))
        return self.procs[-1]

    @staticmethod
    def stop_flood(proc: subprocess.Popen[str]) -> dict[str, Any]:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        status = json.loads(proc.stdout.readline())
        proc.wait(60)
        return status

    async def tenant(self, client, plan: str) -> str:
        response = await client.post(
            f"{self.routers[0]}/v1/admin/tenants", headers={"Authorization":
                                                                 f"Bearer {ADMIN}"},
            json={"tenant_id": f"{plan}-{uuid.uuid4().hex[:8]}", "plan": plan})
        response.raise_for_status()
        return response.json()["key"]


def body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say something."}],
            "temperature": 0, **fields}


async def shared_rpm(serving: Serving, attempts: int = 600, parallel: int = 16
                     ) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(timeout=60) as client:
        key = await serving.tenant(client, "enterprise")
        headers = {"Authorization": f"Bearer {key}"}
        statuses: dict[int, int] = {}
        per_replica = [0, 0]
        next_attempt = 0
        start = time.monotonic()

        async def sender() -> None:
            nonlocal next_attempt
            while next_attempt < attempts:
                i = next_attempt
                next_attempt += 1
                response = await client.post(
                    f"{serving.routers[i % 2]}/v1/chat/completions", headers=headers,
                    json=body(max_tokens=1))
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 200:
                    per_replica[i % 2] += 1

        await asyncio.gather(*(sender() for _ in range(parallel)))
        elapsed = time.monotonic() - start
    admitted = statuses.get(200, 0)
    error = abs(admitted - 200) / 200
    return {"limit_rpm": 200, "attempts": attempts, "elapsed_s": round(elapsed, 2),
            "admitted": admitted, "admitted_per_replica": per_replica,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "relative_error": round(error, 4), "target_relative_error": TARGET_RPM_ERROR,
            "meets_target": elapsed < 60 and error <= TARGET_RPM_ERROR}


async def enterprise_ttft(serving: Serving, flood_tenants: int, samples: int,
                          flood_tokens: int, gap_s: float, max_num_seqs: int) -> dict[str, Any]:
    import random

    import httpx

    rng = random.Random(0)
    async with httpx.AsyncClient(timeout=120) as client:

        async def ttft(key: str) -> tuple[float, float]:
            """(when it was sent, epoch seconds; its time to first token)."""
            await asyncio.sleep(rng.uniform(0, gap_s))
            sent, t0 = time.time(), time.perf_counter()
            async with client.stream(
                    "POST", f"{serving.routers[0]}/v1/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json=body(max_tokens=8, stream=True)) as response:
                assert response.status_code == 200, await response.aread()
                lines = response.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):
                        first = time.perf_counter() - t0
                        break
                async for _ in lines:
                    pass
            return sent, first

        # A tenant per phase: each phase's requests stay inside one plan's 200 RPM.
        unloaded_key = await serving.tenant(client, "enterprise")
        for _ in range(3):
            await ttft(unloaded_key)  # warm
        phases = {"unloaded": (time.time(), 0.0)}
        unloaded = [(await ttft(unloaded_key))[1] for _ in range(samples)]
        phases["unloaded"] = (phases["unloaded"][0], time.time())

        loaded_key = await serving.tenant(client, "enterprise")
        standard_keys = [await serving.tenant(client, "standard") for _ in range(flood_tenants)]
        # The flood's clients run in a process of their own, as other tenants' would: their
        # SSE reading must not delay this client's event loop (what the ratio measures).
        flood = await asyncio.to_thread(serving.start_flood, standard_keys, flood_tokens)
        await asyncio.sleep(2.0)  # the flood reaches its steady state
        loaded_start = time.time()
        probes = [await ttft(loaded_key) for _ in range(samples)]
        phases["flooded"] = (loaded_start, time.time())
        flood_report = await asyncio.to_thread(serving.stop_flood, flood)
    loaded = [first for _, first in probes]
    # Flood streams (admitted ones) in flight as each loaded probe was sent.
    in_flight = sorted(sum(1 for start, end in flood_report["streams"] if start <= sent < end)
                       for sent, _ in probes)
    un, lo = statistics.median(unloaded), statistics.median(loaded)
    return {"samples": samples, "flood_streams": 3 * flood_tenants,
            "flood_tokens_per_request": flood_tokens, "probe_gap_ms": gap_s * 1000,
            "worker_max_num_seqs": max_num_seqs,
            "unloaded_ttft": percentiles(unloaded), "loaded_ttft": percentiles(loaded),
            "ratio_p50": round(lo / un, 3), "target_ratio": TARGET_TTFT_RATIO,
            "flood_in_flight_at_probe": {"min": in_flight[0],
                                         "p50": in_flight[len(in_flight) // 2],
                                         "max": in_flight[-1]},
            "flood_saturated_batch": in_flight[0] >= max_num_seqs,
            "meets_target": lo / un <= TARGET_TTFT_RATIO and in_flight[0] >= max_num_seqs,
            "flood_statuses": flood_report["statuses"], "phases": phases}


async def flood(routers: list[str], keys: list[str], tokens: int, until: Any
                ) -> dict[str, Any]:
    """Each standard key keeps its 3 allowed streams busy (``tokens`` tokens, EOS ignored),
    spread over the routers, backing off as Retry-After says (at most 0.5 s) when refused,
    until ``until`` is done. Returns the count of each HTTP status seen and the (start, end)
    epoch times of every admitted stream."""
    import httpx

    status: dict[str, int] = {}
    streams: list[tuple[float, float]] = []
    stop = asyncio.ensure_future(until)

    async def stream(client: httpx.AsyncClient, key: str, router: str) -> None:
        while not stop.done():
            start = time.time()
            async with client.stream(
                    "POST", f"{router}/v1/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json=body(max_tokens=tokens, ignore_eos=True, stream=True)) as response:
                code = str(response.status_code)
                status[code] = status.get(code, 0) + 1
                async for _ in response.aiter_raw():  # the load, not its parsing
                    pass
                if response.status_code == 200:
                    streams.append((start, time.time()))
                else:
                    retry = float(response.headers.get("retry-after", "1"))
                    await asyncio.wait([stop], timeout=min(retry, 0.5))

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(stream(client, key, routers[(i + j) % len(routers)])
                               for i, key in enumerate(keys) for j in range(3)))
    return {"statuses": dict(sorted(status.items())), "streams": streams}


def record_worker(engine: Any) -> dict[str, list[list[float]]]:
    """Where a prioritised request's time to first token goes inside the worker: for each
    request above priority 0, its arrival, the start of the step that first computed its
    prompt, the end of the step that finished it and its first token (epoch seconds, from
    the engine's own timeline); and the end time and length of every engine step."""
    report: dict[str, list[list[float]]] = {"requests": [], "steps": []}
    generate = engine.generate

    async def recorded(request_id, prompt_token_ids, sampling, priority=0, cache_salt=""):
        async for out in generate(request_id, prompt_token_ids, sampling, priority,
                                  cache_salt):
            timeline = out.timeline
            if out.finished and priority > 0 and timeline is not None \
                    and timeline.scheduled_ns is not None and timeline.first_token_ns:
                report["requests"].append([
                    timeline.arrival_ns / 1e9, timeline.scheduled_ns / 1e9,
                    timeline.prefill_chunks[-1][1] / 1e9, timeline.first_token_ns / 1e9])
            yield out

    engine.generate = recorded  # the servicer calls the engine through this attribute
    engine.step_observer = lambda seconds: report["steps"].append([time.time(), seconds])
    return report


def worker_breakdown(report: dict[str, list[list[float]]],
                     phases: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Medians (ms) per phase: waiting for the step in flight, the request's own prompt
    step(s), arrival to first token in the worker; and the engine's step length."""
    out: dict[str, Any] = {}
    for phase, (start, end) in phases.items():
        rows = [r for r in report["requests"] if start <= r[0] < end]
        steps = [seconds for at, seconds in report["steps"] if start <= at < end]
        if not rows or not steps:
            continue
        out[phase] = {
            "requests": len(rows),
            "wait_for_step_ms": round(statistics.median(r[1] - r[0] for r in rows) * 1e3, 2),
            "own_prompt_step_ms": round(statistics.median(r[2] - r[1] for r in rows) * 1e3, 2),
            "worker_ttft_ms": round(statistics.median(r[3] - r[0] for r in rows) * 1e3, 2),
            "engine_step_ms": round(statistics.median(steps) * 1e3, 2)}
    return out


async def serve_child(role: str, argv: list[str]) -> None:
    """A serving process: prints ``PORT n``, serves until its stdin closes."""
    from core.config import EngineConfig, load_config
    from core.endpoints import StaticWorkerSource, WorkerEndpoint

    loop = asyncio.get_running_loop()
    if role == "flood":
        routers, keys, tokens = json.loads(argv[0]), json.loads(argv[1]), int(argv[2])
        print("PORT 0", flush=True)
        print(json.dumps(await flood(routers, keys, tokens,
                                     loop.run_in_executor(None, sys.stdin.read))), flush=True)
        return
    if role == "worker":
        from workers.engine.async_engine import AsyncEngine
        from workers.grpc_service import serve_worker

        tiny, max_num_seqs = argv
        engine = AsyncEngine(EngineConfig(
            model=tiny, dtype="float32", kv_cache_bytes=64 * 2**20, max_model_len=1024,
            max_num_seqs=int(max_num_seqs), torch_threads=1), worker_id="w0", model_id=MODEL)
        report = record_worker(engine)
        server, port = await serve_worker(engine, "127.0.0.1", 0, model_id=MODEL)
        print(f"PORT {port}", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        await server.stop(1)
        engine.shutdown()
        print(json.dumps(report), flush=True)
        return
    from router.api.app import create_app
    from tests.support.serving import serve_router, stop_router

    worker_port, overrides = argv
    endpoint = WorkerEndpoint("w0", f"127.0.0.1:{worker_port}", MODEL, "default")
    app = create_app(load_config(env={}, overrides=json.loads(overrides)),
                     StaticWorkerSource([endpoint]))
    router = await serve_router(app)
    print(f"PORT {router.base.rsplit(':', 1)[1]}", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    await stop_router(router)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"limiter_check": await limiter_latency(args.redis_url,
                                                                     args.checks)}
    if not args.skip_serving:
        async with Serving(args.redis_url, args.database_url, args.max_num_seqs,
                           args.hidden) as serving:
            result["two_replicas_shared_rpm"] = await shared_rpm(serving)
            result["enterprise_ttft_under_standard_flood"] = ttft = await enterprise_ttft(
                serving, args.flood_tenants, args.samples, args.flood_tokens,
                args.probe_gap_ms / 1000, args.max_num_seqs)
        ttft["worker_breakdown"] = worker_breakdown(serving.worker_report, ttft.pop("phases"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "limits.json"))
    parser.add_argument("--checks", type=int, default=3000)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL",
                                                              "redis://127.0.0.1:6379/0"))
    parser.add_argument("--database-url", default=os.environ.get(
        "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--flood-tenants", type=int, default=12)
    parser.add_argument("--flood-tokens", type=int, default=256,
                        help="tokens per flood request: long enough that 10 requests a "
                             "minute per standard tenant keep the batch full")
    parser.add_argument("--samples", type=int, default=80,
                        help="enterprise TTFT samples per phase (at most 190: 200 RPM)")
    parser.add_argument("--probe-gap-ms", type=float, default=25.0,
                        help="each probe waits uniform(0, this) first: about two engine steps")
    parser.add_argument("--max-num-seqs", type=int, default=8,
                        help="the worker's batch: a flood fills it and queues")
    parser.add_argument("--hidden", type=int, default=256,
                        help="hidden size of the random Llama (4 layers)")
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    import uvloop

    if args.serve:
        logging.basicConfig(level=logging.ERROR)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve_child(args.serve[0], args.serve[1:]))
        return
    load_before = os.getloadavg()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(main_async(args))
    result["machine"] = {"load_average_before": [round(x, 2) for x in load_before],
                         "load_average_after": [round(x, 2) for x in os.getloadavg()],
                         "cpus": os.cpu_count(), "python": platform.python_version(),
                         "platform": platform.platform()}
    result["command"] = shlex.join([os.path.relpath(sys.executable, ROOT)
                                    if sys.executable.startswith(str(ROOT)) else sys.executable,
                                    *sys.argv])
    result["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
