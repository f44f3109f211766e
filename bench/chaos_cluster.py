"""Cluster chaos benchmark: what multi-node clusters do to a serving fleet, under traffic.

    python bench/chaos_cluster.py            # about 3 minutes on 2 cores

A Ray cluster of three nodes on this machine, each its own raylet (tests/support/
multi_node.py): the head (no CPU; the registry) and worker nodes "a" (2 CPUs) and "b"
(2 CPUs). On it, as an operator runs them: a controller (`electron-serve worker --workers 2
--fleet chaos --keep-workers`) and two routers (`electron-serve router`, each its own port, as
two router pods behind a Service), the tiny random-weight Llama as the model, limits in the
local Redis and the ledger in a PostgreSQL database of its own. A client sends ``--rate``
streamed requests a second (``--max-tokens`` tokens each, 256: a stream lasts a second or
two) to the routers in turn, skipping a router whose ``/ready`` fails (as a Service does) and
retrying a request once on the other router when its connection is refused. One at a time,
with traffic settling between them:

- **node_lost**: the worker node whose worker runs the most streams SIGKILLed (raylet and
  worker processes), as a machine lost; its worker is replaced on the other node;
- **node_added**: a node "c" joins;
- **registry_killed**: the registry actor killed (Ray restarts it);
- **controller_restarted**: the controller SIGKILLed, a new one started 3 s later (it adopts
  the fleet's detached workers);
- **router_restarted**: one router SIGTERMed with streams open (it drains them), then started
  again.

For each event: requests sent in its window and how they ended (``failed``: never given a
200, ``cut``: an error event after a 200), the seconds until routing settled (both routers see
two serving workers), and at the end ledger rows against requests (each request answered 200
has exactly one row; no request has two) and slots leaked (the tenant then opens its whole
concurrency at once: each 429 is a leaked slot). Target: 0 failed and 0 cut except streams
cut by the node loss itself. Written to ``bench/results/chaos_cluster.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import shlex
import signal
import subprocess
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

from bench.served import MODEL, free_port, machine  # noqa: E402

EVENTS = ("node_lost", "node_added", "registry_killed", "controller_restarted",
          "router_restarted")
CONCURRENCY = 64  # the tenant's plan: requests in flight (the traffic holds ~15)
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


class Sent:
    def __init__(self, at: float) -> None:
        self.at = at
        self.request_id = "cc-" + uuid.uuid4().hex[:16]
        self.status = 0  # 0: no router answered
        self.first = False
        self.finish: str | None = None
        self.error: str | None = None
        self.router: int | None = None
        self.ended: float | None = None

    @property
    def outcome(self) -> str:
        if self.status == 200 and self.finish and not self.error:
            return "ok"
        if self.status == 200 and self.first:
            return "cut"
        return "failed"


class Routers:
    """The router processes (``electron-serve router``), as pods behind a Service."""

    def __init__(self, config_path: Path, address: str, tmp: Path, count: int = 2):
        self.config_path, self.address, self.tmp = config_path, address, tmp
        self.ports = [free_port() for _ in range(count)]
        self.procs: list[subprocess.Popen | None] = [None] * count
        self.ready = [False] * count

    def start(self, i: int) -> None:
        log = open(self.tmp / f"router{i}.log", "a")
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "router", "--config", str(self.config_path),
             "--ray-address", self.address, "--port", str(self.ports[i])],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env=_env(ELECTRON_TENANCY__SPOOL_PATH=str(self.tmp / f"spool{i}.jsonl")))

    def base(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    async def watch(self, http: httpx.AsyncClient, stop: asyncio.Event) -> None:
        """Readiness every 100 ms, as an endpoints controller sees it."""
        while not stop.is_set():
            for i in range(len(self.ports)):
                try:
                    r = await http.get(f"{self.base(i)}/ready?workers=1", timeout=1)
                    self.ready[i] = r.status_code == 200
                except httpx.HTTPError:
                    self.ready[i] = False
            await asyncio.sleep(0.1)

    async def settled(self, http: httpx.AsyncClient, workers: int) -> bool:
        for i in range(len(self.ports)):
            try:
                r = await http.get(f"{self.base(i)}/ready?workers={workers}", timeout=1)
                if r.status_code != 200 or r.json().get("workers") != workers:
                    return False
            except httpx.HTTPError:
                return False
        return True

    def stop(self, i: int, sig: int = signal.SIGTERM, wait_s: float = 60) -> None:
        proc = self.procs[i]
        if proc and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1",
                PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}".rstrip(":"), **extra)


class Client:
    def __init__(self, routers: Routers, key: str, max_tokens: int):
        self.routers, self.key, self.max_tokens = routers, key, max_tokens
        self.http = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256))
        self.sent: list[Sent] = []
        self._turn = 0

    def _order(self) -> list[int]:
        n = len(self.routers.ports)
        self._turn += 1
        order = [(self._turn + k) % n for k in range(n)]
        return [i for i in order if self.routers.ready[i]] or order

    async def one(self, s: Sent) -> None:
        body = {"model": MODEL, "stream": True, "max_tokens": self.max_tokens,
                "temperature": 0, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"Tell me about {s.request_id}."}]}
        headers = {"Authorization": f"Bearer {self.key}", "X-Request-Id": s.request_id}
        for i in self._order()[:2]:
            s.router = i
            try:
                async with self.http.stream("POST",
                                            f"{self.routers.base(i)}/v1/chat/completions",
                                            json=body, headers=headers) as r:
                    s.status = r.status_code
                    if r.status_code != 200:
                        s.error = (await r.aread()).decode(errors="replace")[:200]
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            s.error = event["error"].get("code") or "error"
                        for choice in event.get("choices", []):
                            s.first = True
                            s.finish = choice.get("finish_reason") or s.finish
                return
            except httpx.ConnectError:
                continue  # the pod is gone: the Service's next endpoint
            except httpx.HTTPError as exc:
                s.error = f"{type(exc).__name__}"
                return
            finally:
                s.ended = time.monotonic()

    async def traffic(self, rate: float, stop: asyncio.Event) -> None:
        tasks = []
        start = time.monotonic()
        n = 0
        while not stop.is_set():
            s = Sent(time.monotonic())
            self.sent.append(s)
            tasks.append(asyncio.create_task(self.one(s)))
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)


def _write_config(tmp: Path, args: argparse.Namespace, database_url: str) -> tuple[Path, str]:
    from core.config import AuthConfig, Config, PlanConfig, TenancyConfig
    from tests.support.tiny_model import make_tiny_llama_dir, tiny_cluster_config

    admin = "es-admin-" + secrets.token_hex(16)
    base = tiny_cluster_config(
        make_tiny_llama_dir(tmp / "tiny-llama"), workers=2, max_model_len=1024,
        fleet="chaos", keep_workers_on_exit=True, supervise_interval_s=0.5,
        restart_backoff_s=0.5, ready_file=str(tmp / "controller.ready"))
    engine = base.engine.model_copy(update={"max_num_seqs": 16})
    config = Config(engine=engine, cluster=base.cluster, auth=AuthConfig(admin_key=admin),
                    # Concurrency is the limit under test; the rate is not.
                    tenancy=TenancyConfig(plans={"chaos": PlanConfig(
                                              rpm=100_000, concurrency=CONCURRENCY,
                                              priority=100)},
                                          database_url=database_url, migrate_on_start=False,
                                          redis_url=args.redis_url,
                                          redis_prefix="cc-" + secrets.token_hex(4)))
    path = tmp / "config.json"
    path.write_text(json.dumps(config.model_dump(mode="json", exclude_none=True)))
    return path, admin


@contextlib.contextmanager
def database() -> Any:
    """A PostgreSQL database of its own on the local server, dropped afterwards."""
    import psycopg

    name = "chaos_" + uuid.uuid4().hex[:10]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def ledger_rows(url: str) -> Counter[str]:
    import psycopg

    with psycopg.connect(url) as conn:
        return Counter(dict(conn.execute(
            "SELECT client_request_id, count(*) FROM usage_ledger GROUP BY client_request_id"
        ).fetchall()))


async def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import ray

    from tests.support.multi_node import multi_node
    from workers.actor import lookup_registry

    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        db_url = stack.enter_context(database())
        config_path, admin = _write_config(tmp, args, db_url)
        namespace = json.loads(config_path.read_text())["cluster"]["namespace"]
        nodes = stack.enter_context(multi_node(tmp / "ray", namespace))
        # Room for two workers each: the replacement of a lost node's worker fits on the
        # other one (the fleet spreads them one per node).
        nodes.add_node("a", num_cpus=2)
        nodes.add_node("b", num_cpus=2)
        subprocess.run([sys.executable, "-m", "cluster.cli", "migrate", "--config",
                        str(config_path)], cwd=ROOT, env=_env(), check=True,
                       capture_output=True)
        controller_log = open(tmp / "controller.log", "a")
        ready_file = tmp / "controller.ready"

        def controller() -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, "-m", "cluster.cli", "worker", "--config", str(config_path),
                 "--ray-address", nodes.address], cwd=ROOT, stdout=controller_log,
                stderr=subprocess.STDOUT, env=_env())

        ctrl = controller()
        routers = Routers(config_path, nodes.address, tmp)
        for i in range(len(routers.ports)):
            routers.start(i)
        http = httpx.AsyncClient(timeout=10)
        try:
            started = time.monotonic()
            while not await routers.settled(http, 2):
                if time.monotonic() - started > args.start_timeout_s:
                    raise TimeoutError(f"the cluster did not come up; see {tmp}")
                await asyncio.sleep(0.5)
            r = await http.post(f"{routers.base(0)}/v1/admin/tenants",
                                headers={"Authorization": f"Bearer {admin}"},
                                json={"tenant_id": "chaos-cluster", "plan": "chaos"})
            r.raise_for_status()
            client = Client(routers, r.json()["key"], args.max_tokens)
            stop = asyncio.Event()
            watcher = asyncio.create_task(routers.watch(http, stop))
            traffic = asyncio.create_task(client.traffic(args.rate, stop))
            await asyncio.sleep(args.warmup_s)
            for name in [e for e in EVENTS if e in args.only]:
                print(f"chaos_cluster: {name} ...", flush=True)
                before, _ = await listing(namespace)
                t0 = time.monotonic()
                open_at = [s for s in client.sent if s.ended is None]
                if name == "node_lost":
                    lost_node = await busiest_node(nodes, config_path)
                    await asyncio.to_thread(nodes.lose, lost_node)
                elif name == "node_added":
                    # On this thread (Ray sets signal handlers); the client's pacing makes
                    # up the requests it could not send meanwhile.
                    nodes.add_node("c", num_cpus=1)
                elif name == "registry_killed":
                    ray.kill(lookup_registry(namespace), no_restart=False)
                elif name == "controller_restarted":
                    ctrl.kill()
                    ctrl.wait()
                    ready_file.unlink(missing_ok=True)
                    await asyncio.sleep(3)
                    ctrl = controller()
                else:
                    await asyncio.to_thread(routers.stop, 0)
                    routers.start(0)
                # Settled: the registry lists two workers and says that is all of them (a
                # restarted registry first says it is not), the lost node's worker is not
                # among them, and both routers route to two workers.
                settled_s, disturbed = None, name in ("node_added", "controller_restarted",
                                                      "router_restarted")
                while time.monotonic() - t0 < args.settle_timeout_s:
                    ids, complete = await listing(namespace)
                    disturbed = disturbed or not complete or ids != before
                    if (disturbed and complete and len(ids) == 2
                            and await routers.settled(http, 2)
                            and (name != "controller_restarted" or ready_file.exists())):
                        settled_s = round(time.monotonic() - t0, 2)
                        break
                    await asyncio.sleep(0.1)
                after, _ = await listing(namespace)
                results[name] = {"settled_s": settled_s,
                                 **({"node": lost_node} if name == "node_lost" else {}),
                                 "workers_replaced": sorted(before - after),
                                 "streams_open_at_event": len(open_at),
                                 "on_router_0": sum(s.router == 0 for s in open_at)}
                await asyncio.sleep(args.quiet_s)
                window = [s for s in client.sent if t0 - args.max_stream_s <= s.at
                          and s.at < time.monotonic() - args.max_stream_s]
                results[name]["window_s"] = round(time.monotonic() - t0, 1)
                results[name]["_window"] = window
                print(f"chaos_cluster: {name}: settled in {settled_s} s", flush=True)
            stop.set()
            await traffic
            await watcher
            for name, r in results.items():
                window = r.pop("_window")
                outcomes = Counter(s.outcome for s in window)
                r.update(requests=len(window), ok=outcomes["ok"], cut=outcomes["cut"],
                         failed=outcomes["failed"],
                         failures=[{"status": s.status, "error": s.error} for s in window
                                   if s.outcome != "ok"][:5])
            leaked = await slots_leaked(client)
        finally:
            for i in range(len(routers.ports)):
                await asyncio.to_thread(routers.stop, i)
            ctrl.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                ctrl.wait(30)
            subprocess.run([sys.executable, "-m", "cluster.cli", "down", "--config",
                            str(config_path), "--ray-address", nodes.address], cwd=ROOT,
                           env=_env(), capture_output=True, timeout=120)
            await http.aclose()
        rows = ledger_rows(db_url)
    answered = [s for s in client.sent if s.status == 200]
    totals = Counter(s.outcome for s in client.sent)
    return {"events": results,
            "requests": len(client.sent), "outcomes": dict(totals),
            "ledger": {"answered_200": len(answered),
                       "answered_without_row": sum(rows[s.request_id] == 0 for s in answered),
                       "requests_with_two_rows": sum(rows[s.request_id] > 1
                                                     for s in client.sent),
                       "rows": sum(rows[s.request_id] for s in client.sent)},
            "slots_leaked": leaked}


async def busiest_node(nodes: Any, config_path: Path) -> str:
    """The node whose worker runs the most requests now (prefix-aware routing may put every
    stream on one worker: losing the other would cut nothing)."""
    import ray

    from core.config import Config
    from workers.actor import find_worker_actors

    cluster = Config.model_validate(json.loads(config_path.read_text())).cluster
    best, node = -1, next(iter(nodes.nodes))
    for handle in find_worker_actors(cluster).values():
        info = await handle.info.remote()
        node_id = await handle.__ray_call__.remote(
            lambda _: ray.get_runtime_context().get_node_id())
        if info["running"] > best:
            best, node = info["running"], nodes.node_name(node_id)
    return node


async def listing(namespace: str) -> tuple[set[str], bool]:
    """The registry's workers and whether that is all of them (empty, False: no answer)."""
    from workers.actor import lookup_registry

    try:
        registry = lookup_registry(namespace)
        workers, complete = await asyncio.wait_for(registry.list.remote(), 2)
        return {w.worker_id for w in workers}, complete
    except Exception:  # noqa: BLE001 - restarting, or gone: no answer
        return set(), False


async def slots_leaked(client: Client, concurrency: int = CONCURRENCY) -> int:
    """Opens the tenant's whole concurrency at once on one router: each 429 is a slot a
    finished request still holds (the plan's rate limit is far above what the run sends)."""
    await asyncio.sleep(2)
    ready = [i for i, ok in enumerate(client.routers.ready) if ok] or [0]
    statuses = []

    async def hold(k: int) -> None:
        s = Sent(time.monotonic())
        client.routers.ready = [i == ready[0] for i in range(len(client.routers.ports))]
        await client.one(s)
        statuses.append(s.status)

    await asyncio.gather(*(hold(k) for k in range(concurrency)))
    return sum(status == 429 for status in statuses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(EVENTS),
                   help=f"comma-separated events of: {', '.join(EVENTS)}")
    p.add_argument("--rate", type=float, default=4.0, help="requests a second")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="per stream: ~1-2 s on the tiny model, so some are open at each event")
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--settle-timeout-s", type=float, default=60.0)
    p.add_argument("--quiet-s", type=float, default=5.0, help="traffic after each settles")
    p.add_argument("--max-stream-s", type=float, default=3.0,
                   help="an event's window starts this long before it (streams open at it)")
    p.add_argument("--start-timeout-s", type=float, default=180.0)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/chaos_cluster.json")
    args = p.parse_args()
    args.only = [e.strip() for e in args.only.split(",") if e.strip()]
    if unknown := set(args.only) - set(EVENTS):
        p.error(f"unknown events: {', '.join(sorted(unknown))}")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    started = dt.datetime.now(dt.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="electron-chaos-cluster-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    events = result["events"]
    out = {"bench": "chaos_cluster", "command": "python " + shlex.join(sys.argv),
           "started_at": started.isoformat(timespec="seconds"), "machine": machine(),
           **result,
           "targets": {
               **{f"{name}_no_failed": e["failed"] == 0 for name, e in events.items()},
               **{f"{name}_no_cut": e["cut"] == 0 for name, e in events.items()
                  if name != "node_lost"},
               "every_200_has_one_row": result["ledger"]["answered_without_row"] == 0,
               "no_request_billed_twice": result["ledger"]["requests_with_two_rows"] == 0,
               "no_slot_leaked": result["slots_leaked"] == 0}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("events", "ledger", "slots_leaked", "targets")},
                     indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
