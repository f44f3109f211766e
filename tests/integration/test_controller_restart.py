"""Workers outlive their controller, on a real local Ray: `electron-serve worker` (a
subprocess: the controller) starts two detached worker actors of its fleet; a router in this
process serves streamed requests from the openai SDK through them. The controller is
SIGKILLed under load: no request fails, the workers keep serving. A new controller adopts
both (the same worker ids and processes: no new actor, no model load). Stopped with
``--keep-workers`` it leaves them serving; `electron-serve down` then drains and stops them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_asyncio
import ray

from cluster.registry import RayWorkerSource, registry_actor
from core.config import Config
from router.api.app import create_app
from tests.integration.test_ray_workers import listed_ids, local_ray
from tests.support.load import steady_load
from tests.support.serving import serve_router, stop_process_group, stop_router
from tests.support.tiny_model import make_tiny_llama_dir, tiny_cluster_config
from workers.actor import find_worker_actors

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.timeout(180)]

__all__ = ["local_ray"]  # the fixture, from test_ray_workers

ROOT = Path(__file__).resolve().parents[2]
FLEET = "ctl-test"
START_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Config:
    return tiny_cluster_config(make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama")),
                               workers=2, fleet=FLEET)


def _env(config: Config) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELECTRON_")}
    engine = config.engine
    env.update({
        "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
        "ELECTRON_CLUSTER__NAMESPACE": config.cluster.namespace,
        "ELECTRON_CLUSTER__TOKEN": config.cluster.token,
        "ELECTRON_CLUSTER__FLEET": FLEET,
        "ELECTRON_ENGINE__MODEL": engine.model, "ELECTRON_ENGINE__DTYPE": engine.dtype,
        "ELECTRON_ENGINE__DEVICE": engine.device,
        "ELECTRON_ENGINE__KV_CACHE_BYTES": str(engine.kv_cache_bytes),
        "ELECTRON_ENGINE__MAX_MODEL_LEN": str(engine.max_model_len),
        "ELECTRON_ENGINE__TORCH_THREADS": "1"})
    return env


def electron_serve(config: Config, *args: str) -> subprocess.Popen:
    """``electron-serve ARGS --ray-address <this Ray>`` in a session of its own."""
    address = ray.get_runtime_context().gcs_address
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *args, "--ray-address", address,
         "--log-level", "warning"],
        env=_env(config), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)


async def read_until(proc: subprocess.Popen, needle: str, lines: list[str],
                     timeout: float = START_TIMEOUT_S) -> str:
    """The controller's output line holding ``needle`` (every line read goes to ``lines``)."""
    async def read() -> str:
        while True:
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line, f"exited ({proc.poll()}) before {needle!r}:\n{''.join(lines)}"
            lines.append(line)
            if needle in line:
                return line

    return await asyncio.wait_for(read(), timeout)


async def worker_pids(config: Config) -> dict[str, int]:
    """The fleet's live worker actors: worker id -> process id."""
    found = find_worker_actors(config.cluster)
    infos = await asyncio.gather(*(h.info.remote() for h in found.values()))
    return {w: info["pid"] for w, info in zip(found, infos)}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def registry(local_ray, config):
    handle = registry_actor(config.cluster, detached=False)
    yield handle
    for handle_of_worker in find_worker_actors(config.cluster).values():
        ray.kill(handle_of_worker)  # whatever a failed test left
    ray.kill(handle)


async def test_workers_outlive_a_killed_controller_and_the_next_one_adopts_them(
        registry, config):
    source = RayWorkerSource(config.cluster.namespace)
    lines: list[str] = []
    first = electron_serve(config, "worker", "--workers", "2")
    second = None
    router = None
    try:
        await read_until(first, "Ctrl-C stops these workers", lines)
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(await listed_ids(source)) < 2:
            assert time.monotonic() < deadline, "the second worker never served"
            await asyncio.sleep(0.1)
        before = await worker_pids(config)
        assert len(before) == 2 and set(before) == await listed_ids(source)

        router = await serve_router(create_app(config, source))
        load = await steady_load(router, workers=2)

        # The controller dies outright (as an OOM kill or a lost pod).
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        killed_at = time.monotonic()
        await asyncio.sleep(2.0)  # the workers keep serving, unowned
        assert await worker_pids(config) == before
        assert await listed_ids(source) == set(before)

        # The next controller adopts both: no new actor, no model load.
        restarted = time.monotonic()
        second = electron_serve(config, "worker", "--workers", "2", "--keep-workers")
        adopted = await read_until(second, "adopted", lines)
        await read_until(second, "Ctrl-C leaves these workers serving", lines)
        adopt_s = time.monotonic() - restarted
        assert adopted.split(":", 1)[1].split() == sorted(before)
        await asyncio.sleep(1.0)  # a few supervision rounds: it starts nothing
        assert await worker_pids(config) == before
        assert router.worker_ids() == sorted(before)
        served_after_kill = sum(c.outcome == "ok" and c.sent > killed_at for c in load.calls)

        # Stopped with --keep-workers, it leaves them serving.
        stop_process_group(second)
        assert second.returncode == 0, "".join(lines)
        await asyncio.sleep(1.0)
        assert await worker_pids(config) == before
        await load.stop()
        assert served_after_kill > 0
        assert [c for c in load.calls if c.outcome != "ok"] == []
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if router is not None:
            await stop_router(router)

    # `electron-serve down` drains and stops the fleet's workers.
    down = electron_serve(config, "down")
    out, _ = await asyncio.to_thread(down.communicate, timeout=60)
    assert down.returncode == 0, out
    assert f"stopped 2 worker(s) of fleet '{FLEET}'" in out
    assert find_worker_actors(config.cluster) == {}
    assert await listed_ids(source) == set()
    print(f"{len(load.calls)} requests, none failed; the new controller adopted both "
          f"workers {adopt_s:.1f} s after it started")
