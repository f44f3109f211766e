"""``electron-serve router --processes N``: N router processes behind one port.

One router process serves every request on one event loop, so its CPU caps a pod's
requests/s; N processes on one port multiply it without another Service or pod.

- The supervisor (the command's own process) binds the port with SO_REUSEPORT and never
  listens on that socket: it holds the port (port 0 picks one) while each child binds a
  listening socket of its own on it, and the kernel spreads new connections over the
  children's sockets. The supervisor joins no Ray cluster and serves nothing.
- Children are started with multiprocessing's ``spawn`` (a fresh interpreter: never a fork
  of a process that may hold gRPC or Ray threads). Each joins Ray, reads the worker registry
  and builds its own app (``create_app``): its own worker channels, WatchState streams and
  prefix index, its own tokenizer.
- Limits, concurrency slots and key revocations must be shared by the processes, so more than
  one process needs ``tenancy.redis_url``: the command refuses to start without it
  (in-process limits would multiply each tenant's limits by N).
- Metrics: a scrape of ``/metrics`` reaches one process, so the supervisor gives the children a
  fresh ``PROMETHEUS_MULTIPROC_DIR`` (unless one is set) and each process answers with the sum
  over all of them (router/telemetry/metrics.py).
- The database schema is migrated once, by the supervisor, before the children start.
- One ledger spool per process: process 0 keeps ``tenancy.spool_path``, process i > 0 writes
  ``<stem>.<i><suffix>`` beside it. Process 0 takes over, at its start, the spools of indices
  it no longer runs (``--processes`` lowered), so no spooled row is left behind.
- SIGINT/SIGTERM to the supervisor: SIGTERM to every child (each drains as one router does:
  not ready, open streams finish for ``router.drain_timeout_s``, the rest end with an error
  event; cluster/launcher.py ``stop_router``), then it waits for them; a second signal kills
  them.
  Children ignore SIGINT (Ctrl-C reaches the whole process group; the supervisor decides) and
  get SIGTERM if the supervisor dies, even by SIGKILL (PR_SET_PDEATHSIG), so no child outlives
  it.
- A child that dies after startup is restarted (the others keep serving); more than
  ``MAX_RESTARTS`` restarts within ``RESTART_WINDOW_S`` stop the whole router with an error,
  so that a crash loop is the pod's restart to make, not a silent one. A child that fails
  during startup fails the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.fleet import StartupFailed
from core.aio import within
from core.config import Config, ConfigError
from core.endpoints import WorkerSource
from router.api.server import bound_socket, listen_socket
from router.telemetry.metrics import MULTIPROC_DIR_ENV

log = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
POLL_S = 0.1
_PR_SET_PDEATHSIG = 1


def require_shared_limits(config: Config) -> None:
    """ConfigError unless N > 1 processes can share the tenants' limits (Redis)."""
    processes = config.router.processes
    if processes > 1 and not config.tenancy.redis_url:
        raise ConfigError(
            f"--processes {processes} needs Redis: the router processes share rate limits, "
            "concurrency slots and key revocations through it (each process alone would let a "
            f"tenant through {processes} times its limits). Set tenancy.redis_url "
            "(ELECTRON_TENANCY__REDIS_URL=redis://host:6379/0), or run one process")


def spool_path(path: str, index: int) -> str:
    """Process ``index``'s ledger spool: the configured path for process 0, else
    ``<stem>.<index><suffix>`` beside it."""
    if index == 0:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{index}{p.suffix}"))


def orphan_spools(path: str, processes: int) -> list[Path]:
    """Spools of process indices >= ``processes`` (left by a run with more processes)."""
    p = Path(path).expanduser()
    # A spool's replay file (``<spool>.replay``, router/tenancy/ledger.py) goes with it: the
    # spool's path names both (either may be left alone).
    pattern = re.compile("(" + re.escape(p.stem) + r"\.([0-9]+)" + re.escape(p.suffix)
                         + r")(\.replay)?$")
    try:
        names = sorted(os.listdir(p.parent))
    except FileNotFoundError:
        return []
    spools = {m.group(1) for name in names
              if (m := pattern.match(name)) and int(m.group(2)) >= processes}
    return [p.with_name(name) for name in sorted(spools)]


def child_config(config: Config, index: int, migrate: bool = False) -> Config:
    """What process ``index`` runs: one process of its own, its own spool, no migration (the
    supervisor made it; ``migrate``: it could not, the database being down)."""
    tenancy = config.tenancy.model_copy(update={
        "spool_path": spool_path(config.tenancy.spool_path, index), "migrate_on_start": migrate})
    router = config.router.model_copy(update={"processes": 1})
    return config.model_copy(update={"tenancy": tenancy, "router": router})


# -- a child ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChildArgs:
    index: int
    config: Config            # already the child's (child_config)
    log_level: str
    port: int
    parent_pid: int
    source: WorkerSource | None = None  # None: Ray's registry (cluster.ray_address)
    adopt: tuple[str, ...] = field(default_factory=tuple)


def _child_main(conn: Any, args: ChildArgs) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides on Ctrl-C
    if sys.platform == "linux":  # SIGTERM when the supervisor dies, even by SIGKILL
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != args.parent_pid:  # it died before prctl took effect
        sys.exit(1)
    import uvloop

    from core.logs import configure_logging

    configure_logging(args.log_level, args.config.observability.log_format)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve_child(conn, args))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


async def _serve_child(conn: Any, args: ChildArgs) -> None:
    import ray

    from cluster import launcher
    from cluster.registry import registry_actor
    from core.telemetry import tracing_from_env

    config = args.config
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    sock = listen_socket(config.router.host, args.port, reuse_port=True)
    tracing = tracing_from_env(launcher.ROUTER_SERVICE_NAME)
    source = args.source
    try:
        if source is None:
            launcher.connect_ray(config)
            # connect_ray's Ray driver installs its own SIGTERM handler: ours again.
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            registry_actor(config.cluster, detached=True)
        server = launcher._router_server(config, args.log_level, tracing, source)
        # Before the lifespan starts the ledger, which takes these over.
        server.config.app.state.tenancy.ledger.adopt_spools = [Path(p) for p in args.adopt]
        task = await launcher._start_router(server, sock, stop)
        if server.started:
            conn.send(("ready", os.getpid()))
        await launcher._until(stop, asyncio.shield(task))
        # Each process drains as a lone router does (router/api/drain.py).
        await launcher.stop_router(server, task, config.router.drain_timeout_s)
    finally:
        tracing.shutdown()
        if source is None:
            ray.shutdown()
        sock.close()


# -- the supervisor -----------------------------------------------------------------------------

class _Child:
    def __init__(self, args: ChildArgs):
        ctx = mp.get_context("spawn")
        self.index = args.index
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, args=(child_conn, args),
                                name=f"electron-router-{args.index}")
        self.proc.start()
        child_conn.close()  # EOF on ours when the child is gone
        self.ready = False

    def poll(self) -> tuple[str, Any] | None:
        """The child's message, if it sent one."""
        try:
            if self.conn.poll():
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        return None

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)  # type: ignore[arg-type]


async def supervise(config: Config, log_level: str = "info",
                    source: WorkerSource | None = None,
                    on_ready: Callable[[int, list[int]], None] | None = None) -> None:
    """Runs ``config.router.processes`` router processes on ``router.host:port`` until
    SIGINT/SIGTERM. ``source``: the workers (picklable; default: Ray's registry);
    ``on_ready(port, pids)`` once every process serves (bench/router_overhead.py)."""
    from cluster import launcher

    require_shared_limits(config)
    n = config.router.processes
    holder = bound_socket(config.router.host, config.router.port, reuse_port=True)
    port = holder.getsockname()[1]
    children: list[_Child] = []
    stop = launcher._stop_event()
    metrics_dir = None
    if n > 1 and not os.environ.get(MULTIPROC_DIR_ENV):  # inherited by the children at spawn
        metrics_dir = tempfile.mkdtemp(prefix="electron-router-metrics-")
        os.environ[MULTIPROC_DIR_ENV] = metrics_dir
    try:
        children_migrate = False
        if config.tenancy.migrate_on_start:
            from router.tenancy.sqldb import DatabaseUnavailable, database_of

            db = database_of(config.tenancy)
            try:
                await asyncio.to_thread(db.migrate)
            except DatabaseUnavailable as exc:  # start anyway: each child migrates once it
                log.error("the tenant database is unavailable (%s); the router processes "
                          "start and migrate the schema once it answers", exc.message)
                children_migrate = True
            finally:
                db.close()

        def start(index: int) -> _Child:
            adopt = tuple(str(p) for p in orphan_spools(config.tenancy.spool_path, n)) \
                if index == 0 else ()
            return _Child(ChildArgs(index, child_config(config, index, children_migrate),
                                    log_level, port, os.getpid(), source, adopt))

        children = [start(i) for i in range(n)]
        while not all(c.ready for c in children):  # startup: any failure fails the command
            if stop.is_set():
                return
            for c in children:
                message = c.poll()
                if message is not None and message[0] == "ready":
                    c.ready = True
                    print(f"router process {c.index} of {n} serving (pid {c.proc.pid})",
                          flush=True)
                elif message is not None or not c.proc.is_alive():
                    detail = message[1] if message is not None else \
                        f"exit code {c.proc.exitcode}"
                    raise StartupFailed(f"router process {c.index} failed to start: {detail}")
            await asyncio.sleep(POLL_S)
        print(launcher._banner(config, port, None).replace(
            "Electron Serve is up:", f"Electron Serve is up ({n} router processes):"),
            flush=True)
        if on_ready is not None:
            on_ready(port, [c.proc.pid for c in children])  # type: ignore[misc]
        restarts: list[float] = []
        while not stop.is_set():
            for i, c in enumerate(children):
                if c.proc.is_alive():
                    if not c.ready and (m := c.poll()) is not None and m[0] == "ready":
                        c.ready = True
                        print(f"router process {c.index} of {n} serving again (pid "
                              f"{c.proc.pid})", flush=True)
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
                if len(restarts) > MAX_RESTARTS:
                    raise StartupFailed(
                        f"router process {c.index} exited (code {c.proc.exitcode}): more than "
                        f"{MAX_RESTARTS} restarts within {RESTART_WINDOW_S:.0f} s, stopping")
                last = c.poll()  # its error, when it could send one
                log.error("router process %d (pid %s) exited with code %s%s: restarting it",
                          c.index, c.proc.pid, c.proc.exitcode,
                          f" ({last[1]})" if last is not None and last[0] == "error" else "")
                c.conn.close()
                children[i] = start(c.index)
            with contextlib.suppress(TimeoutError):
                await within(stop.wait(), POLL_S * 5)
    finally:
        await _stop_children(children)
        holder.close()
        if metrics_dir is not None:
            del os.environ[MULTIPROC_DIR_ENV]
            shutil.rmtree(metrics_dir, ignore_errors=True)


async def _stop_children(children: list[_Child]) -> None:
    """SIGTERM to each, then waits for all of them; SIGKILL if this wait is cancelled (a
    second Ctrl-C)."""
    for c in children:
        c.signal(signal.SIGTERM)
    try:
        while any(c.proc.is_alive() for c in children):
            await asyncio.sleep(POLL_S)
    finally:
        for c in children:
            c.signal(signal.SIGKILL)
            c.proc.join(5.0)
            c.conn.close()
