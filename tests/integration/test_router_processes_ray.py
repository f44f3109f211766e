"""``electron-serve router --ray-address ADDR --processes 2`` as deployed: each router process
joins a real local Ray, finds the worker actor in the registry and serves; Ctrl-C (SIGINT to
the whole process group, as a terminal sends it) stops every process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray

from cluster.launcher import start_local_ray
from cluster.registry import registry_actor
from tests.support.environ import SavedEnviron
from tests.support.sockets import alive
from tests.support.tenancy import REDIS_URL, drop_redis_prefix, unique_prefix
from tests.support.tiny_model import make_tiny_llama_dir, tiny_cluster_config
from workers.actor import create_worker_actor

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0


async def test_router_processes_join_ray_serve_and_stop_on_ctrl_c(tmp_path):
    config = tiny_cluster_config(make_tiny_llama_dir(tmp_path / "tiny"), workers=1)
    saved = SavedEnviron("RAY_AUTH_MODE", "PYTHONPATH")
    prefix = unique_prefix()
    start_local_ray(config)
    proc = None
    try:
        registry = registry_actor(config.cluster, detached=False)
        worker = create_worker_actor(config, "w0")
        await worker.ready.remote()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ELECTRON_")}
        env.update({
            "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
            "ELECTRON_CLUSTER__NAMESPACE": config.cluster.namespace,
            "ELECTRON_CLUSTER__TOKEN": config.cluster.token,
            "ELECTRON_ENGINE__MODEL": config.engine.model, "ELECTRON_AUTH__ENABLED": "false",
            "ELECTRON_TENANCY__REDIS_URL": REDIS_URL, "ELECTRON_TENANCY__REDIS_PREFIX": prefix,
            "ELECTRON_TENANCY__SQLITE_PATH": str(tmp_path / "electron.db"),
            "ELECTRON_TENANCY__SPOOL_PATH": str(tmp_path / "spool.jsonl")})
        address = ray.get_runtime_context().gcs_address
        proc = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", "cluster.cli", "router", "--ray-address",
                               address, "--port", "0", "--processes", "2",
                               "--log-level", "warning"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        lines: list[str] = []
        pids: list[int] = []
        port = 0
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline),
                                          deadline - time.monotonic())
            assert line, f"the router exited: {lines}"
            lines.append(line)
            if m := re.search(r"router process \d of 2 serving \(pid (\d+)\)", line):
                pids.append(int(m.group(1)))
            if m := re.search(r"is up \(2 router processes\): http://127\.0\.0\.1:(\d+)/v1",
                              line):
                port = int(m.group(1))
        assert len(pids) == 2
        body = {"model": "electron", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2}
        for _ in range(8):  # fresh connections: both processes get some
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                         timeout=60) as client:
                for _ in range(50):  # each process's pool has seen the worker within 2 s
                    if (await client.get("/ready?workers=1")).status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                r = await client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == 2

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: every process gets it
        rc = await asyncio.to_thread(proc.wait, 90)
        assert rc == 0, "".join(lines) + proc.stdout.read()
        assert not any(alive(pid) for pid in pids)
        ray.kill(worker)
        ray.kill(registry)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        ray.shutdown()
        await drop_redis_prefix(prefix)
        saved.restore()
