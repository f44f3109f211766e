"""``router --processes N`` for real: the supervisor in a process of its own, its router
processes accepting on one port with SO_REUSEPORT, a tiny-model worker (in this process)
behind them, limits in the local Redis, then SIGKILL of one child and SIGTERM of the whole.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from cluster.router_processes import orphan_spools, spool_path
from core.config import EngineConfig
from tests.support.sockets import alive, established
from tests.support.tenancy import REDIS_URL, drop_redis_prefix, unique_prefix
from tests.support.tiny_model import make_tiny_llama_dir
from workers.engine.async_engine import AsyncEngine
from workers.grpc_service import serve_worker

pytestmark = pytest.mark.slow
in_module_loop = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parents[2]
MODEL = "electron"
KEY = "sk-test-processes"
STANDARD_RPM = 10  # core/config.py BUILTIN_PLANS["standard"]
START_TIMEOUT_S = 120.0

SUPERVISOR = """
import asyncio, sys, uvloop
from cluster.router_processes import supervise
from core.config import load_config
from core.endpoints import StaticWorkerSource, WorkerEndpoint
from core.logs import configure_logging
configure_logging("warning", "text")
source = StaticWorkerSource([WorkerEndpoint("w0", sys.argv[1], "electron", "default")])
with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    runner.run(supervise(load_config(), "warning", source=source))
"""


@dataclass
class Supervisor:
    proc: subprocess.Popen
    port: int = 0
    pids: dict[int, int] = field(default_factory=dict)  # process index -> pid
    marker: bytes = b""  # an entry of its environment (and its children's)
    lines: list[str] = field(default_factory=list)

    async def read_until(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline),
                                          deadline - time.monotonic())
            if not line:
                raise AssertionError(f"the supervisor exited: {self.lines}")
            self.lines.append(line)
            if m := re.search(r"router process (\d+) of \d+ serving.*\(pid (\d+)\)", line):
                self.pids[int(m.group(1))] = int(m.group(2))
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r}: {self.lines}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def worker(tiny_dir) -> AsyncIterator[str]:
    engine = AsyncEngine(EngineConfig(model=str(tiny_dir), dtype="float32",
                                      kv_cache_bytes=16 * 2**20, max_model_len=512,
                                      torch_threads=1), worker_id="w0", model_id=MODEL)
    server, port = await serve_worker(engine, "127.0.0.1", 0, model_id=MODEL)
    yield f"127.0.0.1:{port}"
    await server.stop(None)
    engine.shutdown()


@pytest.fixture(scope="module")
def redis_prefix() -> Iterator[str]:
    prefix = unique_prefix()
    yield prefix
    asyncio.run(drop_redis_prefix(prefix))


def supervisor_env(tiny_dir: Path, state: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELECTRON_")}
    env.update({
        "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
        "ELECTRON_ENGINE__MODEL": str(tiny_dir), "ELECTRON_ROUTER__PORT": "0",
        "ELECTRON_ROUTER__PROCESSES": "2", "ELECTRON_ROUTER__REGISTRY_POLL_S": "0.2",
        "ELECTRON_AUTH__STATIC_KEYS": f"[{KEY}]", "ELECTRON_AUTH__STATIC_PLAN": "standard",
        "ELECTRON_TENANCY__SQLITE_PATH": str(state / "electron.db"),
        "ELECTRON_TENANCY__SPOOL_PATH": str(state / "spool.jsonl"), **extra})
    return env


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def supervisor(tiny_dir, worker, redis_prefix, tmp_path_factory
                     ) -> AsyncIterator[Supervisor]:
    state = tmp_path_factory.mktemp("router-processes")
    env = supervisor_env(tiny_dir, state, ELECTRON_TENANCY__REDIS_URL=REDIS_URL,
                         ELECTRON_TENANCY__REDIS_PREFIX=redis_prefix)
    proc = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, "-c", SUPERVISOR, worker], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    sup = Supervisor(proc, marker=f"ELECTRON_TENANCY__SPOOL_PATH={state / 'spool.jsonl'}"
                     .encode())
    try:
        m = await sup.read_until(r"is up \(2 router processes\): http://127\.0\.0\.1:(\d+)/v1")
        sup.port = int(m.group(1))
        yield sup
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@in_module_loop
async def test_both_processes_serve_on_one_port_and_share_the_limits(supervisor):
    """Each request on a connection of its own: the kernel spreads them over both processes'
    sockets; the plan's requests per minute are counted once, in Redis, across both."""
    assert sorted(supervisor.pids) == [0, 1]
    base = f"http://127.0.0.1:{supervisor.port}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    clients = [httpx.AsyncClient(base_url=base, timeout=60,
                                 headers={"Authorization": f"Bearer {KEY}"})
               for _ in range(STANDARD_RPM + 4)]
    try:
        statuses = []
        for client in clients:  # one after another: the plan's concurrency is 3
            r = await client.post("/v1/chat/completions", json=body)
            statuses.append(r.status_code)
            if r.status_code == 200:
                assert r.json()["choices"][0]["message"]["role"] == "assistant"
            else:
                assert r.json()["error"]["code"] == "rate_limit_exceeded", r.text
        held = {i: established(pid, supervisor.port) for i, pid in supervisor.pids.items()}
    finally:
        for client in clients:
            await client.aclose()
    assert statuses == [200] * STANDARD_RPM + [429] * 4
    assert sum(held.values()) == len(clients)
    assert all(n > 0 for n in held.values()), held
    # Whichever process a scrape reaches answers for both.
    for _ in range(6):
        async with httpx.AsyncClient(base_url=base) as client:
            text = (await client.get("/metrics")).text
        assert requests_counted(text) == {"200": STANDARD_RPM, "429": 4}, text


def requests_counted(metrics: str) -> dict[str, int]:
    counted: dict[str, int] = {}
    for m in re.finditer(r'^electron:requests_total\{([^}]*)\} ([0-9.e+]+)$', metrics, re.MULTILINE):
        status = re.search(r'status="(\d+)"', m.group(1)).group(1)
        counted[status] = counted.get(status, 0) + int(float(m.group(2)))
    return counted


@in_module_loop
async def test_a_child_that_dies_is_restarted(supervisor):
    old = supervisor.pids[1]
    os.kill(old, signal.SIGKILL)
    await supervisor.read_until(r"router process 1 of 2 serving again")
    assert supervisor.pids[1] != old and alive(supervisor.pids[1])
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{supervisor.port}") as client:
        assert (await client.get("/health")).status_code == 200


@in_module_loop
async def test_sigterm_stops_every_process(supervisor):
    pids = list(supervisor.pids.values())
    # The supervisor, its router processes, and multiprocessing's resource tracker.
    running = set(with_environment(supervisor.marker))
    assert {supervisor.proc.pid, *pids} <= running
    assert all(b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
               for pid in running - {supervisor.proc.pid, *pids})
    supervisor.proc.send_signal(signal.SIGTERM)
    rc = await asyncio.to_thread(supervisor.proc.wait, 60)
    assert rc == 0, supervisor.proc.stdout.read()
    assert not any(alive(pid) for pid in pids)
    # The resource tracker exits once it reads EOF from its (gone) parent: give it a moment.
    deadline = time.monotonic() + 5
    while with_environment(supervisor.marker) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert with_environment(supervisor.marker) == []


def test_more_than_one_process_without_redis_is_refused(tmp_path):
    env = supervisor_env(tmp_path, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "router", "--processes", "2",
                           "--ray-address", "127.0.0.1:1"], check=False, env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "--processes 2 needs Redis" in proc.stderr
    assert "tenancy.redis_url" in proc.stderr


def test_spool_paths_differ_per_process_and_orphans_are_found(tmp_path):
    path = str(tmp_path / "spool.jsonl")
    assert [spool_path(path, i) for i in range(3)] == [
        path, str(tmp_path / "spool.1.jsonl"), str(tmp_path / "spool.2.jsonl")]
    for i in (1, 2, 3):
        Path(spool_path(path, i)).write_text("{}\n")
    (tmp_path / "spool.x.jsonl").write_text("")
    (tmp_path / "spool.3.jsonl.replay").write_text("{}\n")  # goes with its spool
    (tmp_path / "spool.4.jsonl.replay").write_text("{}\n")  # left alone: found all the same
    assert orphan_spools(path, 2) == [tmp_path / "spool.2.jsonl", tmp_path / "spool.3.jsonl",
                                      tmp_path / "spool.4.jsonl"]


def test_a_process_failing_at_startup_fails_the_command(tmp_path, redis_prefix):
    """No half-started router: the supervisor names the process and its error, and stops the
    others."""
    env = supervisor_env(tmp_path / "no-such-model", tmp_path,
                         ELECTRON_TENANCY__REDIS_URL=REDIS_URL,
                         ELECTRON_TENANCY__REDIS_PREFIX=redis_prefix)
    proc = subprocess.run([sys.executable, "-c", SUPERVISOR, "127.0.0.1:1"], check=False,
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert re.search(r"StartupFailed: router process [01] failed to start: \w+", proc.stderr), \
        proc.stderr[-3000:]
    assert "serving" not in proc.stdout
    marker = f"ELECTRON_TENANCY__SPOOL_PATH={tmp_path / 'spool.jsonl'}".encode()
    assert with_environment(marker) == []


def with_environment(entry: bytes) -> list[int]:
    """Live processes whose environment holds ``entry`` (the supervisor's children inherit
    its environment)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if entry in environ.split(b"\0") and alive(int(pid)):
            found.append(int(pid))
    return found
