"""Tenants, their API keys and plans.

A tenant has a plan (``core.config.PlanConfig``: limits and priority), keys, a cache salt
policy and the models it may use. A key is ``es-`` + 43 random URL-safe characters (256
bits), shown once when made; only its SHA-256 is stored (a key that random needs no slow
hash), so a database dump yields no usable key. Revoking a key stamps ``revoked_at``.

The store is the ``router.tenancy.sqldb.Database`` (SQLite or PostgreSQL); both the CLI and the
router's admin API manage tenants through ``TenantStore``. The ``Principal`` is what a
request authenticates as (``request.state.principal`` in the router).

No torch, Ray or gRPC here.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass

from core.config import PlanConfig
from router.tenancy.sqldb import Database

KEY_PREFIX = "es-"
_TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # to fullmatch a tenant id
# cache_salt policies: "tenant" (the default) keeps a tenant's cached prefixes its own;
# "shared" lets tenants that share it reuse each other's public prefixes.
SHARED_SALT = "shared"


@dataclass(frozen=True)
class Plan:
    name: str
    rpm: int
    concurrency: int
    tpm: int | None
    priority: int
    max_context: int | None
    shed_queue_per_worker: int

    @classmethod
    def of(cls, name: str, config: PlanConfig) -> Plan:
        return cls(name, config.rpm, config.concurrency, config.tpm, config.priority,
                   config.max_context, config.shed_queue_per_worker)


@dataclass(frozen=True)
class Principal:
    """Who a request is: the tenant, the key it used and the plan it pays for."""

    tenant_id: str
    key_id: str | None
    plan: Plan
    cache_salt: str                        # mixed into every block hash of its prompts
    allowed_models: frozenset[str] | None  # None: every model
    pool: str | None = None
    is_admin: bool = False

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    plan: str
    cache_salt: str | None  # None: its own salt (the tenant id); else this shared salt
    allowed_models: tuple[str, ...] | None
    pool: str | None
    created_at: float

    @property
    def effective_salt(self) -> str:
        return "tenant:" + self.tenant_id if self.cache_salt is None else self.cache_salt


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    tenant_id: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class NewKey:
    key_id: str
    key: str  # the only time the key itself exists outside the client


def redis_namespace(prefix: str) -> str:
    """Every Redis key of a deployment starts with this (``prefix`` with one ':' after)."""
    return prefix.rstrip(":") + ":"


def revoked_keys_set(prefix: str) -> str:
    """The Redis set of revoked key ids, which every router replica checks."""
    return redis_namespace(prefix) + "revoked_keys"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> NewKey:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return NewKey(key_id="key_" + secrets.token_hex(8), key=key)


class TenantError(ValueError):
    """A tenant or key operation that cannot be done (unknown tenant, bad name, ...)."""


class TenantStore:
    def __init__(self, db: Database, plan_names: list[str]):
        self.db = db
        self._plans = plan_names

    def add_tenant(self, tenant_id: str, plan: str, *, cache_salt: str | None = None,
                   allowed_models: list[str] | None = None,
                   pool: str | None = None) -> tuple[Tenant, NewKey]:
        """A new tenant and its first key."""
        if not _TENANT_ID.match(tenant_id):
            raise TenantError(f"tenant id {tenant_id!r} must be 1-63 letters, digits, '_', "
                              "'.' or '-'")
        self._check_plan(plan)
        if self.get_tenant(tenant_id) is not None:
            raise TenantError(f"tenant {tenant_id!r} exists already")
        now = time.time()
        models = json.dumps(sorted(allowed_models)) if allowed_models else None
        key = new_key()
        self.db.transaction([
            ("INSERT INTO tenants (tenant_id, plan, cache_salt, allowed_models, pool, "
             "created_at) VALUES (%s, %s, %s, %s, %s, %s)",
             [(tenant_id, plan, cache_salt, models, pool, now)]),
            ("INSERT INTO api_keys (key_id, tenant_id, key_hash, created_at) "
             "VALUES (%s, %s, %s, %s)", [(key.key_id, tenant_id, hash_key(key.key), now)]),
        ])
        tenant = Tenant(tenant_id, plan, cache_salt,
                        tuple(sorted(allowed_models)) if allowed_models else None, pool, now)
        return tenant, key

    def add_key(self, tenant_id: str) -> NewKey:
        if self.get_tenant(tenant_id) is None:
            raise TenantError(f"no tenant {tenant_id!r}")
        key = new_key()
        self.db.execute("INSERT INTO api_keys (key_id, tenant_id, key_hash, created_at) "
                        "VALUES (%s, %s, %s, %s)",
                        (key.key_id, tenant_id, hash_key(key.key), time.time()))
        return key

    def revoke_key(self, key_id: str) -> KeyRecord:
        changed = self.db.execute("UPDATE api_keys SET revoked_at = %s WHERE key_id = %s "
                                  "AND revoked_at IS NULL", (time.time(), key_id))
        record = self.get_key(key_id)
        if record is None:
            raise TenantError(f"no key {key_id!r}")
        if not changed:
            raise TenantError(f"key {key_id!r} was revoked already")
        return record

    def get_key(self, key_id: str) -> KeyRecord | None:
        rows = self.db.query("SELECT key_id, tenant_id, created_at, revoked_at FROM api_keys "
                             "WHERE key_id = %s", (key_id,))
        return KeyRecord(*rows[0]) if rows else None

    def keys(self, tenant_id: str) -> list[KeyRecord]:
        rows = self.db.query("SELECT key_id, tenant_id, created_at, revoked_at FROM api_keys "
                             "WHERE tenant_id = %s ORDER BY created_at", (tenant_id,))
        return [KeyRecord(*r) for r in rows]

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        rows = self.db.query(_TENANT_COLUMNS + " WHERE tenant_id = %s", (tenant_id,))
        return _tenant(rows[0]) if rows else None

    def tenants(self) -> list[Tenant]:
        return [_tenant(r) for r in self.db.query(_TENANT_COLUMNS + " ORDER BY tenant_id")]

    def lookup(self, key: str) -> tuple[Tenant, KeyRecord] | None:
        """The tenant and live key record of ``key``; None when unknown or revoked."""
        rows = self.db.query(
            "SELECT t.tenant_id, t.plan, t.cache_salt, t.allowed_models, t.pool, t.created_at, "
            "k.key_id, k.created_at FROM api_keys k JOIN tenants t USING (tenant_id) "
            "WHERE k.key_hash = %s AND k.revoked_at IS NULL", (hash_key(key),))
        if not rows:
            return None
        row = rows[0]
        tenant = _tenant(row[:6])
        return tenant, KeyRecord(row[6], tenant.tenant_id, row[7], None)

    def _check_plan(self, plan: str) -> None:
        if plan not in self._plans:
            raise TenantError(f"unknown plan {plan!r}; plans: {', '.join(self._plans)}")


_TENANT_COLUMNS = ("SELECT tenant_id, plan, cache_salt, allowed_models, pool, created_at "
                   "FROM tenants")


def _tenant(row) -> Tenant:
    tenant_id, plan, salt, models, pool, created = row
    return Tenant(tenant_id, plan, salt, tuple(json.loads(models)) if models else None, pool,
                  created)
