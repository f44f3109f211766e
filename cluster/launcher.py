"""Starts and stops the pieces: Ray, the registry, worker actors and the router.

Three entry points, one per CLI command:
- ``run_up``: a local Ray, N workers and the router in this process; Ctrl-C or SIGTERM
  stops the router, then each worker (gracefully), kills the actors and shuts Ray down,
  so no Ray process outlives the command.
- ``run_router``: a router on an existing Ray cluster.
- ``run_worker``: N workers on an existing Ray cluster, kept alive until Ctrl-C.

This process may be the router's, which imports no torch: ``workers.actor`` keeps torch
inside the actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Iterator
from typing import Any

import ray
import uvicorn
from ray.exceptions import RayActorError

from cluster.config import Config, ConfigError
from cluster.registry import RayWorkerSource, registry_actor
from cluster.telemetry import DISABLED, Tracing, tracing_from_env
from workers.actor import PACKAGE_ROOT, create_worker_actor

log = logging.getLogger(__name__)

ROUTER_SERVICE_NAME = "electron-router"  # OTEL_SERVICE_NAME overrides it
# Seconds a stopping worker gives in-flight generations before cancelling them.
WORKER_STOP_GRACE_S = 5.0


class StartupFailed(RuntimeError):
    """Not enough workers could start (each worker's own error is logged)."""


# -- Ray ----------------------------------------------------------------------------------------

def prepare_ray_environment() -> None:
    """Environment that Ray and the processes it spawns inherit.

    Token auth stays off unless the caller chose otherwise (a local ``ray.init`` may turn it
    on and later clusters then demand the token). The package root goes on PYTHONPATH:
    Ray's workers do not see this process's ``sys.path`` edits, and a runtime env would cost
    ~1 s per actor.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if PACKAGE_ROOT not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, *paths])


def start_local_ray(config: Config) -> None:
    """A fresh local Ray owned by this process (``ray.shutdown()`` stops all of it).

    ``address="local"`` always starts a new cluster, also when a stopped one left its
    ``ray_current_cluster`` file behind (a plain ``ray.init(num_cpus=...)`` then fails).
    """
    prepare_ray_environment()
    cluster = config.cluster
    # Every worker must be schedulable even on a machine with fewer cores than workers
    # (with the autoscaler: every pool at its maximum).
    workers = cluster.workers
    if config.autoscaler.enabled:
        workers += sum(p.max_workers for p in config.autoscaler.pools)
    num_cpus = max(os.cpu_count() or 1, math.ceil(workers * cluster.num_cpus_per_worker))
    ray.init(address="local", namespace=cluster.namespace, num_cpus=num_cpus,
             include_dashboard=False, logging_level=logging.WARNING)


def connect_ray(config: Config) -> None:
    address = config.cluster.ray_address
    if not address:
        raise ConfigError("this command joins an existing Ray cluster: pass --ray-address "
                          "(or set cluster.ray_address)")
    prepare_ray_environment()
    ray.init(address=address, namespace=config.cluster.namespace,
             logging_level=logging.WARNING)


# -- workers ------------------------------------------------------------------------------------

class WorkerSet:
    """Worker actors started by this process; they die with it (they are not detached)."""

    def __init__(self, config: Config):
        self._config = config
        self.actors: dict[str, ray.actor.ActorHandle] = {}
        self.addresses: dict[str, str] = {}
        self.failures: dict[str, RayActorError] = {}
        self._ready: dict[str, asyncio.Task[str | None]] = {}

    def start(self, count: int) -> list[str]:
        """Starts ``count`` more workers; returns their ids."""
        started = []
        for _ in range(count):
            worker_id = f"{self._config.cluster.pool}-{uuid.uuid4().hex[:8]}"
            self.actors[worker_id] = create_worker_actor(self._config, worker_id)
            self._ready[worker_id] = asyncio.get_running_loop().create_task(
                self._await_ready(worker_id))
            started.append(worker_id)
        return started

    async def _await_ready(self, worker_id: str) -> str | None:
        """The worker's address, or None when it failed to start (its error is logged: the
        others may serve, and ``wait_ready`` decides whether that is enough)."""
        try:
            address = await self.actors[worker_id].ready.remote()
        except RayActorError as exc:
            log.error("worker %s failed to start: %s", worker_id, exc)
            self.failures[worker_id] = exc
            return None
        self.addresses[worker_id] = address
        log.info("worker %s ready at %s", worker_id, address)
        return address

    async def wait_ready(self, minimum: int = 1) -> None:
        """Returns once ``minimum`` workers serve; the others keep starting in the background.

        Raises StartupFailed when too many failed for ``minimum`` to be reached.
        """
        pending = set(self._ready.values())
        while len(self.addresses) < minimum:
            if len(self._ready) - len(self.failures) < minimum or not pending:
                first = next(iter(self.failures.values()), None)
                raise StartupFailed(f"{len(self.failures)} of {len(self._ready)} workers "
                                    f"failed to start; first error: {first}")
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)

    async def stop(self, grace_s: float = WORKER_STOP_GRACE_S) -> None:
        """Stops every serving worker gracefully (bounded), then kills all the actors.

        A worker still starting has nothing to drain, and its ``stop()`` would only run once
        its model has loaded: it is killed at once.
        """
        for task in self._ready.values():
            task.cancel()
        handles = [(wid, h) for wid, h in self.actors.items() if wid in self.addresses]
        for worker_id, handle in self.actors.items():
            if worker_id not in self.addresses:
                ray.kill(handle)
        await asyncio.gather(*(_stop_actor(wid, h, grace_s) for wid, h in handles))
        self.actors.clear()

    async def stop_one(self, worker_id: str, grace_s: float = WORKER_STOP_GRACE_S) -> None:
        """Stops one worker (gracefully when it serves) and forgets it."""
        handle = self.actors.pop(worker_id)
        task = self._ready.pop(worker_id, None)
        if task is not None:
            task.cancel()
        self.failures.pop(worker_id, None)
        if self.addresses.pop(worker_id, None) is None:
            ray.kill(handle)
            return
        await _stop_actor(worker_id, handle, grace_s)


async def _stop_actor(worker_id: str, handle: ray.actor.ActorHandle, grace_s: float) -> None:
    """A serving worker's ``stop()`` (bounded), then ``ray.kill``."""
    try:
        await asyncio.wait_for(handle.stop.remote(grace_s), grace_s + 10)
    except RayActorError:
        log.info("worker %s was already gone", worker_id)
    except Exception as exc:  # noqa: BLE001 - it is killed below whatever went wrong
        log.warning("worker %s did not stop cleanly: %r", worker_id, exc)
    ray.kill(handle)


# -- the router ---------------------------------------------------------------------------------

class _RouterServer(uvicorn.Server):
    # The launcher owns SIGINT/SIGTERM (one shutdown path for workers, router and Ray);
    # uvicorn's own handlers would swallow the first signal and re-raise it afterwards.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen_socket(host: str, port: int) -> socket.socket:
    """The router's listening socket, bound before anything slow starts: a taken port fails
    the command at once, and port 0 gets a free port that the banner can show."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"the router cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


def _router_server(config: Config, log_level: str, tracing: Tracing = DISABLED) -> _RouterServer:
    from router.app import create_app  # the router loads its own tokenizer

    app = create_app(config, RayWorkerSource(config.cluster.namespace), tracing=tracing)
    extra: dict[str, Any] = {}
    if config.observability.log_format == "json":
        extra["log_config"] = None  # uvicorn's loggers go to the root's JSON handler
    return _RouterServer(uvicorn.Config(app, log_level=log_level.lower(), lifespan="on",
                                        **extra))


async def _start_router(server: _RouterServer, sock: socket.socket,
                        stop: asyncio.Event) -> asyncio.Task[None]:
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # startup failed: raise its error
            raise StartupFailed("the router exited during startup")
        if stop.is_set():
            break
        await asyncio.sleep(0.05)  # uvicorn offers no awaitable for "started"
    return task


# -- signals and the three commands -------------------------------------------------------------

def _stop_event() -> asyncio.Event:
    """Set by the first SIGINT/SIGTERM; a second signal then acts as usual (forces exit).

    Call it after ``ray.init``: Ray's driver installs its own SIGTERM handlers (one dumps a
    stack and kills the process), and these must replace them.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.warning("%s: stopping (again to force)", sig.name)
        stop.set()
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


async def _until(stop: asyncio.Event, work: Awaitable[Any]) -> bool:
    """Runs ``work`` unless ``stop`` is set first; True when the work finished."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        task.cancel()
        return False
    task.result()
    return True


def _workers(config: Config) -> Any:
    """A fixed ``WorkerSet``, or the ``Autoscaler`` of every pool when it is enabled."""
    if config.autoscaler.enabled:
        from cluster.autoscaler import Autoscaler

        return Autoscaler(config)
    return WorkerSet(config)


def _start(workers: Any, config: Config) -> None:
    if isinstance(workers, WorkerSet):
        workers.start(config.cluster.workers)
    else:  # the autoscaler starts each pool's minimum
        workers.start()


def _banner(config: Config, port: int, workers: WorkerSet | None) -> str:
    host = config.router.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{shown}:{port}/v1"
    key = config.auth.static_keys[0] if config.auth.enabled and config.auth.static_keys \
        else "sk-local"
    model = config.router.model_id
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
    lines = [f"Electron Serve is up: {base}"]
    if workers is not None:
        lines.append(f"  workers ready: {len(workers.addresses)} of {len(workers.actors)} "
                     f"(model {config.engine.model})")
    lines += [
        "",
        f"  curl {base}/chat/completions \\",
        f"    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\",
        f"    -d '{body}'",
        "",
        "  from openai import OpenAI",
        f'  client = OpenAI(base_url="{base}", api_key="{key}")',
        f'  reply = client.chat.completions.create(model="{model}", '
        'messages=[{"role": "user", "content": "Hello!"}])',
        "  print(reply.choices[0].message.content)",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def with_ready_made_key(config: Config) -> Config:
    """The embedded default keeps auth on: with no key configured, ``up`` makes one for this
    run (printed in the banner) instead of serving without auth."""
    if not config.auth.enabled or config.auth.static_keys:
        return config
    from cluster.tenants import new_key

    auth = config.auth.model_copy(update={"static_keys": (new_key().key,)})
    return config.model_copy(update={"auth": auth})


async def run_up(config: Config, log_level: str = "info") -> None:
    """``electron-serve up``: local Ray, ``cluster.workers`` workers and the router."""
    if config.cluster.ray_address:
        raise ConfigError("`up` starts its own local Ray, but cluster.ray_address is set: "
                          "use `electron-serve worker` and `router` to join a cluster")
    if config.cluster.workers < 1:
        raise ConfigError("`up` needs at least one worker")
    config = with_ready_made_key(config)
    sock = listen_socket(config.router.host, config.router.port)
    workers = _workers(config)
    registry = None
    tracing = DISABLED
    router_task: asyncio.Task[None] | None = None
    server: _RouterServer | None = None
    try:
        start_local_ray(config)
        stop = _stop_event()
        registry = registry_actor(config.cluster, detached=False)
        _start(workers, config)
        print(f"starting {config.cluster.workers} worker(s) with {config.engine.model} ...",
              flush=True)
        if not await _until(stop, workers.wait_ready(1)):
            return
        tracing = tracing_from_env(ROUTER_SERVICE_NAME)
        server = _router_server(config, log_level, tracing)
        router_task = await _start_router(server, sock, stop)
        if server.started:
            print(_banner(config, sock.getsockname()[1], workers), flush=True)
        await _until(stop, asyncio.shield(router_task))
    finally:
        if server is not None and router_task is not None:
            server.should_exit = True
            await asyncio.gather(router_task, return_exceptions=True)
        tracing.shutdown()
        await workers.stop()
        if registry is not None:
            ray.kill(registry)
        ray.shutdown()
        sock.close()
        print("stopped.", flush=True)


async def run_router(config: Config, log_level: str = "info") -> None:
    """``electron-serve router``: a router on an existing Ray cluster (no workers)."""
    sock = listen_socket(config.router.host, config.router.port)
    tracing = tracing_from_env(ROUTER_SERVICE_NAME)
    try:
        connect_ray(config)
        stop = _stop_event()
        # Idempotent: routers and workers may start in any order.
        registry_actor(config.cluster, detached=True)
        server = _router_server(config, log_level, tracing)
        router_task = await _start_router(server, sock, stop)
        if server.started:
            print(_banner(config, sock.getsockname()[1], None), flush=True)
        await _until(stop, asyncio.shield(router_task))
        server.should_exit = True
        await asyncio.gather(router_task, return_exceptions=True)
    finally:
        tracing.shutdown()
        ray.shutdown()
        sock.close()


async def run_worker(config: Config) -> None:
    """``electron-serve worker``: ``cluster.workers`` workers on an existing Ray cluster."""
    connect_ray(config)
    workers = _workers(config)
    try:
        stop = _stop_event()
        registry_actor(config.cluster, detached=True)
        _start(workers, config)
        if not await _until(stop, workers.wait_ready(1)):
            return
        for worker_id, address in sorted(workers.addresses.items()):
            print(f"worker {worker_id} serving at {address}", flush=True)
        print("Ctrl-C stops these workers.", flush=True)
        await stop.wait()
    finally:
        await workers.stop()
        ray.shutdown()
