"""Routes of tenancy: ``GET /v1/usage`` and the admin API (``/v1/admin/...``, admin key only).

    GET  /v1/usage?start=&end=[&tenant_id=][&limit=][&cursor=]
                                              a tenant's own totals and a page of its rows;
                                              the admin key sees every tenant (or the one
                                              it names)
    POST /v1/admin/tenants                    {"tenant_id", "plan", "cache_salt"?,
                                               "allowed_models"?, "pool"?} -> tenant + key
    GET  /v1/admin/tenants                    every tenant with its keys (never the keys)
    POST /v1/admin/tenants/{id}/keys          another key for the tenant
    POST /v1/admin/keys/{key_id}/revoke       revoked at once on every replica

``start`` / ``end`` are unix seconds or ISO 8601 times; the default is the last 30 days.
A key is shown once, in the answer that made it.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict
from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from core.errors import InvalidRequest, PermissionDenied
from router.openai.errors import from_validation_errors
from router.openai.schemas import decode_json
from router.tenancy.admission import Tenancy, bearer_key
from router.tenancy.ledger import MAX_USAGE_ROWS
from router.tenancy.store import TENANT_ID, TenantError

DEFAULT_USAGE_WINDOW_S = 30 * 86400


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


class NewTenant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant_id: str = Field(min_length=1, max_length=63)
    plan: str = "standard"
    cache_salt: str | None = None
    allowed_models: list[str] | None = None
    pool: str | None = None


def _time_param(request: Request, name: str, default: float) -> float:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        try:
            value = datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError):
            value = math.nan
    if not math.isfinite(value):
        raise InvalidRequest(f"'{name}' must be unix seconds or an ISO 8601 time",
                             param=name)
    return value


async def usage(request: Request) -> Response:
    tenancy: Tenancy = request.app.state.tenancy
    principal = request.state.principal
    end = _time_param(request, "end", time.time())
    start = _time_param(request, "start", end - DEFAULT_USAGE_WINDOW_S)
    if start >= end:
        raise InvalidRequest("'start' must be before 'end'", param="start")
    asked = request.query_params.get("tenant_id")
    if asked is not None and not TENANT_ID.fullmatch(asked):
        raise InvalidRequest("'tenant_id' is not a tenant id", param="tenant_id")
    if principal is None or principal.is_admin:
        tenant_id = asked  # every tenant, or the one named
    else:
        if asked is not None and asked != principal.tenant_id:
            raise PermissionDenied("a key can read its own tenant's usage only",
                                   param="tenant_id")
        tenant_id = principal.tenant_id
    raw_limit = request.query_params.get("limit") or str(MAX_USAGE_ROWS)
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_USAGE_ROWS:
        raise InvalidRequest(f"'limit' must be an integer from 1 to {MAX_USAGE_ROWS}",
                             param="limit")
    return _json(await tenancy.ledger.usage(tenant_id, start, end, limit=limit,
                                            cursor=request.query_params.get("cursor") or None))


# -- admin ------------------------------------------------------------------------------------------

async def require_admin(request: Request) -> None:
    """The admin key, whether or not auth is on for the chat routes."""
    tenancy: Tenancy = request.app.state.tenancy
    admin = tenancy.config.auth.admin_key
    if not admin:
        raise PermissionDenied("the admin API is off: set auth.admin_key to use it")
    key = bearer_key(request.headers.get("authorization"))
    principal = await tenancy.authenticate(request.headers.get("authorization")) \
        if tenancy.enabled else None
    if principal is not None and principal.is_admin:
        return
    if principal is None and key == admin:  # auth off: compared here
        return
    raise PermissionDenied("this route needs the admin key")


def _tenant_dict(tenant, keys) -> dict[str, Any]:
    return {**asdict(tenant), "keys": [asdict(k) for k in keys]}


def _tenant_error(exc: TenantError) -> InvalidRequest:
    return InvalidRequest(str(exc), param=exc.param)


async def add_tenant(request: Request) -> Response:
    tenancy: Tenancy = request.app.state.tenancy
    try:
        body = NewTenant.model_validate(decode_json(await request.body()))
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from None
    try:
        tenant, key = await asyncio.to_thread(
            tenancy.store.add_tenant, body.tenant_id, body.plan, cache_salt=body.cache_salt,
            allowed_models=body.allowed_models, pool=body.pool)
    except TenantError as exc:
        raise _tenant_error(exc) from None
    return _json({"tenant": asdict(tenant), "key_id": key.key_id, "key": key.key}, 201)


async def list_tenants(request: Request) -> Response:
    store = request.app.state.tenancy.store

    def read() -> list[dict[str, Any]]:
        return [_tenant_dict(t, store.keys(t.tenant_id)) for t in store.tenants()]

    return _json({"object": "list", "data": await asyncio.to_thread(read)})


async def add_key(tenant_id: str, request: Request) -> Response:
    tenancy: Tenancy = request.app.state.tenancy
    try:
        key = await asyncio.to_thread(tenancy.store.add_key, tenant_id)
    except TenantError as exc:
        raise _tenant_error(exc) from None
    return _json({"tenant_id": tenant_id, "key_id": key.key_id, "key": key.key}, 201)


async def revoke_key(key_id: str, request: Request) -> Response:
    tenancy: Tenancy = request.app.state.tenancy
    try:
        await tenancy.revoke_key(key_id)
    except TenantError as exc:
        raise _tenant_error(exc) from None
    return _json({"key_id": key_id, "revoked": True})


def admin_routes() -> APIRouter:
    api = APIRouter(dependencies=[Depends(require_admin)])
    api.add_api_route("/tenants", add_tenant, methods=["POST"])
    api.add_api_route("/tenants", list_tenants, methods=["GET"])
    api.add_api_route("/tenants/{tenant_id}/keys", add_key, methods=["POST"])
    api.add_api_route("/keys/{key_id}/revoke", revoke_key, methods=["POST"])
    return api
