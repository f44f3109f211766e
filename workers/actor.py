"""The worker as a Ray actor: loads the model, serves gRPC, registers itself, heartbeats.

This module is imported by the launcher in the router's process (``electron-serve up``),
which must not load torch: the engine and torch are imported inside the actor only.

Lifecycle: ``__init__`` loads the engine, starts the gRPC server and registers the endpoint,
so a worker is in the registry before ``ready()`` can answer. Each heartbeat carries the whole
endpoint, so a restarted (empty) registry has it back at the next one; every registry call is
bounded by ``cluster.registry_timeout_s``. ``stop()`` undoes it in the reverse order.
``ray.kill`` (SIGKILL) skips ``stop()``; the registry's TTL then drops it.
An engine that fails (its thread died or a step stalled) makes the worker leave the registry
and stop heartbeating; ``health()`` says why, and the fleet (cluster/fleet.py) replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import RayActorError, RayError

from core.aio import within
from core.config import ClusterConfig, Config
from core.endpoints import REGISTRY_NAME, WorkerEndpoint
from core.heap import settle_heap
from core.logs import configure_logging
from core.telemetry import tracing_from_env

if TYPE_CHECKING:
    from workers.engine.async_engine import AsyncEngine
    from workers.grpc_service import WorkerServer
    from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)

WORKER_SERVICE_NAME = "electron-worker"  # OTEL_SERVICE_NAME overrides it
# The directory that holds the ``cluster`` and ``workers`` packages.
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
DISTRIBUTION = "electron-serve"
# Worker actors are named WORKER_ACTOR_PREFIX:<fleet>:<worker id> (``worker_actor_prefix``).
WORKER_ACTOR_PREFIX = "electron-worker"


def lookup_registry(namespace: str) -> ray.actor.ActorHandle | None:
    """The registry actor if it exists (None: nothing has registered in this namespace yet)."""
    try:
        return ray.get_actor(REGISTRY_NAME, namespace=namespace)
    except ValueError:  # Ray's way of saying "no actor by that name"
        return None


@ray.remote
class WorkerActor:
    # Ray runs ``async def __init__`` on the actor's event loop, where gRPC must live.
    async def __init__(self, config_json: str, worker_id: str):  # type: ignore[misc]
        import torch

        from workers.engine.async_engine import AsyncEngine
        from workers.grpc_service import serve_worker
        from workers.metrics import WorkerMetrics

        config = Config.model_validate_json(config_json)
        configure_logging("info", config.observability.log_format)
        # Before the gRPC server exists (docs/operations-notes.md, "OpenTelemetry: set up
        # tracing before any gRPC channel or server"); the OTEL_* variables reach this process
        # through Ray's environment (exported before `ray start`, or the pod's env).
        self._tracing = tracing_from_env(WORKER_SERVICE_NAME)
        self._config = config
        self._worker_id = worker_id
        cluster = config.cluster
        registry = lookup_registry(cluster.namespace)
        if registry is None:  # checked first: loading the model takes seconds
            raise RuntimeError(f"no registry actor in Ray namespace {cluster.namespace!r}: "
                               "the launcher creates it before starting workers")
        self._registry = registry
        if cluster.token is None:  # checked first too: the port must never serve without it
            raise RuntimeError("cluster.token is not set: a worker's gRPC port serves only "
                               "callers that present the cluster token")
        # Ray sets OMP_NUM_THREADS from num_cpus; an explicit setting wins over it.
        torch.set_num_threads(
            config.engine.torch_threads or max(1, round(cluster.num_cpus_per_worker)))
        self._engine: AsyncEngine = AsyncEngine(config.engine, worker_id,
                                                  model_id=config.router.model_id)
        host = _listen_host(config)
        self._metrics: WorkerMetrics = WorkerMetrics(self._engine, worker_id)
        self._engine.step_observer = self._metrics.observe_step
        metrics_port = self._metrics.serve(host, config.observability.worker_metrics_port)
        self._server: WorkerServer
        self._server, port = await serve_worker(
            self._engine, host, cluster.worker_port, model_id=config.router.model_id,
            pool=cluster.pool, tracing=self._tracing, metrics=self._metrics,
            token=cluster.token)
        self._endpoint = WorkerEndpoint(worker_id=worker_id, address=f"{host}:{port}",
                                        model=config.router.model_id, pool=cluster.pool,
                                        metrics_address=f"{host}:{metrics_port}")
        await self._registry_call(self._registry.register.remote(self._endpoint))
        self._stopped = False
        loop = asyncio.get_running_loop()
        self._heartbeats = loop.create_task(self._heartbeat_loop())
        self._leaving: asyncio.Task[None] | None = None
        self._engine.add_failure_listener(
            lambda reason: loop.call_soon_threadsafe(self._on_engine_failure))
        log.info("worker %s ready at %s", worker_id, self._endpoint.address)
        settle_heap()  # the engine is loaded: what is alive now lives as long as this process

    async def health(self) -> str | None:
        """None while the worker serves; else why its engine failed (the fleet replaces it)."""
        return self._engine.failure

    async def _registry_call(self, ref: Any) -> Any:
        """A registry call's result; TimeoutError past ``cluster.registry_timeout_s``."""
        return await within(ref, self._config.cluster.registry_timeout_s)

    def _on_engine_failure(self) -> None:
        """Leaves the registry (routers stop picking it at their next poll; its gRPC health
        already says NOT_SERVING) and stops heartbeating, so it cannot come back."""
        if self._stopped or self._leaving is not None:
            return
        self._heartbeats.cancel()
        self._leaving = asyncio.get_running_loop().create_task(self._leave_registry())

    async def _leave_registry(self) -> None:
        try:
            await self._registry_call(self._registry.deregister.remote(self._worker_id))
        except (RayError, TimeoutError) as exc:  # its TTL drops it anyway
            log.warning("worker %s: could not leave the registry: %s", self._worker_id, exc)

    async def ready(self) -> str:
        """The gRPC address (host:port); answers once the worker serves and is registered."""
        return self._endpoint.address

    async def info(self) -> dict[str, Any]:
        engine = self._engine
        load = engine.load()
        return {
            "worker_id": self._worker_id, "address": self._endpoint.address,
            "metrics_address": self._endpoint.metrics_address,
            "model": self._endpoint.model, "pool": self._endpoint.pool,
            "engine_model": engine.model_name, "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(), "block_size": engine.block_size,
            "max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
            "running": load.running, "waiting": load.waiting,
            "waiting_prefill_tokens": load.waiting_prefill_tokens,
            "kv_blocks_used": load.kv_blocks_used, "kv_blocks_total": load.kv_blocks_total,
            "ttft_p90_s": self._server.ttft_p90_s(), "draining": self._endpoint.draining,
            "engine_failure": engine.failure,
        }

    async def drain(self) -> None:
        """Marks this worker draining in the registry: routers stop sending it requests and
        purge it from their prefix index; the ones it runs go on. (Heartbeats re-register
        the same endpoint, so the mark survives a registry restart.) ``stop()`` follows."""
        if not self._endpoint.draining:
            self._endpoint = dataclasses.replace(self._endpoint, draining=True)
            await self._registry_call(self._registry.register.remote(self._endpoint))
            log.info("worker %s draining", self._worker_id)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Leaves the registry, drains gRPC for up to ``grace_s`` seconds, stops the engine."""
        if self._stopped:
            return
        self._stopped = True
        self._heartbeats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._heartbeats
        try:
            await self._registry_call(self._registry.deregister.remote(self._worker_id))
        except (RayActorError, TimeoutError):
            # The registry is gone (its owner is shutting down) or restarting: its TTL drops
            # this worker, and routers drop it when its state stream ends below.
            log.warning("worker %s: registry unreachable at stop", self._worker_id)
        await self._server.stop(grace_s)
        # The engine thread ends every open stream and joins: not on the event loop.
        await asyncio.to_thread(self._engine.shutdown)
        self._metrics.stop()
        # Export the spans still buffered: ray.kill (which follows) is SIGKILL.
        await asyncio.to_thread(self._tracing.shutdown)
        log.info("worker %s stopped", self._worker_id)

    async def flush_traces(self) -> None:
        """Exports the spans buffered so far (tests, before reading a receiver)."""
        if self._tracing.provider is not None:
            await asyncio.to_thread(self._tracing.provider.force_flush)

    async def _heartbeat_loop(self) -> None:
        cluster = self._config.cluster
        while True:
            await asyncio.sleep(cluster.heartbeat_s)
            try:
                known = await self._registry_call(
                    self._registry.heartbeat.remote(self._endpoint))
                if not known:
                    # It was unknown: the registry restarted, or this worker stalled past the
                    # TTL. The heartbeat registered it again.
                    log.info("worker %s registered again", self._worker_id)
            except (RayError, TimeoutError) as exc:
                # Ray restarts the registry under the same handle; keep trying (routers keep
                # this worker through the gap while its state stream is alive).
                log.warning("worker %s: heartbeat failed: %s", self._worker_id,
                            exc or type(exc).__name__)


def _listen_host(config: Config) -> str:
    """Where the gRPC server listens, which is also the address routers dial.

    Without a Ray address everything runs on this machine (``electron-serve up``, tests):
    listen on loopback, so the worker port (which asks for the cluster token all the same:
    other users of the machine reach loopback) is not exposed to the network.
    In a cluster, routers on other nodes dial the node's own address.
    """
    if config.cluster.ray_address is None:
        return "127.0.0.1"
    return ray.util.get_node_ip_address()


def worker_actor_prefix(cluster: ClusterConfig) -> str:
    """What the names of ``cluster.fleet``'s worker actors start with (then the worker id)."""
    return f"{WORKER_ACTOR_PREFIX}:{cluster.fleet}:"


def find_worker_actors(cluster: ClusterConfig) -> dict[str, ray.actor.ActorHandle]:
    """The live worker actors of ``cluster.fleet`` in ``cluster.namespace``, by worker id:
    what a controller that starts adopts (its predecessor's detached workers)."""
    prefix = worker_actor_prefix(cluster)
    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if entry["namespace"] != cluster.namespace or not name.startswith(prefix):
            continue
        try:
            found[name.removeprefix(prefix)] = ray.get_actor(name, namespace=cluster.namespace)
        except ValueError:  # it died since it was listed
            continue
    return found


def create_worker_actor(config: Config, worker_id: str, *,
                        detached: bool = False) -> ray.actor.ActorHandle:
    """Starts one worker actor (Ray is initialised and the registry exists).

    ``detached``: it outlives the process that starts it (`electron-serve worker`: the next
    controller of its fleet adopts it, ``find_worker_actors``); otherwise it dies with it
    (`electron-serve up`, tests)."""
    cluster = config.cluster
    options: dict[str, Any] = dict(
        name=worker_actor_prefix(cluster) + worker_id, namespace=cluster.namespace,
        num_cpus=cluster.num_cpus_per_worker, num_gpus=_num_gpus(config), max_restarts=0,
        # One worker per node while nodes with room remain: a lost node then takes as few
        # workers with it as it can (Ray's default packs a node before using the next).
        scheduling_strategy="SPREAD")
    if detached:
        options["lifetime"] = "detached"
    if cluster.worker_resources:  # e.g. the custom resource of its pool's node group
        options["resources"] = dict(cluster.worker_resources)
    runtime_env = _runtime_env()
    if runtime_env is not None:
        options["runtime_env"] = runtime_env
    return WorkerActor.options(**options).remote(config.model_dump_json(), worker_id)


def _num_gpus(config: Config) -> float:
    """One GPU per worker on GPU nodes. Ray hides GPUs from an actor that asks for none, so
    a worker with device "auto" asks for one whenever the cluster has any."""
    if config.cluster.num_gpus_per_worker > 0:
        return config.cluster.num_gpus_per_worker
    device = config.engine.device
    if device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0):
        return 1
    return 0


def _runtime_env() -> dict[str, Any] | None:
    """A runtime env only when Ray's worker processes could not import this package.

    An installed (also editable) package or PYTHONPATH exported before Ray started needs
    none; a runtime env costs ~1 s per actor (no prestarted worker reuse).
    """
    try:
        importlib.metadata.distribution(DISTRIBUTION)
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if PACKAGE_ROOT in paths:
        return None
    return {"env_vars": {"PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, *filter(None, paths)])}}
