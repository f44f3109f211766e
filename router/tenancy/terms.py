"""What a tenant's plan adds to each of its requests (``Tenancy.admit`` builds it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TenantTerms:
    """What the tenant's plan adds to a request."""

    priority: int = 0                 # the wire's: higher first
    cache_salt: str = ""              # the tenant's salt, mixed into every block hash
    max_context: int | None = None    # the plan's cap on prompt + completion tokens
    pool: str | None = None           # the tenant's worker pool (None: the shared pool)
