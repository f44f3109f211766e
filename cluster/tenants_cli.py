"""``electron-serve tenants ...``: manage tenants and keys in the configured database.

    electron-serve tenants add TENANT [--plan standard] [--shared-cache-salt SALT]
                                      [--models m1,m2] [--pool POOL]
    electron-serve tenants add-key TENANT
    electron-serve tenants list
    electron-serve tenants revoke-key KEY_ID
    electron-serve tenants plans

A new key is printed once and never again (only its hash is stored). ``revoke-key`` also marks
the key revoked in Redis when ``tenancy.redis_url`` is set, so running routers refuse it at
once; without Redis a router's own cache keeps a revoked key for up to
``auth.key_cache_ttl_s`` (the admin API, ``POST /v1/admin/keys/{id}/revoke``, acts at once).
"""

from __future__ import annotations

import argparse
import datetime as dt

from core.config import Config
from router.tenancy.sqldb import database_of
from router.tenancy.store import TenantError, TenantStore, revoked_keys_set


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]
               ) -> None:
    tenants = commands.add_parser("tenants", parents=parents,
                                  help="tenants and API keys (add, add-key, list, revoke-key)")
    verbs = tenants.add_subparsers(dest="verb", required=True, metavar="VERB")
    add = verbs.add_parser("add", parents=parents, help="a new tenant and its first key")
    add.add_argument("tenant_id")
    add.add_argument("--plan", default="standard")
    add.add_argument("--shared-cache-salt", metavar="SALT",
                     help="share cached prefixes with tenants of the same salt")
    add.add_argument("--models", help="comma-separated model ids it may use (default: all)")
    add.add_argument("--pool", help="the worker pool serving it")
    add_key = verbs.add_parser("add-key", parents=parents, help="another key for a tenant")
    add_key.add_argument("tenant_id")
    verbs.add_parser("list", parents=parents, help="tenants and their key ids")
    revoke = verbs.add_parser("revoke-key", parents=parents, help="revoke a key")
    revoke.add_argument("key_id")
    verbs.add_parser("plans", parents=parents, help="the plans and their limits")


def _when(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).strftime(
        "%Y-%m-%d %H:%M:%S")


def run(args: argparse.Namespace, config: Config) -> int:
    tenancy = config.tenancy
    if args.verb == "plans":
        for name in tenancy.plan_names():
            plan = tenancy.plan(name)
            assert plan is not None
            print(f"{name}: {plan.rpm} RPM, {plan.concurrency} concurrent, "
                  f"TPM {plan.tpm or '-'}, priority {plan.priority}, "
                  f"max context {plan.max_context or '-'}")
        return 0
    db = database_of(tenancy)
    try:
        db.migrate()
        store = TenantStore.for_config(db, config)
        try:
            return _verb(args, config, store)
        except TenantError as exc:
            print(f"electron-serve tenants: {exc}")
            return 1
    finally:
        db.close()


def _verb(args: argparse.Namespace, config: Config, store: TenantStore) -> int:
    if args.verb == "add":
        models = [m.strip() for m in args.models.split(",")] if args.models else None
        tenant, key = store.add_tenant(args.tenant_id, args.plan,
                                       cache_salt=args.shared_cache_salt,
                                       allowed_models=models, pool=args.pool)
        print(f"tenant {tenant.tenant_id} (plan {tenant.plan})")
        print(f"key id: {key.key_id}")
        print(f"key:    {key.key}    (shown once: store it now)")
    elif args.verb == "add-key":
        key = store.add_key(args.tenant_id)
        print(f"key id: {key.key_id}")
        print(f"key:    {key.key}    (shown once: store it now)")
    elif args.verb == "list":
        for tenant in store.tenants():
            models = ",".join(tenant.allowed_models) if tenant.allowed_models else "all"
            salt = "own" if tenant.cache_salt is None else f"shared:{tenant.cache_salt}"
            print(f"{tenant.tenant_id}  plan={tenant.plan}  models={models}  cache={salt}  "
                  f"created={_when(tenant.created_at)}")
            for key in store.keys(tenant.tenant_id):
                state = f"revoked {_when(key.revoked_at)}" if key.revoked_at else "active"
                print(f"    {key.key_id}  {state}  created={_when(key.created_at)}")
    elif args.verb == "revoke-key":
        record = store.revoke_key(args.key_id)
        if config.tenancy.redis_url:
            import redis

            with redis.Redis.from_url(config.tenancy.redis_url) as client:
                client.sadd(revoked_keys_set(config.tenancy.redis_prefix, record.tenant_id),
                            args.key_id)
        print(f"key {args.key_id} revoked")
    return 0
