"""Chaos benchmark: the faults of a bad day, one at a time, against a real deployment.

    python bench/chaos.py                       # every scenario (about 10 minutes on 2 cores)
    python bench/chaos.py --only worker_kill,redis_restart

Starts `electron-serve up --workers 2` on the embedded SmolLM2 (float32, ``--max-num-seqs``
sequences per worker) with an admin key, a temporary SQLite ledger and a throwaway Redis
(``redis-server`` on a free port, no persistence: a restart starts it empty), connects to its
Ray cluster as a driver (for worker pids, load and the engine-thread fault), and runs:

- **overload**: ``--overload-x`` times the sequences the two workers run at once, all streamed
  at once from enterprise tenants: admitted vs shed (429/503 with ``Retry-After``), the TTFT of
  the admitted, no other 5xx, the router's RSS before and after;
- **dropped**: 20 streams dropped by their client after the first chunk: the workers' running
  and waiting counts are 0 within 2 s;
- **unread**: 5 streams whose client never reads (a 4 KiB receive buffer) for 60 s while
  others stream: the others finish, the router ends each unread stream after
  ``router.client_write_timeout_s`` (set to 10 s here) and RSS stays bounded;
- **slowloris**: 50 connections sending a request head one byte a second: normal requests are
  served meanwhile, and the router closes each slow connection after
  ``router.request_read_timeout_s``;
- **worker_kill**: a worker's process SIGKILLed while 6 greedy streams run: every stream ends
  within 30 s (finished, or an error event), a finished text equals the same prompt's
  reference text and a cut one is a prefix of it (nothing duplicated by a retry), new requests
  succeed within 5 s, each request has at most one ledger row, and the fleet's replacement
  serves (how long it took);
- **engine_kill**: the same with the worker's engine thread failing (its step raises) instead
  of its process dying;
- **redis_restart**: Redis SIGKILLed and restarted empty under steady traffic, a revoked key
  tried after it: no 500, the revoked key stays refused, every 200 has its ledger row;
- **postgres_stop**: a second deployment whose ledger and tenants live in a throwaway
  PostgreSQL (``initdb`` + ``pg_ctl`` on a free port), stopped for 5 s under steady traffic
  and started again: no 500, and after it every answered request has its ledger row;
- **crash**: a third deployment SIGKILLed (its whole process group, Ray included) a moment
  after three requests were answered and while a fourth streams, then started again on the
  same ledger: the three answered requests have their rows, and the open stream its
  provisional ``interrupted`` row when a flush ran while it was open (docs/
  operations-notes.md: no row is lost on a crash between flushes).

Written to ``bench/results/chaos.json`` (``--out``) with the machine and a ``targets`` table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from bench.served import MODEL, Run, Served, machine, served  # noqa: E402
from tests.support.tenancy import (  # noqa: E402
    ThrowawayPostgres,
    ThrowawayRedis,
    throwaway_postgres,
    throwaway_redis,
)

SCENARIOS = ("overload", "dropped", "unread", "slowloris", "worker_kill", "engine_kill",
             "redis_restart", "postgres_stop", "crash")
PROMPTS = ["Count from one to twenty in words.", "Name the planets of the solar system.",
           "What is the capital of France?", "List five colours of the rainbow.",
           "Describe a cat in two sentences.", "Write the days of the week."]


def chat(prompt: str, max_tokens: int, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "stream": stream, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}], **extra}


class Stream:
    """One streamed request as a client sees it."""

    def __init__(self) -> None:
        self.status = 0
        self.text = ""
        self.finish: str | None = None
        self.error: str | None = None
        self.request_id = "chaos-" + uuid.uuid4().hex[:12]
        self.started = time.monotonic()
        self.first_at: float | None = None
        self.ended_at: float | None = None
        self.first = asyncio.Event()
        self.retry_after: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.started

    def row(self) -> dict[str, Any]:
        return {"status": self.status, "finish": self.finish, "error": self.error,
                "chars": len(self.text)}


async def stream(run: Run, key: str, body: dict[str, Any], out: Stream | None = None,
                 drop_after_first: bool = False) -> Stream:
    s = out or Stream()
    headers = {"Authorization": f"Bearer {key}", "X-Request-Id": s.request_id}
    try:
        async with run.http.stream("POST", f"{run.base}/chat/completions", json=body,
                                   headers=headers) as r:
            s.status = r.status_code
            if r.status_code != 200:
                s.error = (await r.aread()).decode(errors="replace")[:300]
                with contextlib.suppress(TypeError, ValueError):
                    s.retry_after = float(r.headers.get("retry-after"))
                return s
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    s.error = event["error"].get("code") or event["error"].get("message")
                    continue
                for choice in event.get("choices", []):
                    s.text += choice.get("delta", {}).get("content") or ""
                    s.finish = choice.get("finish_reason") or s.finish
                if s.first_at is None and event.get("choices"):
                    s.first_at = time.monotonic()
                    s.first.set()
                    if drop_after_first:
                        return s
    except httpx.HTTPError as exc:
        s.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        s.ended_at = time.monotonic()
        s.first.set()
    return s


def rss_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


class Cluster:
    """The deployment's Ray cluster, joined as a driver: its workers, their load, faults."""

    def __init__(self, up: Served, namespace: str = "electron"):
        import ray  # noqa: PLC0415 (only this bench's fault scenarios need Ray)

        self.ray = ray
        gcs = _gcs_address(up.proc.pid)
        ray.init(address=gcs, namespace=namespace, log_to_driver=False,
                 logging_level="ERROR")
        self.namespace = namespace

    def close(self) -> None:
        """Leaves the cluster (before `up` stops it: a driver whose GCS is gone exits)."""
        self.ray.shutdown()

    async def workers(self) -> dict[str, dict[str, Any]]:
        """Worker id -> its actor's info (and handle), for the workers in the registry."""
        from core.config import ClusterConfig  # noqa: PLC0415
        from workers.actor import find_worker_actors, lookup_registry  # noqa: PLC0415

        registry = lookup_registry(self.namespace)
        listed, _ = await asyncio.wait_for(registry.list.remote(), 5)
        handles = find_worker_actors(ClusterConfig(namespace=self.namespace))
        out = {}
        for endpoint in listed:
            if (actor := handles.get(endpoint.worker_id)) is not None:
                with contextlib.suppress(Exception):
                    out[endpoint.worker_id] = {
                        **await asyncio.wait_for(actor.info.remote(), 5), "actor": actor}
        return out

    async def busy(self) -> int:
        return sum(w["running"] + w["waiting"] for w in (await self.workers()).values())

    async def replaced(self, victim_address: str, count: int, within_s: float) -> float | None:
        """Seconds until ``count`` workers serve again, none at ``victim_address``."""
        started = time.monotonic()
        while time.monotonic() - started < within_s:
            with contextlib.suppress(Exception):
                ws = await self.workers()
                if len(ws) == count and all(w["address"] != victim_address and
                                            not w["engine_failure"] for w in ws.values()):
                    return round(time.monotonic() - started, 2)
            await asyncio.sleep(0.5)
        return None


def _gcs_address(root_pid: int) -> str:
    """The GCS address of the Ray cluster that `up` (process ``root_pid``, a session leader)
    started: its gcs_server writes the port it bound into the session directory."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.getsid(int(proc.name)) != root_pid:
                continue
            args = dict(a.split("=", 1) for a in (proc / "cmdline").read_bytes().decode()
                        .split("\0")[1:] if a.startswith("--") and "=" in a)
            if "--session-dir" in args and "--gcs_server_port" in args:
                node = args["--node-id"]
                port_file = Path(args["--session-dir"]) / f"gcs_server_port_{node}"
                deadline = time.monotonic() + 30
                while not port_file.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                return f"{args['--node-ip-address']}:{int(port_file.read_text())}"
    raise RuntimeError("no gcs_server process in the deployment's session")


def _break_engine(actor: Any) -> None:  # runs inside the worker process
    def broken_step() -> None:
        raise RuntimeError("chaos: engine thread fault")

    actor._engine.engine.run_step = broken_step


# -- scenarios -----------------------------------------------------------------------------------

async def overload(run: Run, up: Served, args: argparse.Namespace) -> dict[str, Any]:
    n = args.overload_x * 2 * args.max_num_seqs
    keys = [await run.tenant(f"load-{uuid.uuid4().hex[:6]}") for _ in range(-(-n // 20))]
    rss_before = rss_mib(up.proc.pid)
    started = time.monotonic()
    streams = await asyncio.gather(*(stream(run, keys[i % len(keys)],
                                            chat(PROMPTS[i % len(PROMPTS)], 16))
                                     for i in range(n)))
    statuses = Counter(s.status for s in streams)
    admitted = [s for s in streams if s.status == 200]
    ttfts = sorted(s.ttft_s for s in admitted if s.ttft_s is not None)
    other_5xx = [s.row() for s in streams if s.status >= 500 and s.status != 503]
    return {"concurrent": n, "seconds": round(time.monotonic() - started, 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "admitted": len(admitted), "shed": statuses[429] + statuses[503],
            "admitted_errors": sum(1 for s in admitted if s.error),
            "ttft_admitted_s": _dist(ttfts), "other_5xx": other_5xx[:5],
            "router_rss_mib": {"before": rss_before, "after": rss_mib(up.proc.pid)},
            "ok": not other_5xx and statuses[429] + statuses[503] + len(admitted) == n}


async def dropped(run: Run, cluster: Cluster, key: str) -> dict[str, Any]:
    streams = await asyncio.gather(*(stream(run, key, chat(PROMPTS[i % 6], 200),
                                            drop_after_first=True) for i in range(20)))
    dropped_at = time.monotonic()
    idle_after = None
    while time.monotonic() - dropped_at < 10:
        if await cluster.busy() == 0:
            idle_after = round(time.monotonic() - dropped_at, 2)
            break
        await asyncio.sleep(0.1)
    return {"streams": len(streams), "got_first_chunk": sum(s.first_at is not None
                                                            for s in streams),
            "workers_idle_after_s": idle_after,
            "ok": idle_after is not None and idle_after <= 2.0}


def _raw_request(port: int, key: str, body: dict[str, Any], rcvbuf: int = 4096) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def _drain(sock: socket.socket, within_s: float) -> tuple[bool, int, bool]:
    """Reads what is there: (the server closed it, bytes read, an error event among them)."""
    sock.settimeout(within_s)
    got, seen = 0, b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(1 << 16):
            got += len(chunk)
            seen = (seen + chunk)[-4096:]
            if b'"error"' in seen:
                break
        else:
            return True, got, b'"error"' in seen
    return False, got, b'"error"' in seen


async def unread(run: Run, up: Served, cluster: Cluster, key: str,
                 args: argparse.Namespace) -> dict[str, Any]:
    port = int(up.root.rsplit(":", 1)[1])
    rss = [rss_mib(up.proc.pid)]
    socks = [_raw_request(port, key, chat(PROMPTS[i], 1500)) for i in range(5)]
    others: list[Stream] = []
    deadline = time.monotonic() + args.unread_s
    while time.monotonic() < deadline:
        others += await asyncio.gather(*(stream(run, key, chat(PROMPTS[i], 32))
                                         for i in range(2)))
        rss.append(rss_mib(up.proc.pid))
    busy = await cluster.busy()
    ended = [await asyncio.to_thread(_drain, s, 5.0) for s in socks]
    for s in socks:
        s.close()
    ok_others = sum(s.status == 200 and s.finish is not None and not s.error for s in others)
    return {"unread_streams": len(socks), "seconds": args.unread_s,
            "closed_by_router": sum(c for c, _, _ in ended),
            "bytes_buffered_per_stream": [b for _, b, _ in ended],
            "workers_busy_at_end": busy, "others_sent": len(others), "others_ok": ok_others,
            "others_ttft_s": _dist(sorted(s.ttft_s for s in others if s.ttft_s is not None)),
            "router_rss_mib": {"min": min(filter(None, rss)), "max": max(filter(None, rss))},
            "ok": ok_others == len(others) and all(c for c, _, _ in ended)}


async def slowloris(run: Run, up: Served, key: str, args: argparse.Namespace) -> dict[str, Any]:
    port = int(up.root.rsplit(":", 1)[1])
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    socks = []
    for _ in range(50):
        s = socket.socket()
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
    closed_at: dict[int, float] = {}
    normal: list[Stream] = []
    started = time.monotonic()

    async def drip() -> None:
        for i in range(len(head)):
            if time.monotonic() - started > args.slowloris_s:
                return
            for n, s in enumerate(socks):
                if n in closed_at:
                    continue
                try:
                    s.send(head[i:i + 1])
                    with contextlib.suppress(BlockingIOError):
                        if s.recv(4096) == b"":
                            closed_at[n] = time.monotonic() - started
                except OSError:
                    closed_at[n] = time.monotonic() - started
            await asyncio.sleep(1.0)

    dripper = asyncio.create_task(drip())
    while time.monotonic() - started < args.slowloris_s:
        normal += await asyncio.gather(*(stream(run, key, chat(PROMPTS[i], 16))
                                         for i in range(2)))
    await dripper
    for s in socks:
        s.close()
    ok = sum(s.status == 200 and s.finish is not None and not s.error for s in normal)
    return {"slow_connections": len(socks), "seconds": args.slowloris_s,
            "closed_by_router": len(closed_at),
            "closed_after_s": _dist(sorted(closed_at.values())),
            "normal_sent": len(normal), "normal_ok": ok,
            "normal_ttft_s": _dist(sorted(s.ttft_s for s in normal if s.ttft_s is not None)),
            "ok": ok == len(normal) and len(closed_at) == len(socks)}


async def references(run: Run, key: str, max_tokens: int) -> dict[str, str]:
    """Each prompt's greedy text, before any fault."""
    done = await asyncio.gather(*(stream(run, key, chat(p, max_tokens)) for p in PROMPTS))
    return {p: s.text for p, s in zip(PROMPTS, done, strict=True)}


async def worker_fault(run: Run, cluster: Cluster, tenant: str, key: str, refs: dict[str, str],
                       args: argparse.Namespace, how: str) -> dict[str, Any]:
    """A worker fails (``how``: its process is SIGKILLed, or its engine thread fails) while
    greedy streams run on both workers."""
    before = await cluster.workers()
    since = time.time()
    streams = [Stream() for _ in PROMPTS]
    tasks = [asyncio.create_task(stream(run, key, chat(p, args.fault_tokens), s))
             for p, s in zip(PROMPTS, streams, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(s.first.wait() for s in streams)), 120)
    ws = await cluster.workers()
    victim_id, victim = max(ws.items(), key=lambda kv: kv[1]["running"])
    if how == "sigkill":
        os.kill(victim["pid"], signal.SIGKILL)
    else:
        await victim["actor"].__ray_call__.remote(_break_engine)
    fault_at = time.monotonic()
    probes: list[tuple[float, int]] = []

    async def probe() -> None:
        while time.monotonic() - fault_at < 15:
            s = await stream(run, key, chat("Say hi.", 4))
            probes.append((round(time.monotonic() - fault_at, 2),
                           s.status if not s.error else -1))
            await asyncio.sleep(0.25)

    prober = asyncio.create_task(probe())
    done, _ = await asyncio.wait(tasks, timeout=30)
    hung = len(tasks) - len(done)
    replaced_s = await cluster.replaced(victim["address"], len(before), args.replace_within_s)
    await prober
    for t in tasks:
        t.cancel()
    first_ok = next((t for t, status in probes if status == 200), None)
    failed_after_ok = [p for p in probes if first_ok is not None and p[0] > first_ok
                       and p[1] != 200]
    dup = []
    for p, s in zip(PROMPTS, streams, strict=True):
        good = s.text == refs[p] if s.finish and not s.error else refs[p].startswith(s.text)
        if not good:
            dup.append({"prompt": p, "text": s.text[:200], "reference": refs[p][:200]})
    await asyncio.sleep(args.settle_s)
    rows = await run.usage_rows(tenant, start=since - 1)
    per_id = Counter(r.get("client_request_id") for r in rows)
    ours = [s.request_id for s in streams]
    return {"fault": how, "victim_running": victim["running"],
            "streams": [s.row() for s in streams],
            "ended_within_30s": len(tasks) - hung, "hung": hung,
            "stream_end_after_fault_s": _dist(sorted(s.ended_at - fault_at for s in streams
                                                     if s.ended_at)),
            "new_request_first_ok_after_s": first_ok, "new_request_failures_after_first_ok":
            failed_after_ok, "text_mismatches": dup,
            "ledger_rows_per_stream": [per_id[r] for r in ours],
            "replaced_after_s": replaced_s,
            "ok": (hung == 0 and first_ok is not None and first_ok <= 5.0 and not dup
                   and all(per_id[r] <= 1 for r in ours) and replaced_s is not None)}


async def outage(run: Run, key: str, stop: Any, start: Any,
                 down_s: float) -> tuple[list[Stream], float]:
    """4 clients sending short streamed requests back to back for 15 s while a dependency
    goes down 3 s in (``stop()``) and comes back ``down_s`` later (``start()``; both blocking,
    run on a thread). A refused client waits what ``Retry-After`` says (at most 1 s), as the
    OpenAI SDKs do. Returns the requests and when the dependency was back."""
    out: list[Stream] = []
    until = time.monotonic() + 15

    async def client(i: int) -> None:
        while time.monotonic() < until:
            out.append(s := await stream(run, key, chat(PROMPTS[i], 8)))
            if s.status in (429, 503):
                await asyncio.sleep(min(s.retry_after or 1.0, 1.0))

    async def fault() -> float:
        await asyncio.sleep(3)
        await asyncio.to_thread(stop)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(start)
        return time.monotonic()

    back, *_ = await asyncio.gather(fault(), *(client(i) for i in range(4)))
    return out, back


def _recovery(streams: list[Stream], restarted_at: float) -> dict[str, Any]:
    """How long after the dependency came back requests were still refused."""
    after = [s for s in streams if s.started >= restarted_at]
    refused = [s.started - restarted_at for s in after if s.status != 200]
    ok = [s.started - restarted_at for s in after if s.status == 200]
    return {"last_refused_after_restart_s": round(max(refused), 2) if refused else None,
            "first_ok_after_restart_s": round(min(ok), 2) if ok else None}


def _summary(streams: list[Stream]) -> dict[str, Any]:
    return {"sent": len(streams),
            "statuses": {str(k): v for k, v in sorted(Counter(s.status for s in
                                                                streams).items())},
            "stream_errors": dict(Counter(s.error for s in streams
                                          if s.status == 200 and s.error))}


async def redis_restart(run: Run, redis: ThrowawayRedis, tenant: str, key: str,
                        args: argparse.Namespace) -> dict[str, Any]:
    since = time.time()
    revoked_id, revoked = await run.new_key(tenant)
    r = await run.http.post(f"{run.base}/admin/keys/{revoked_id}/revoke", headers=run.admin)
    revoked_before = (await run.send(revoked, chat("Say hi.", 4, stream=False)))[0]

    streams, restarted_at = await outage(run, key, redis.kill, redis.start, down_s=3)
    await asyncio.sleep(2)
    revoked_after = (await run.send(revoked, chat("Say hi.", 4, stream=False)))[0]
    await asyncio.sleep(args.settle_s)
    rows = await run.usage_rows(tenant, start=since - 1)
    ids = {row.get("client_request_id") for row in rows}
    answered = [s for s in streams if s.status == 200]
    missing = sum(s.request_id not in ids for s in answered)
    non_503 = [s.row() for s in streams if s.status >= 500 and s.status != 503]
    return {**_summary(streams), "redis_down_s": 3, **_recovery(streams, restarted_at),
            "revoke_status": r.status_code,
            "revoked_key_before_restart": revoked_before,
            "revoked_key_after_restart": revoked_after, "answered": len(answered),
            "answered_without_ledger_row": missing, "server_errors": non_503[:5],
            "ok": not non_503 and revoked_after == 401 and missing == 0}


async def postgres_stop(run: Run, pg: ThrowawayPostgres, tenant: str, key: str,
                        args: argparse.Namespace) -> dict[str, Any]:
    since = time.time()

    streams, restarted_at = await outage(run, key, pg.stop, pg.start, down_s=5)
    await asyncio.sleep(args.settle_s + 5)  # the spool replays once the database is back
    rows = await run.usage_rows(tenant, start=since - 1)
    ids = Counter(row.get("client_request_id") for row in rows)
    answered = [s for s in streams if s.status == 200]
    missing = sum(ids[s.request_id] == 0 for s in answered)
    twice = sum(ids[s.request_id] > 1 for s in streams)
    non_503 = [s.row() for s in streams if s.status >= 500 and s.status != 503]
    return {**_summary(streams), "postgres_down_s": 5, **_recovery(streams, restarted_at),
            "answered": len(answered),
            "answered_without_ledger_row": missing, "rows_billed_twice": twice,
            "server_errors": non_503[:5],
            "ok": not non_503 and missing == 0 and twice == 0}


# -- the run -------------------------------------------------------------------------------------

def _dist(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    pick = lambda q: round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)  # noqa: E731
    return {"n": len(xs), "p50": pick(0.5), "p99": pick(0.99), "max": round(xs[-1], 3)}


def deployment_env(args: argparse.Namespace) -> dict[str, str]:
    return {"ELECTRON_ENGINE__MAX_NUM_SEQS": str(args.max_num_seqs),
            "ELECTRON_ROUTER__CLIENT_WRITE_TIMEOUT_S": "10"}


async def main_deployment(args: argparse.Namespace, redis: ThrowawayRedis) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with served(redis_url=redis.url, workers=2, env=deployment_env(args),
                prefix="electron-chaos-") as up:
        run = Run(up.base, up.admin_key, max_connections=1024)
        cluster = Cluster(up)
        try:
            await scenarios(args, up, run, cluster, redis, out)
        finally:
            cluster.close()
            await run.http.aclose()
    return out


async def scenarios(args: argparse.Namespace, up: Served, run: Run, cluster: Cluster,
                    redis: ThrowawayRedis, out: dict[str, Any]) -> None:
    """Each wanted scenario of the main deployment, one after the other, into ``out``."""
    tenant = f"chaos-{uuid.uuid4().hex[:6]}"
    key = await run.tenant(tenant)
    wanted = [s for s in SCENARIOS if s in args.only and s not in ("postgres_stop", "crash")]
    refs = await references(run, key, args.fault_tokens) if {
        "worker_kill", "engine_kill"} & set(wanted) else {}
    for name in wanted:
        print(f"chaos: {name} ...", flush=True)
        started = time.monotonic()
        if name == "overload":
            result = await overload(run, up, args)
        elif name == "dropped":
            result = await dropped(run, cluster, key)
        elif name == "unread":
            result = await unread(run, up, cluster, key, args)
        elif name == "slowloris":
            result = await slowloris(run, up, key, args)
        elif name in ("worker_kill", "engine_kill"):
            result = await worker_fault(run, cluster, tenant, key, refs, args,
                                        "sigkill" if name == "worker_kill" else "engine")
        else:
            result = await redis_restart(run, redis, tenant, key, args)
        result["scenario_s"] = round(time.monotonic() - started, 1)
        print(f"chaos: {name}: ok={result['ok']}", flush=True)
        out[name] = result
        await asyncio.sleep(1)


async def postgres_deployment(args: argparse.Namespace, redis: ThrowawayRedis) -> dict[str, Any]:
    with throwaway_postgres() as pg, served(
            redis_url=redis.url, workers=1, prefix="electron-chaos-pg-",
            env={**deployment_env(args), "ELECTRON_TENANCY__DATABASE_URL": pg.url}) as up:
        run = Run(up.base, up.admin_key)
        tenant = f"chaos-pg-{uuid.uuid4().hex[:6]}"
        key = await run.tenant(tenant)
        print("chaos: postgres_stop ...", flush=True)
        result = await postgres_stop(run, pg, tenant, key, args)
        print(f"chaos: postgres_stop: ok={result['ok']}", flush=True)
        await run.http.aclose()
        return {"postgres_stop": result}


async def crash_deployment(args: argparse.Namespace) -> dict[str, Any]:
    """SIGKILL of `up` a moment after three answers, with a stream open; then a restart."""
    tmp = tempfile.mkdtemp(prefix="electron-chaos-crash-")
    tenant = f"chaos-crash-{uuid.uuid4().hex[:6]}"
    env = deployment_env(args)
    print("chaos: crash ...", flush=True)
    with served(workers=1, env=env, tmp=tmp) as up:
        run = Run(up.base, up.admin_key)
        key = await run.tenant(tenant)
        answered = [await stream(run, key, chat(p, 8)) for p in PROMPTS[:3]]
        open_stream = Stream()
        streaming = asyncio.create_task(stream(run, key, chat(PROMPTS[3], 400), open_stream))
        await asyncio.wait_for(open_stream.first.wait(), 60)
        await asyncio.sleep(1.0)  # a flush or two while it streams
        os.killpg(up.proc.pid, signal.SIGKILL)
        up.proc.wait()
        killed_at = time.time()
        await asyncio.wait_for(streaming, 30)
        await run.http.aclose()
    with served(workers=1, env=env, tmp=tmp) as up:  # the same ledger and spool directory
        run = Run(up.base, up.admin_key)
        await asyncio.sleep(args.settle_s)  # the spools left behind are replayed at start
        rows = {r.get("client_request_id"): r for r in await run.usage_rows(
            tenant, start=killed_at - 600)}
        await run.http.aclose()
    kept = [s.request_id in rows for s in answered]
    provisional = rows.get(open_stream.request_id)
    result = {"answered_before_kill": sum(s.status == 200 and s.finish is not None
                                          for s in answered),
              "answered_rows_after_restart": sum(kept),
              "open_stream_chars_before_kill": len(open_stream.text),
              "open_stream_row": None if provisional is None else {
                  k: provisional.get(k) for k in ("status", "prompt_tokens",
                                                  "completion_tokens")},
              "rows": len(rows),
              "ok": all(kept) and len(rows) <= 4}
    print(f"chaos: crash: ok={result['ok']}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"crash": result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(SCENARIOS),
                   help=f"comma-separated scenarios of: {', '.join(SCENARIOS)}")
    p.add_argument("--max-num-seqs", type=int, default=8, help="sequences per worker")
    p.add_argument("--overload-x", type=int, default=10)
    p.add_argument("--unread-s", type=float, default=60.0)
    p.add_argument("--slowloris-s", type=float, default=20.0)
    p.add_argument("--fault-tokens", type=int, default=64)
    p.add_argument("--replace-within-s", type=float, default=120.0)
    p.add_argument("--settle-s", type=float, default=3.0, help="for the ledger to flush")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/chaos.json")
    args = p.parse_args()
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := set(args.only) - set(SCENARIOS):
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    started = dt.datetime.now(dt.timezone.utc)
    with throwaway_redis() as redis:
        results = asyncio.run(main_deployment(args, redis)) if set(args.only) - {
            "postgres_stop", "crash"} else {}
        if "postgres_stop" in args.only:
            results.update(asyncio.run(postgres_deployment(args, redis)))
    if "crash" in args.only:
        results.update(asyncio.run(crash_deployment(args)))
    out = {"bench": "chaos", "command": "python " + shlex.join(sys.argv),
           "started_at": started.isoformat(timespec="seconds"), "machine": machine(),
           "scenarios": results,
           "targets": {name: r["ok"] for name, r in results.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["targets"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
