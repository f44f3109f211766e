"""Who may send a request, and what it costs: authentication, plan limits, shedding and the
usage ledger, in the order a request meets them.

``Tenancy.authenticate`` turns ``Authorization: Bearer <key>`` into a ``Principal`` (static
keys from the config; database keys through a cache of ``key_cache_ttl_s``, so a key is
looked up once per TTL, not once per request). A key not of the shape keys are made in never
reaches the database; an unknown key is remembered too (a bounded negative cache), so a
client repeating a wrong key costs no lookup. While the database is unavailable a key seen
before keeps working (its expired entry is used) and an unknown one gets a fast 503: the
lookup is bounded by the connect timeout, and the database then fails at once for a moment
(``Database.mark_down``). Revocation must act at once even inside the TTL: the limiter holds
the revoked set (in Redis, shared by every replica; or in process), and every request
checks it, in the same round trip as its limits for chat requests.

``Tenancy.admit`` sheds a request when the queues of its pool's workers (as they report
them, plus this router's requests there not yet started) are longer than its plan tolerates
(lower-priority plans tolerate less, so they are shed first), then takes an RPM
entry and a concurrency slot. Once the request is tokenized, ``Admission.reserve`` reserves
its whole budget (prompt + n x max tokens) against the plan's tokens per minute; ``finish``
settles the reservation to the tokens used. The ``Admission`` is finished exactly once, by the
request's lifecycle (router/api/lifecycle.py), however the request ends (``finish`` is
idempotent): the slot goes back and the ledger gets its row, keyed by the server's id for
the request, with the tokens the request's usage count billed.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from core.config import Config
from core.errors import (
    AuthenticationFailed,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
)
from router.routing.load import queued_requests
from router.tenancy.ledger import PROVISIONAL_STATUS, Ledger, Prices, UsageRow
from router.tenancy.limits import Limiter, Slot, make_limiter
from router.tenancy.sqldb import DatabaseUnavailable, database_of
from router.tenancy.store import (
    ADMIN_TENANT,
    ANONYMOUS_TENANT,
    KEY_PREFIX,
    Plan,
    Principal,
    Tenant,
    TenantStore,
    hash_key,
)
from router.tenancy.terms import TenantTerms

log = logging.getLogger(__name__)

SHED_RETRY_AFTER_S = 2.0
# The shape of every key store.new_key makes: anything else is refused without a lookup.
_KEY_SHAPE = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{43}")
KEY_CACHE_SIZE = 100_000        # keys found (their principals)
UNKNOWN_KEY_CACHE_SIZE = 10_000  # keys not found
# A key is 256 random bits, known to nobody before it is made: one not found now (or revoked)
# will not be found later either, so unknown keys may be remembered long.
UNKNOWN_KEY_TTL_S = 300.0


class _Lru:
    """A bounded map, least recently used out first; entries keep their expiry."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: collections.OrderedDict[str, tuple[object, float]] = \
            collections.OrderedDict()

    def get(self, key: str) -> tuple[object, float] | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, value: object, expires: float) -> None:
        self._items[key] = (value, expires)
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def pop(self, key: str) -> None:
        self._items.pop(key, None)

    def items(self) -> list[tuple[str, tuple[object, float]]]:
        return list(self._items.items())

    def __len__(self) -> int:
        return len(self._items)


def bearer_key(header: str | None) -> str:
    if not header:
        raise AuthenticationFailed(
            "You didn't provide an API key. Provide it in an Authorization header using "
            "Bearer auth (Authorization: Bearer YOUR_KEY).")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationFailed("The Authorization header must be 'Bearer YOUR_KEY'.")
    return key


def _matches_any(key: str, known: tuple[str, ...]) -> bool:
    # Compare against every key, in constant time each: no early exit on a prefix match.
    raw = key.encode()
    return any([hmac.compare_digest(raw, k.encode()) for k in known])


@dataclass(eq=False)
class Admission:
    """One admitted chat request: its terms for the worker and its slot."""

    principal: Principal | None
    terms: TenantTerms
    model: str           # the served model id (validated before admission)
    request_id: str      # the server's id for the request: the ledger row's key
    client_request_id: str | None  # the client's X-Request-Id, if it sent one
    _slot: Slot | None
    _tenancy: Tenancy = field(repr=False)
    started_at: float = field(default_factory=time.time)
    _finished: bool = field(default=False, repr=False)
    # The request's usage so far (prompt billed, cached, completion tokens), set by its
    # lifecycle: what its provisional ledger row bills if the router dies with it open.
    progress: Callable[[], tuple[int, int, int]] = field(default=lambda: (0, 0, 0),
                                                         repr=False)

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers of an admitted request."""
        return self._slot.verdict.headers() if self._slot is not None else {}

    async def reserve(self, tokens: int) -> None:
        """Reserves ``tokens`` (the request's budget: prompt + n x max tokens) against the
        plan's tokens per minute, or ``RateLimited``; ``finish`` settles it to the tokens
        used."""
        if self._slot is not None:
            await self._slot.reserve(tokens)

    def finish(self, status: str, prompt_tokens: int, cached_tokens: int,
               completion_tokens: int) -> None:
        """Releases the slot and writes the ledger row, once (later calls do nothing).
        ``status``: "ok", "incomplete", "disconnected" or "error"."""
        if self._finished:
            return
        self._finished = True
        if self._slot is not None:
            self._slot.release(prompt_tokens + completion_tokens)
        self._tenancy.ledger.record(self._row(status, prompt_tokens, cached_tokens,
                                              completion_tokens))

    def provisional_row(self) -> UsageRow:
        """The row of what it used so far, should the router die before ``finish``."""
        return self._row(PROVISIONAL_STATUS, *self.progress())

    def _row(self, status: str, prompt_tokens: int, cached_tokens: int,
             completion_tokens: int) -> UsageRow:
        principal = self.principal
        return UsageRow(
            request_id=self.request_id, client_request_id=self.client_request_id,
            tenant_id=principal.tenant_id if principal else ANONYMOUS_TENANT,
            key_id=principal.key_id if principal else None, model=self.model,
            prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
            completion_tokens=completion_tokens,
            cost=self._tenancy.prices.cost(prompt_tokens, cached_tokens, completion_tokens),
            status=status, started_at=self.started_at, finished_at=time.time())


class Tenancy:
    def __init__(self, config: Config, pool) -> None:
        """``pool`` is the ``router.fleet.pool.WorkerPool`` whose queues shedding reads."""
        self.config = config
        self.enabled = config.auth.enabled
        tenancy = config.tenancy
        self.db = database_of(tenancy)
        self.store = TenantStore.for_config(self.db, config)
        self.limiter: Limiter = make_limiter(
            tenancy.redis_url, prefix=tenancy.redis_prefix, slot_lease_s=tenancy.slot_lease_s,
            revoked_of=self._revoked_key_ids)
        self.ledger = Ledger(self.db, tenancy.spool_path, flush_s=tenancy.ledger_flush_s,
                             batch=tenancy.ledger_batch)
        self.prices = Prices(Decimal(tenancy.price_input), Decimal(tenancy.price_cached_input),
                             Decimal(tenancy.price_output))
        self._pool = pool
        self._migrator: asyncio.Task[None] | None = None
        self._cache = _Lru(KEY_CACHE_SIZE)               # digest -> (principal, expiry)
        self._unknown = _Lru(UNKNOWN_KEY_CACHE_SIZE)     # digest -> (None, expiry)
        auth = config.auth
        self._static = None
        if auth.static_keys:
            plan = self.plan(auth.static_plan)
            self._static = Principal(auth.static_tenant, "static", plan,
                                     "tenant:" + auth.static_tenant, None)

    # -- lifecycle

    async def start(self) -> None:
        """Starts whether or not the database and Redis answer (see ``RedisLimiter.start``):
        a database down at start leaves the schema to migrate once it answers, the ledger's
        rows waiting in its spool meanwhile."""
        if self.config.tenancy.migrate_on_start:
            try:
                await asyncio.to_thread(self.db.migrate)
            except DatabaseUnavailable as exc:
                log.error("the tenant database is unavailable at start (%s): static keys "
                          "are served, other keys get 503 until it answers; ledger rows "
                          "wait in the spool; the schema is migrated once it answers",
                          exc.message)
                self.ledger.paused = True
                self._migrator = asyncio.create_task(self._migrate_when_up(),
                                                     name="migrate-when-up")
        await self.limiter.start()
        await self.ledger.start()

    async def _migrate_when_up(self) -> None:
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            try:
                await asyncio.to_thread(self.db.migrate)
            except DatabaseUnavailable:
                delay = min(delay * 2, 10.0)
                continue
            log.info("the tenant database answers: schema migrated, ledger resumed")
            self.ledger.resume()
            return

    async def stop(self) -> None:
        if self._migrator is not None:
            self._migrator.cancel()
            await asyncio.gather(self._migrator, return_exceptions=True)
        try:
            await self.ledger.stop()
        finally:
            await self.limiter.stop()
            await asyncio.to_thread(self.db.close)

    # -- plans and principals

    def plan(self, name: str) -> Plan:
        plan = self.config.tenancy.plan(name)
        if plan is None:
            raise PermissionDenied(f"plan {name!r} is not defined on this deployment")
        return Plan.of(name, plan)

    def principal_of(self, tenant: Tenant, key_id: str | None) -> Principal:
        models = frozenset(tenant.allowed_models) if tenant.allowed_models else None
        return Principal(tenant.tenant_id, key_id, self.plan(tenant.plan),
                         tenant.effective_salt, models, tenant.pool)

    # -- authentication

    async def authenticate(self, header: str | None, *, check_revoked: bool = True
                           ) -> Principal | None:
        """The principal of an ``Authorization`` header (None while auth is off)."""
        if not self.enabled:
            return None
        key = bearer_key(header)
        admin = self.config.auth.admin_key
        if admin and _matches_any(key, (admin,)):
            return Principal(ADMIN_TENANT, "admin", self.plan(self.config.auth.static_plan), "",
                             None, is_admin=True)
        if self._static is not None and _matches_any(key, self.config.auth.static_keys):
            return self._static
        if not _KEY_SHAPE.fullmatch(key):
            raise AuthenticationFailed("Incorrect API key provided.")
        digest = hash_key(key)
        now = time.monotonic()
        unknown = self._unknown.get(digest)
        if unknown is not None and unknown[1] > now:
            raise AuthenticationFailed("Incorrect API key provided.")
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            principal = cached[0]
        else:
            principal = await self._look_up(key, digest, cached)
        assert isinstance(principal, Principal)
        if check_revoked and await self.limiter.is_revoked(principal.tenant_id,
                                                           principal.key_id or ""):
            raise AuthenticationFailed("Incorrect API key provided: this key was revoked.")
        return principal

    async def _look_up(self, key: str, digest: str,
                       stale: tuple[object, float] | None) -> Principal:
        """The key's principal from the database; while the database is unavailable, the
        expired entry of a key seen before (revocation is still checked in the limiter),
        else a fast 503."""
        ttl = self.config.auth.key_cache_ttl_s
        try:
            self.db.check_up()
            async with asyncio.timeout(self.db.connect_timeout_s):
                found = await asyncio.to_thread(self.store.lookup, key)
        except (DatabaseUnavailable, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):  # the next callers fail at once for a moment
                self.db.mark_down("a key lookup timed out")
                exc = DatabaseUnavailable("a key lookup timed out")
            if stale is not None:
                log.warning("tenant database unavailable; using the cached key entry")
                return stale[0]  # type: ignore[return-value]
            raise exc from None
        now = time.monotonic()
        if found is None:
            self._cache.pop(digest)
            self._unknown.put(digest, None, now + UNKNOWN_KEY_TTL_S)
            raise AuthenticationFailed("Incorrect API key provided.")
        principal = self.principal_of(found[0], found[1].key_id)
        self._cache.put(digest, principal, now + ttl)
        return principal

    async def revoke_key(self, key_id: str) -> None:
        """Revokes in the database (where it lasts) and, at once, on every replica."""
        record = await asyncio.to_thread(self.store.revoke_key, key_id)
        await self.limiter.revoke(record.tenant_id, key_id)
        for digest, (principal, _) in self._cache.items():
            if getattr(principal, "key_id", None) == key_id:
                self._cache.pop(digest)

    async def _revoked_key_ids(self, tenant_id: str) -> list[str]:
        """The tenant's revoked keys, from the database (bounded by its timeouts)."""
        self.db.check_up()
        try:
            async with asyncio.timeout(self.db.connect_timeout_s + self.db.statement_timeout_s):
                return await asyncio.to_thread(self.store.revoked_key_ids, tenant_id)
        except TimeoutError:
            self.db.mark_down("loading revoked keys timed out")
            raise DatabaseUnavailable("loading revoked keys timed out") from None

    # -- admission

    async def admit(self, principal: Principal | None, model: str, request_id: str,
                    client_request_id: str | None = None, sequences: int = 1) -> Admission:
        """``model`` is the served model id (the request's, validated before); ``request_id``
        the server's id for the request; ``sequences`` its n, each a slot of the plan's
        concurrency."""
        if principal is None:
            return self._admitted(Admission(None, TenantTerms(), model, request_id,
                                            client_request_id, None, self))
        if principal.is_admin:
            raise PermissionDenied("the admin key manages tenants; it cannot send requests")
        if not principal.may_use(model):
            raise PermissionDenied(f"your plan does not include the model '{model}'",
                                   param="model")
        if sequences > principal.plan.concurrency:
            raise InvalidRequest(
                f"n ({sequences}) exceeds the {principal.plan.concurrency} sequences your "
                f"plan may have in flight at once", param="n")
        self._shed(principal.plan, principal.pool)
        slot = await self.limiter.admit(principal, sequences)
        plan = principal.plan
        terms = TenantTerms(priority=plan.priority, cache_salt=principal.cache_salt,
                            max_context=plan.max_context, pool=principal.pool)
        return self._admitted(Admission(principal, terms, model, request_id,
                                        client_request_id, slot, self))

    def _admitted(self, admission: Admission) -> Admission:
        self.ledger.open(admission.request_id, admission.provisional_row)
        return admission

    def _shed(self, plan: Plan, pool: str | None) -> None:
        """503 when the queues of the workers that would serve the request (its tenant's
        pool, or the shared pool it falls back to) are past what ``plan`` tolerates:
        lower-priority plans tolerate shorter queues, so they are shed first and queues stay
        bounded. A queue is what waits there (``queued_requests``): another pool's load,
        and streams the worker finished that are still being delivered, do not count."""
        workers = self._pool.pool_workers(pool)
        if not workers:
            return
        waiting = sum(queued_requests(w) for w in workers)
        if waiting >= plan.shed_queue_per_worker * len(workers):
            raise Overloaded(f"The service is at capacity for the {plan.name} plan; retry "
                             "shortly.", retry_after=SHED_RETRY_AFTER_S)
