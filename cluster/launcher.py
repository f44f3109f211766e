"""Starts and stops the pieces: Ray, the registry, worker actors and the router.

Three entry points, one per CLI command:
- ``run_up``: a local Ray, N workers and the router in this process; Ctrl-C or SIGTERM
  drains the router (``stop_router``), then stops each worker (gracefully), kills the actors
  and shuts Ray down, so no Ray process outlives the command.
- ``run_router``: a router on an existing Ray cluster (with ``router.processes`` > 1 the CLI
  runs cluster/router_processes.py's supervisor instead, each of whose processes serves as
  this does).
- ``run_worker``: N workers on an existing Ray cluster, kept alive until Ctrl-C: a
  controller. Its workers are detached and named after ``cluster.fleet``: it adopts the live
  ones a previous controller of the fleet left (cluster/fleet.py); Ctrl-C or SIGTERM drains
  and stops them, or leaves them serving with ``cluster.keep_workers_on_exit``.
- ``run_down``: stops (drained) every worker of a fleet whose controller is gone.

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
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import ray
import uvicorn
from ray.exceptions import RayError

from cluster.autoscaler import Autoscaler
from cluster.fleet import (
    WORKER_STOP_GRACE_S,
    Fleet,
    StartupFailed,
    StaticFleet,
    stop_actor,
)
from cluster.registry import RayWorkerSource, registry_actor
from core.aio import within
from core.cluster_token import new_cluster_token
from core.config import Config, ConfigError
from core.endpoints import HEAD_RESOURCE, WorkerSource
from core.telemetry import DISABLED, Tracing, tracing_from_env
from router.api.connections import uvicorn_settings
from router.api.drain import CUT_GRACE_S, Drain
from router.api.server import listen_socket
from workers.actor import PACKAGE_ROOT, find_worker_actors

log = logging.getLogger(__name__)

ROUTER_SERVICE_NAME = "electron-router"  # OTEL_SERVICE_NAME overrides it
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
    # This node is the head: the registry is placed (and restarted) here (cluster/registry.py).
    for attempt in range(1, LOCAL_RAY_ATTEMPTS + 1):
        began, known = time.time(), set(_own_sessions())
        try:
            ray.init(address="local", namespace=cluster.namespace, num_cpus=num_cpus,
                     resources={HEAD_RESOURCE: 1}, include_dashboard=False,
                     logging_level=logging.WARNING)
            return
        except Exception as exc:
            # Ray waits a fixed 30 s for its GCS to publish its port and for its raylet to
            # register; a start that misses either raises and leaves its processes running:
            # stop them, try again.
            if attempt == LOCAL_RAY_ATTEMPTS or not any(
                    message in str(exc) for message in RAY_START_TIMEOUTS):
                raise
            logs = stop_failed_local_ray(began, known)
            log.warning("local Ray did not start (%s); stopped its processes, starting it "
                        "again (attempt %d of %d)%s", exc, attempt + 1, LOCAL_RAY_ATTEMPTS,
                        "".join(f"\n{name}:\n{tail}" for name, tail in logs.items()))


LOCAL_RAY_ATTEMPTS = 3
# Ray's own messages (ray/_private/node.py): the raylet did not register, the GCS did not
# publish its port.
RAY_START_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")
_RAY_LOGS = ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err")


def _own_sessions() -> list[str]:
    """The session directories of the local Rays this process started."""
    root = Path(ray._common.utils.get_default_ray_temp_dir())
    return [str(d) for d in root.glob(f"session_*_{os.getpid()}")
            if d.is_dir() and not d.is_symlink()]


def stop_failed_local_ray(began: float, known: set[str] | frozenset[str] = frozenset(),
                          wait_s: float = 10.0) -> dict[str, str]:
    """Stops the processes of the local Ray sessions this process started since ``began``
    (a failed ``ray.init`` leaves them running; ``known``: sessions that existed before)
    and returns the tails of their logs, and under ``stopped`` what it stopped.

    A session's directory is named ``session_<time>_<pid of its starter>`` and every process
    of the session names it on its command line, so no other Ray on the machine is touched.
    Two do not: the session's reaper, a child of this process (SIGKILL only: on SIGTERM a
    reaper kills its whole process group, this process included), and a child forked since
    ``began`` that never reached its ``exec`` (it still runs this process's command line).
    """
    sessions = [s for s in _own_sessions() if s not in known]
    tails: dict[str, str] = {}
    for session in sessions:
        for name in _RAY_LOGS:
            with contextlib.suppress(OSError):
                text = (Path(session) / "logs" / name).read_text(errors="replace")
                if text.strip():
                    tails[name] = "\n".join(text.splitlines()[-20:])

    own = _cmdline(os.getpid())

    def failed(pid: int, ppid: int, cmdline: str) -> bool:
        if any(s in cmdline for s in sessions):
            return True
        return ppid == os.getpid() and ("ray_process_reaper" in cmdline or (
            cmdline == own and _started_at(pid) >= began - 1))

    stopped = [(pid, _cmdline(pid)) for pid in live_processes(failed)]
    tails["stopped"] = "\n".join(
        f"{pid}: {'(never reached exec) ' if cmdline == own else ''}{cmdline[:120]}"
        for pid, cmdline in stopped)
    deadline = time.monotonic() + wait_s
    while pids := live_processes(failed):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # this process's children: leave no zombie
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of a failed Ray start would not stop: {pids}")
        time.sleep(0.05)
    return tails


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


def _started_at(pid: int) -> float:
    """When a process started (epoch seconds; 0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def live_processes(select) -> list[int]:
    """Live (not zombie) processes for which ``select(pid, ppid, cmdline)`` holds."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = _cmdline(int(pid))
            with open(f"/proc/{pid}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue  # exited while we looked
        if state != "Z" and select(int(pid), int(ppid), cmdline):
            found.append(int(pid))
    return found


def connect_ray(config: Config) -> None:
    address = config.cluster.ray_address
    if not address:
        raise ConfigError("this command joins an existing Ray cluster: pass --ray-address "
                          "(or set cluster.ray_address)")
    prepare_ray_environment()
    ray.init(address=address, namespace=config.cluster.namespace,
             logging_level=logging.WARNING)


# -- the router ---------------------------------------------------------------------------------

class _RouterServer(uvicorn.Server):
    # The launcher owns SIGINT/SIGTERM (one shutdown path for workers, router and Ray);
    # uvicorn's own handlers would swallow the first signal and re-raise it afterwards.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _router_server(config: Config, log_level: str, tracing: Tracing = DISABLED,
                   source: WorkerSource | None = None) -> _RouterServer:
    """The router's uvicorn server; its workers come from Ray's registry unless ``source``
    names them."""
    from router.api.app import create_app  # the router loads its own tokenizer

    if source is None:
        source = RayWorkerSource(config.cluster.namespace, config.cluster.registry_timeout_s)
    app = create_app(config, source, tracing=tracing)
    return router_server(app, config, log_level)


def router_server(app: Any, config: Config, log_level: str = "info") -> _RouterServer:
    """uvicorn serving the router ``app``; ``stop_router`` stops it."""
    extra: dict[str, Any] = uvicorn_settings(config.router)  # the connection limits
    if config.observability.log_format == "json":
        extra["log_config"] = None  # uvicorn's loggers go to the root's JSON handler
    # uvicorn's shutdown comes after the drain (``stop_router``): by then every request was
    # let finish or cut; this bounds the cut ones' last writes (a client that stopped
    # reading) instead of waiting for them forever.
    return _RouterServer(uvicorn.Config(app, log_level=log_level.lower(), lifespan="on",
                                        timeout_graceful_shutdown=math.ceil(CUT_GRACE_S),
                                        **extra))


async def stop_router(server: _RouterServer, task: asyncio.Task[None],
                      drain_timeout_s: float) -> None:
    """The router's graceful stop (router/api/drain.py): not ready at once, the open requests
    finish for up to ``drain_timeout_s``, the rest end with an error (ledger rows written,
    slots released), then uvicorn shuts down and the app's lifespan flushes the ledger."""
    if not task.done() and server.started:
        drain: Drain = server.config.app.state.drain
        log.warning("router draining: %d request(s) open, up to %.0f s",
                    drain.open_requests, drain_timeout_s)
        cut = await drain.run(drain_timeout_s)
        if cut:
            log.warning("router drain time over: %d request(s) ended with an error", cut)
    server.should_exit = True
    await asyncio.gather(task, return_exceptions=True)


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


def make_fleet(config: Config, *, detached: bool = False) -> Fleet:
    """The autoscaler of every pool when it is enabled, else a fixed set of workers;
    ``detached`` workers outlive this process (cluster/fleet.py)."""
    if config.autoscaler.enabled:
        return Autoscaler(config, detached=detached)
    return StaticFleet(config, detached=detached)


def _banner(config: Config, port: int, workers: Fleet | None) -> str:
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
    from router.tenancy.store import new_key

    auth = config.auth.model_copy(update={"static_keys": (new_key().key,)})
    return config.model_copy(update={"auth": auth})


def with_cluster_token(config: Config) -> Config:
    """``up`` owns its workers and its router: with no ``cluster.token`` configured, it makes
    one for this run and hands it to both in their config, so nothing has to be set and a
    caller without it (another user of the machine) is refused by the workers' ports."""
    if config.cluster.token is not None:
        return config
    cluster = config.cluster.model_copy(update={"token": new_cluster_token()})
    return config.model_copy(update={"cluster": cluster})


def require_cluster_token(config: Config, command: str) -> None:
    """Workers and routers joining a cluster must share a token set beforehand."""
    if config.cluster.token is None:
        raise ConfigError(
            f"`{command}` joins a cluster whose workers ask every caller for the cluster "
            "token: set cluster.token (ELECTRON_CLUSTER__TOKEN, at least 16 characters; the "
            "same on every worker and router)")


async def run_up(config: Config, log_level: str = "info") -> None:
    """``electron-serve up``: local Ray, ``cluster.workers`` workers and the router."""
    if config.cluster.ray_address:
        raise ConfigError("`up` starts its own local Ray, but cluster.ray_address is set: "
                          "use `electron-serve worker` and `router` to join a cluster")
    if config.cluster.workers < 1:
        raise ConfigError("`up` needs at least one worker")
    if config.router.processes > 1:
        raise ConfigError("`up` runs its router in its own process (router.processes is "
                          f"{config.router.processes}): run several router processes with "
                          "`electron-serve router --processes N` on a cluster")
    config = with_cluster_token(with_ready_made_key(config))
    sock = listen_socket(config.router.host, config.router.port)
    workers = make_fleet(config)
    registry = None
    tracing = DISABLED
    router_task: asyncio.Task[None] | None = None
    server: _RouterServer | None = None
    try:
        start_local_ray(config)
        stop = _stop_event()
        registry = registry_actor(config.cluster, detached=False)
        workers.start()
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
            await stop_router(server, router_task, config.router.drain_timeout_s)
        tracing.shutdown()
        await workers.stop()
        if registry is not None:
            ray.kill(registry)
        ray.shutdown()
        sock.close()
        print("stopped.", flush=True)


async def run_router(config: Config, log_level: str = "info") -> None:
    """``electron-serve router``: a router on an existing Ray cluster (no workers)."""
    require_cluster_token(config, "router")
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
        await stop_router(server, router_task, config.router.drain_timeout_s)
    finally:
        tracing.shutdown()
        ray.shutdown()
        sock.close()


async def run_worker(config: Config) -> None:
    """``electron-serve worker``: ``cluster.workers`` workers on an existing Ray cluster (a
    controller of ``cluster.fleet``: it adopts the fleet's live workers first)."""
    require_cluster_token(config, "worker")
    connect_ray(config)
    workers = make_fleet(config, detached=True)
    ready_file = config.cluster.ready_file
    try:
        stop = _stop_event()
        registry_actor(config.cluster, detached=True)
        workers.start()
        if workers.adopted:
            print(f"adopted {len(workers.adopted)} running worker(s) of fleet "
                  f"{config.cluster.fleet!r}: {' '.join(workers.adopted)}", flush=True)
        if not await _until(stop, _first_worker(workers, config.cluster.start_timeout_s)):
            return
        for worker_id, address in sorted(workers.addresses.items()):
            print(f"worker {worker_id} serving at {address}", flush=True)
        if ready_file:
            Path(ready_file).write_text("ready\n")
        keep = config.cluster.keep_workers_on_exit
        print("Ctrl-C leaves these workers serving (`electron-serve down` stops them)." if keep
              else "Ctrl-C stops these workers.", flush=True)
        await stop.wait()
    finally:
        if ready_file:
            Path(ready_file).unlink(missing_ok=True)
        if config.cluster.keep_workers_on_exit:
            await workers.release()
            print(f"left {config.cluster.fleet!r}'s workers serving", flush=True)
        else:
            # Drains every serving worker first (cluster/autoscaler.py PoolScaler.stop).
            await workers.stop()
        ray.shutdown()


async def run_down(config: Config) -> None:
    """``electron-serve down``: drains and stops every worker of ``cluster.fleet`` (all its
    pools), e.g. after a controller that left them (``keep_workers_on_exit``) or was lost
    for good. Each is marked draining, routers stop choosing it within two polls, its
    running requests get ``autoscaler.drain_timeout_s`` at most, then it stops."""
    connect_ray(config)
    try:
        found = find_worker_actors(config.cluster)
        await asyncio.gather(*(_drain_and_stop(config, w, h) for w, h in found.items()))
        print(f"stopped {len(found)} worker(s) of fleet {config.cluster.fleet!r}", flush=True)
    finally:
        ray.shutdown()


async def _drain_and_stop(config: Config, worker_id: str, handle: Any) -> None:
    try:
        await within(handle.drain.remote(), config.cluster.registry_timeout_s + 5)
        await asyncio.sleep(2 * config.router.registry_poll_s + config.cluster.heartbeat_s)
        deadline = asyncio.get_running_loop().time() + config.autoscaler.drain_timeout_s
        while asyncio.get_running_loop().time() < deadline:
            info = await within(handle.info.remote(), 5)
            if info["running"] + info["waiting"] == 0:
                break
            await asyncio.sleep(0.2)
    except (RayError, TimeoutError) as exc:
        log.warning("worker %s: draining failed (%r); stopping it", worker_id, exc)
    await stop_actor(worker_id, handle, WORKER_STOP_GRACE_S)


async def _first_worker(workers: Fleet, timeout_s: float) -> None:
    """Until one worker serves; StartupFailed after ``timeout_s`` (0: no limit)."""
    try:
        await within(workers.wait_ready(1), timeout_s or None)
    except TimeoutError:
        raise StartupFailed(
            f"no worker was serving {timeout_s:.0f} s after start (cluster.start_timeout_s): "
            "look for Pending GPU pods (no node fits), image pulls, and the worker pods' logs "
            "for the model load") from None
