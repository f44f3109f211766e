"""Tenants, their API keys and plans.

A tenant has a plan (``core.config.PlanConfig``: limits and priority), keys, a cache salt
policy and the models it may use. A key is ``es-`` + 43 random URL-safe characters (256
bits), shown once when made; only its SHA-256 is stored (a key that random needs no slow
hash), so a database dump yields no usable key. Revoking a key stamps ``revoked_at``: the
database is where a revocation lives; Redis holds a copy per tenant (``revoked_keys_set``),
loaded again from here whenever Redis lost it.

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
from collections.abc import Collection
from dataclasses import dataclass

from core.config import Config, PlanConfig
from router.tenancy.sqldb import Database

KEY_PREFIX = "es-"
TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # fullmatch: no trailing newline
# cache_salt policies: "tenant" (the default) keeps a tenant's cached prefixes its own;
# "shared" lets tenants that share it reuse each other's public prefixes.
SHARED_SALT = "shared"
# A tenant's own salt is this prefix + its id; a salt set by an admin may not take that form
# (it would read another tenant's cache) nor hold '|' (the router joins the tenant's salt and
# the request's own with it).
OWN_SALT_PREFIX = "tenant:"
_SALT = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# Tenant ids the router itself uses: the static keys' tenant, the admin and, with auth off,
# the ledger's anonymous tenant. A database tenant of the same name would share its rows.
ADMIN_TENANT = "admin"          # the admin key's principal
ANONYMOUS_TENANT = "anonymous"  # the ledger's tenant while auth is off
BUILT_IN_TENANTS = (ADMIN_TENANT, ANONYMOUS_TENANT)


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
        return OWN_SALT_PREFIX + self.tenant_id if self.cache_salt is None else self.cache_salt


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


def tenant_key(prefix: str, tenant_id: str, name: str) -> str:
    """A Redis key of one tenant: ``<prefix>:{<tenant id>}:<name>``. Every key of a tenant
    carries the same Redis Cluster hash tag (the part in braces), so they share a slot and
    one script or pipeline may touch them all (a cluster refuses keys of different slots
    in one script: CROSSSLOT)."""
    return f"{redis_namespace(prefix)}{{{tenant_id}}}:{name}"


# A member of every revoked-keys set that Redis has been given from the database: a set
# without it (Redis restarted empty, or flushed) is loaded again before it is believed. No
# key id has this form (``new_key``).
REVOKED_LOADED = "*"


def revoked_keys_set(prefix: str, tenant_id: str) -> str:
    """The Redis set of the tenant's revoked key ids, which every router replica checks (a
    copy of the database's ``api_keys.revoked_at``, with ``REVOKED_LOADED``)."""
    return tenant_key(prefix, tenant_id, "revoked")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> NewKey:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return NewKey(key_id="key_" + secrets.token_hex(8), key=key)


class TenantError(ValueError):
    """A tenant or key operation that cannot be done (unknown tenant, bad name, ...);
    ``param`` names the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class TenantStore:
    def __init__(self, db: Database, plan_names: list[str], *,
                 pools: Collection[str] | None = None, reserved_ids: Collection[str] = ()):
        """``pools``: the worker pools a tenant may be pinned to (None: any name);
        ``reserved_ids``: tenant ids the deployment uses itself."""
        self.db = db
        self._plans = plan_names
        self._pools = None if pools is None else sorted(pools)
        self._reserved = frozenset(reserved_ids)

    @classmethod
    def for_config(cls, db: Database, config: Config) -> TenantStore:
        """The store with the deployment's plans, pools and reserved tenant ids."""
        pools = {config.cluster.pool, *(p.name for p in config.autoscaler.pools)}
        return cls(db, config.tenancy.plan_names(), pools=pools,
                   reserved_ids=(config.auth.static_tenant, *BUILT_IN_TENANTS))

    def add_tenant(self, tenant_id: str, plan: str, *, cache_salt: str | None = None,
                   allowed_models: list[str] | None = None,
                   pool: str | None = None) -> tuple[Tenant, NewKey]:
        """A new tenant and its first key."""
        if not TENANT_ID.fullmatch(tenant_id):
            raise TenantError(f"tenant id {tenant_id!r} must be 1-63 letters, digits, '_', "
                              "'.' or '-'", param="tenant_id")
        if tenant_id in self._reserved:
            raise TenantError(f"tenant id {tenant_id!r} is reserved on this deployment",
                              param="tenant_id")
        self._check_plan(plan)
        if cache_salt is not None and (not _SALT.fullmatch(cache_salt)
                                       or cache_salt.startswith(OWN_SALT_PREFIX)):
            raise TenantError(f"cache_salt must be 1-64 letters, digits, '_', '.', ':' or '-' "
                              f"and not start with {OWN_SALT_PREFIX!r} (a tenant's own salt)",
                              param="cache_salt")
        if pool is not None and self._pools is not None and pool not in self._pools:
            raise TenantError(f"unknown pool {pool!r}; pools: {', '.join(self._pools)}",
                              param="pool")
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

    def revoked_key_ids(self, tenant_id: str) -> list[str]:
        """The tenant's revoked keys (what Redis's revoked-keys set is loaded from)."""
        return [k for (k,) in self.db.query("SELECT key_id FROM api_keys WHERE tenant_id = %s "
                                            "AND revoked_at IS NOT NULL", (tenant_id,))]

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
            raise TenantError(f"unknown plan {plan!r}; plans: {', '.join(self._plans)}",
                              param="plan")


_TENANT_COLUMNS = ("SELECT tenant_id, plan, cache_salt, allowed_models, pool, created_at "
                   "FROM tenants")


def _tenant(row) -> Tenant:
    tenant_id, plan, salt, models, pool, created = row
    return Tenant(tenant_id, plan, salt, tuple(json.loads(models)) if models else None, pool,
                  created)
