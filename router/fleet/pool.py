"""The live workers of one model, kept in step with a ``WorkerSource``.

Every ``poll_s`` the pool lists the source's workers, connects the new ones (in background
tasks: one slow worker never delays the others) and closes the ones that left.

A registry gap drops nothing: when the source cannot answer, or answers with
``IncompleteListing`` (a restarted registry still being rebuilt by heartbeats,
cluster/registry.py), the connected workers it does not list are marked stale
(``stale_workers``) and keep serving; each leaves only when its own state stream breaks
(below) or a complete listing leaves it out. A worker
whose state stream breaks leaves routing at once (``WorkerClient.on_broken``), without
waiting for the source to notice: a stopped or killed worker stops receiving requests as soon
as its connection reports it, well inside 2 s. If the source still lists it, the next poll
tries to connect it again, and it is back as soon as it answers.

Routing: ``acquire`` asks the policy to choose among the connected workers whose circuit
breaker admits them (all of them, if the breaker would leave none: a breaker must not turn a
partial outage into a full one), counts the request there at once, and logs the decision
with its reason. The returned ``Lease`` reports the outcome: ``started`` (first token: the
worker works), ``failed`` (it failed: the breaker counts it), ``release`` (the request is
over). A request that never started there makes the policy forget its record of the
assignment (kv_aware's pending blocks).

The workers' state streams feed one ``PrefixIndex``; a worker that leaves routing is purged
from it, from the policy and from the breaker at once.

Pools: each worker belongs to one named pool (``WorkerEndpoint.pool``). A request names
the pool of its tenant (None: the shared pool, ``shared_pool``) and is routed only to that
pool's workers; a pool listed in ``fallback_pools`` borrows the shared pool's workers while
it has none of its own. A worker the registry marks draining (the autoscaler retires it)
leaves routing like one that left the registry: no new requests, its prefix-index entries
purged, its running requests left to finish.

Ready means: at least one worker is connected.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from core.config import RouterConfig
from core.endpoints import IncompleteListing
from core.errors import NoWorkers, WorkerUnavailable
from core.hashing import block_hashes, extra_key
from core.telemetry import DISABLED, Tracing
from router.fleet.breaker import CircuitBreaker
from router.fleet.client import WorkerClient
from router.routing.load import Assignment
from router.routing.policy import Choice, RequestInfo, RoutingPolicy
from router.routing.prefix_index import PrefixIndex
from router.telemetry import observe

log = logging.getLogger(__name__)
# One line per routing decision, with its reason (INFO; silence this logger to drop them).
decisions = logging.getLogger("router.routing")

# A worker that left routing may still be finishing requests (a graceful stop ends its state
# stream first): its channel stays open this long for them before it is closed.
DRAIN_GRACE_S = 60.0


class Outcome(enum.Enum):
    STARTED = "started"  # the first token arrived
    FAILED = "failed"    # the worker failed it (WorkerUnavailable)


@dataclass(eq=False)
class Lease:
    """One request's claim on a worker: counted in its ``in_flight`` until released.
    ``started``, ``failed`` and ``release`` are idempotent."""

    worker: WorkerClient
    choice: Choice[WorkerClient]
    _pool: WorkerPool = field(repr=False)
    _assignment: Assignment = field(repr=False)
    _outcome: Outcome | None = field(default=None, repr=False)
    _released: bool = field(default=False, repr=False)

    @property
    def reason(self) -> str:
        return self.choice.reason

    def started(self) -> None:
        """The first token arrived: its prefill is done and the worker served it."""
        if self._outcome is None:
            self._outcome = Outcome.STARTED
            self._assignment.started()
            self._pool.breaker.succeeded(self.worker.worker_id)

    def failed(self) -> None:
        """The worker failed the request (``WorkerUnavailable``)."""
        if self._outcome is Outcome.FAILED:
            return
        first = self._outcome is None
        self._outcome = Outcome.FAILED
        self._pool.breaker.failed(self.worker.worker_id)
        if first:  # it never ran there: its pending blocks will not appear
            self._pool.policy.forget(self.choice)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._assignment.finish()
        if self._outcome is None:
            # Ended before its first token (rejected, or the client left): no verdict on the
            # worker, and whatever it did cache its KV events will report.
            self._pool.breaker.abandoned(self.worker.worker_id)
            self._pool.policy.forget(self.choice)


class WorkerPool:
    def __init__(self, source, *, model_id: str, poll_s: float, policy: RoutingPolicy,
                 index: PrefixIndex | None = None, breaker: CircuitBreaker | None = None,
                 tracing: Tracing = DISABLED, shared_pool: str = "default",
                 fallback_pools: Collection[str] = (), token: str | None = None):
        """``source`` is a ``cluster.registry.WorkerSource``; only workers serving
        ``model_id`` are used. ``index`` is the prefix index the policy reads (None: a new
        one); ``breaker`` defaults to one with the router's default settings; ``tracing`` traces the Generate
        calls. ``shared_pool`` serves requests that name no pool; pools in
        ``fallback_pools`` fall back to it. ``token`` is the cluster token the workers ask of
        every call (``core.cluster_token``)."""
        self._source = source
        self.shared_pool = shared_pool
        self._fallback_pools = frozenset(fallback_pools)
        self._model_id = model_id
        self._poll_s = poll_s
        self.policy = policy
        self.index = index if index is not None else PrefixIndex()
        if breaker is None:
            defaults = RouterConfig()
            breaker = CircuitBreaker(defaults.breaker_failures, defaults.breaker_open_s)
        self.breaker = breaker
        self._tracing = tracing
        self._token = token
        # The workers' KV block size (from GetInfo; one per deployment): None until one is
        # connected.
        self.block_size: int | None = None
        self._workers: dict[str, WorkerClient] = {}
        self._connecting: dict[str, asyncio.Task[None]] = {}
        # Workers that left routing, closing once their last requests end (or the grace).
        self._draining: dict[WorkerClient, asyncio.Task[None]] = {}
        # Workers whose last connect failed or that serve another model: logged once.
        self._quiet: set[str] = set()
        # Connected workers the source did not confirm at its last answer (a registry gap).
        self._stale: set[str] = set()
        self._gap: str | None = None  # why the source's last answer was not complete
        self._poll_task: asyncio.Task[None] | None = None

    # -- lifecycle

    async def start(self) -> None:
        """Connects the workers listed now (waiting for them), then keeps polling."""
        try:
            await self._refresh()
        except Exception:
            log.exception("listing workers failed; retrying every %.1f s", self._poll_s)
        if self._connecting:
            await asyncio.wait(list(self._connecting.values()))
        self._poll_task = asyncio.create_task(self._poll_loop(), name="worker-pool-poll")

    async def stop(self) -> None:
        tasks = [t for t in (self._poll_task, *self._connecting.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        draining = list(self._draining.items())
        for _, task in draining:
            task.cancel()
        await asyncio.gather(*(task for _, task in draining), return_exceptions=True)
        workers = [*self._workers.values(), *(worker for worker, _ in draining)]
        self._workers = {}
        # Closing at once cancels whatever still runs (a draining close resumes here).
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)

    # -- routing

    @property
    def ready(self) -> bool:
        return bool(self._workers)

    def workers(self) -> list[WorkerClient]:
        return sorted(self._workers.values(), key=lambda w: w.worker_id)

    def stale_workers(self) -> list[str]:
        """Connected workers kept through a registry gap, not confirmed since."""
        return sorted(self._stale)

    def request_info(self, request_id: str, prompt_token_ids: Sequence[int], *,
                     cache_salt: str = "", text: str = "") -> RequestInfo:
        """What the policy needs to know about a request: its block hashes (computed as the
        workers compute them: the tenant's salt and the public model id in the extra key)
        when the policy uses them and a worker has told the block size."""
        hashes: tuple[int, ...] = ()
        block_size = self.block_size or 0
        if self.policy.uses_block_hashes and block_size:
            hashes = tuple(block_hashes(prompt_token_ids, block_size,
                                        extra_key(cache_salt, self._model_id)))
        return RequestInfo(request_id, len(prompt_token_ids), block_hashes=hashes,
                           block_size=block_size, text=text if self.policy.uses_text else "")

    def pool_workers(self, pool: str | None = None) -> list[WorkerClient]:
        """The connected workers that may serve a request of ``pool`` (None: shared)."""
        name = pool or self.shared_pool
        own = [w for w in self.workers() if w.pool == name]
        if not own and name != self.shared_pool and name in self._fallback_pools:
            return [w for w in self.workers() if w.pool == self.shared_pool]
        return own

    def model_limits(self, pool: str | None = None) -> tuple[int, int]:
        """``(max_model_len, vocab_size)`` of the model as ``pool``'s workers serve it (the
        smallest any of them reports), so a request is checked before a worker is reserved.
        NoWorkers when none is connected."""
        infos = [w.info for w in self.pool_workers(pool) if w.info is not None]
        if not infos:
            raise self._no_workers(pool)
        return min(i.max_model_len for i in infos), min(i.vocab_size for i in infos)

    def _no_workers(self, pool: str | None) -> NoWorkers:
        where = f" in pool {pool!r}" if pool and pool != self.shared_pool else ""
        return NoWorkers(f"no worker{where} is serving model {self._model_id!r}; retry shortly")

    def acquire(self, request: RequestInfo, exclude: Collection[str] = (),
                pool: str | None = None) -> Lease:
        """Chooses a worker of ``pool`` (None: the shared pool), not one in ``exclude``, and
        counts the request there at once."""
        members = self.pool_workers(pool)
        candidates = [w for w in members if w.worker_id not in exclude]
        if not candidates:
            if exclude and members:
                raise WorkerUnavailable("no other worker is available to retry on")
            raise self._no_workers(pool)
        admitted = [w for w in candidates if self.breaker.admits(w.worker_id)]
        note = ""
        if not admitted:
            admitted, note = candidates, " (every candidate's circuit is open: trying anyway)"
        with observe.span("route") as route_span:
            choice = self.policy.choose(admitted, request)
            observe.routed(self.policy.name, choice, request.num_prompt_tokens, len(admitted),
                           route_span)
        worker = choice.worker
        assignment = worker.local.assign(choice.prefill_tokens)
        self.breaker.dispatched(worker.worker_id)
        kept_out = len(candidates) - len(admitted)
        decisions.info("request %s -> worker %s: %s%s%s", request.request_id, worker.worker_id,
                       choice.reason, f" circuit_open={kept_out}" if kept_out else "", note)
        return Lease(worker, choice, self, assignment)

    # -- keeping in step with the source

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            await self._poll()

    async def _poll(self) -> None:
        try:
            await self._refresh()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Keep serving the workers we know; the source may answer next time.
            self._in_gap(f"listing workers failed: {type(exc).__name__}: {exc}", {})
            log.debug("listing workers failed", exc_info=exc)

    def _in_gap(self, why: str, listed: dict[str, object]) -> None:
        """The source's answer may leave live workers out: the unlisted ones are stale."""
        if self._gap is None:
            log.warning("worker registry gap (%s): keeping the %d connected worker(s)", why,
                        len(self._workers))
        self._gap = why
        self._stale = {w for w in self._workers if w not in listed}

    async def _refresh(self) -> None:
        try:
            endpoints = await self._source.list_workers()
            complete, why = True, ""
        except IncompleteListing as gap:
            endpoints, complete, why = gap.workers, False, str(gap)
        listed = {e.worker_id: e for e in endpoints}
        if complete:
            if self._gap is not None:
                log.info("worker registry answers again: %d worker(s) listed", len(listed))
            self._gap = None
        for worker in list(self._workers.values()):
            endpoint = listed.get(worker.worker_id)
            if endpoint is None:
                if complete:
                    self._drop(worker, "it left the registry")
            elif endpoint.address != worker.address:
                self._drop(worker, "it left the registry")
            elif getattr(endpoint, "draining", False):
                self._drop(worker, "it is draining")
        if complete:
            self._stale.clear()
        else:
            self._in_gap(why, listed)
        for worker_id, task in list(self._connecting.items()):
            endpoint = listed.get(worker_id)
            if (endpoint is None and complete) or getattr(endpoint, "draining", False):
                task.cancel()
        for worker_id, endpoint in listed.items():
            if (worker_id in self._workers or worker_id in self._connecting
                    or getattr(endpoint, "draining", False)):
                continue
            if endpoint.model != self._model_id:
                if worker_id not in self._quiet:
                    self._quiet.add(worker_id)
                    log.info("worker %s serves %r, not %r: not used", worker_id,
                             endpoint.model, self._model_id)
                continue
            task = asyncio.create_task(self._connect(endpoint), name=f"connect-{worker_id}")
            self._connecting[worker_id] = task
            task.add_done_callback(lambda _, w=worker_id: self._connecting.pop(w, None))

    async def _connect(self, endpoint) -> None:
        client = WorkerClient(endpoint, index=self.index, on_broken=self._on_broken,
                              tracing=self._tracing, token=self._token)
        try:
            info = await client.connect()
        except WorkerUnavailable as exc:
            await client.close()
            if endpoint.worker_id not in self._quiet:
                self._quiet.add(endpoint.worker_id)
                log.warning("cannot connect worker %s at %s (retrying each poll): %s",
                            endpoint.worker_id, endpoint.address, exc.message)
            return
        except BaseException:
            await asyncio.shield(client.close())
            raise
        if info.model != self._model_id:
            await client.close()
            log.warning("worker %s says it serves %r, not %r: not used", endpoint.worker_id,
                        info.model, self._model_id)
            return
        if client.broken:
            await client.close()
            return
        self._quiet.discard(endpoint.worker_id)
        if self.block_size is None:
            self.block_size = info.block_size
        elif info.block_size != self.block_size:
            # Its block hashes never match the router's: routable, but never for its cache.
            log.warning("worker %s uses block size %d, not the deployment's %d: its cache is "
                        "invisible to routing", endpoint.worker_id, info.block_size,
                        self.block_size)
        self._workers[endpoint.worker_id] = client
        log.info("worker %s at %s connected (max_model_len=%d, block_size=%d)",
                 endpoint.worker_id, endpoint.address, info.max_model_len, info.block_size)

    def _on_broken(self, worker: WorkerClient) -> None:
        if self._workers.get(worker.worker_id) is worker:
            self._drop(worker, "its state stream broke")

    def _drop(self, worker: WorkerClient, why: str) -> None:
        del self._workers[worker.worker_id]
        self._stale.discard(worker.worker_id)
        log.info("worker %s leaves routing: %s", worker.worker_id, why)
        worker.cached_blocks.leave()
        self.policy.remove_worker(worker.worker_id)
        self.breaker.remove(worker.worker_id)
        task = asyncio.create_task(worker.close(grace=DRAIN_GRACE_S),
                                   name=f"close-{worker.worker_id}")
        self._draining[worker] = task
        task.add_done_callback(lambda _: self._draining.pop(worker, None))
