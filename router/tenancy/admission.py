"""Who may send a request, and what it costs: authentication, plan limits, shedding and the
usage ledger, in the order a request meets them.

``Tenancy.authenticate`` turns ``Authorization: Bearer <key>`` into a ``Principal`` (static
keys from the config; database keys through a cache of ``key_cache_ttl_s``, so a key is
looked up once per TTL, not once per request). Revocation must act at once even inside the
TTL: the limiter holds the revoked set (in Redis, shared by every replica; or in process),
and every request checks it, in the same round trip as its limits for chat requests.

``Tenancy.admit`` sheds a request when the workers' queues are longer than its plan
tolerates (lower-priority plans tolerate less, so they are shed first), then takes an RPM
entry and a concurrency slot. The ``Admission`` it returns is finished exactly once, by the
request's lifecycle (router/chat/lifecycle.py), however the request ends (``finish`` is
idempotent): the slot goes back and the ledger gets its row, with the tokens the request's
usage count saw reach the client.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from decimal import Decimal

from core.config import Config
from core.errors import AuthenticationFailed, Overloaded, PermissionDenied
from router.routing.load import requests_at
from router.tenancy.ledger import Ledger, Prices, UsageRow
from router.tenancy.limits import Limiter, Slot, make_limiter
from router.tenancy.sqldb import Database
from router.tenancy.store import (
    ADMIN_TENANT,
    ANONYMOUS_TENANT,
    Plan,
    Principal,
    Tenant,
    TenantStore,
    hash_key,
)
from router.tenancy.terms import TenantTerms

log = logging.getLogger(__name__)

SHED_RETRY_AFTER_S = 2.0


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
    model: str
    request_id: str
    _slot: Slot | None
    _tenancy: Tenancy = field(repr=False)
    started_at: float = field(default_factory=time.time)
    _finished: bool = field(default=False, repr=False)

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers of an admitted request."""
        return self._slot.verdict.headers() if self._slot is not None else {}

    def finish(self, status: str, prompt_tokens: int, cached_tokens: int,
               completion_tokens: int) -> None:
        """Releases the slot and writes the ledger row, once (later calls do nothing).
        ``status``: "ok", "incomplete", "disconnected" or "error"."""
        if self._finished:
            return
        self._finished = True
        if self._slot is not None:
            self._slot.release(prompt_tokens + completion_tokens)
        principal = self.principal
        self._tenancy.ledger.record(UsageRow(
            request_id=self.request_id,
            tenant_id=principal.tenant_id if principal else ANONYMOUS_TENANT,
            key_id=principal.key_id if principal else None, model=self.model,
            prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
            completion_tokens=completion_tokens,
            cost=self._tenancy.prices.cost(prompt_tokens, cached_tokens, completion_tokens),
            status=status, started_at=self.started_at, finished_at=time.time()))


class Tenancy:
    def __init__(self, config: Config, pool) -> None:
        """``pool`` is the ``router.fleet.pool.WorkerPool`` whose queues shedding reads."""
        self.config = config
        self.enabled = config.auth.enabled
        tenancy = config.tenancy
        self.db = Database(tenancy.database_url, tenancy.sqlite_path)
        self.store = TenantStore.for_config(self.db, config)
        self.limiter: Limiter = make_limiter(tenancy.redis_url, prefix=tenancy.redis_prefix,
                                             slot_lease_s=tenancy.slot_lease_s)
        self.ledger = Ledger(self.db, tenancy.spool_path, flush_s=tenancy.ledger_flush_s,
                             batch=tenancy.ledger_batch)
        self.prices = Prices(Decimal(tenancy.price_input), Decimal(tenancy.price_cached_input),
                             Decimal(tenancy.price_output))
        self._pool = pool
        self._cache: dict[str, tuple[Principal, float]] = {}
        auth = config.auth
        self._static = None
        if auth.static_keys:
            plan = self.plan(auth.static_plan)
            self._static = Principal(auth.static_tenant, "static", plan,
                                     "tenant:" + auth.static_tenant, None)

    # -- lifecycle

    async def start(self) -> None:
        if self.config.tenancy.migrate_on_start:
            await asyncio.to_thread(self.db.migrate)
        await self.limiter.start()
        await self.ledger.start()

    async def stop(self) -> None:
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
        digest = hash_key(key)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            principal = cached[0]
        else:
            found = await asyncio.to_thread(self.store.lookup, key)
            if found is None:
                self._cache.pop(digest, None)
                raise AuthenticationFailed("Incorrect API key provided.")
            principal = self.principal_of(found[0], found[1].key_id)
            self._cache[digest] = (principal, now + self.config.auth.key_cache_ttl_s)
        if check_revoked and await self.limiter.is_revoked(principal.key_id or ""):
            raise AuthenticationFailed("Incorrect API key provided: this key was revoked.")
        return principal

    async def revoke_key(self, key_id: str) -> None:
        """Revokes in the database and, at once, on every replica."""
        await asyncio.to_thread(self.store.revoke_key, key_id)
        await self.limiter.revoke(key_id)
        for digest, (principal, _) in list(self._cache.items()):
            if principal.key_id == key_id:
                self._cache.pop(digest, None)

    # -- admission

    async def admit(self, principal: Principal | None, model: str,
                    request_id: str) -> Admission:
        if principal is None:
            return Admission(None, TenantTerms(), model, request_id, None, self)
        if principal.is_admin:
            raise PermissionDenied("the admin key manages tenants; it cannot send requests")
        if not principal.may_use(model):
            raise PermissionDenied(f"your plan does not include the model '{model}'",
                                   param="model")
        self._shed(principal.plan)
        slot = await self.limiter.admit(principal)
        plan = principal.plan
        terms = TenantTerms(priority=plan.priority, cache_salt=principal.cache_salt,
                            max_context=plan.max_context, pool=principal.pool)
        return Admission(principal, terms, model, request_id, slot, self)

    def _shed(self, plan: Plan) -> None:
        """503 when the workers' queues are past what ``plan`` tolerates: lower-priority
        plans tolerate shorter queues, so they are shed first and queues stay bounded."""
        workers = self._pool.workers()
        if not workers:
            return
        waiting = sum(max(0, requests_at(w) - w.load.running) for w in workers)
        if waiting >= plan.shed_queue_per_worker * len(workers):
            raise Overloaded(f"The service is at capacity for the {plan.name} plan; retry "
                             "shortly.", retry_after=SHED_RETRY_AFTER_S)
