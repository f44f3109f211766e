"""The usage ledger: one row per finished or disconnected request, never lost.

``record`` only queues the row; a background task writes the queue in batches (every
``flush_s``, or at once when ``batch`` rows wait) in one transaction, and ``stop`` writes what
is left. When the database cannot be reached the batch is appended to a local spool file
(one JSON line per row, fsynced) and the flusher replays the spool once the database answers
again; rows are keyed by request id and written with ``ON CONFLICT DO NOTHING``, so a replay
that is interrupted and repeated writes no row twice.

Cost is exact decimal arithmetic: the prices per million tokens of docs/api.md ("Price and
the ledger"), with cached prompt
tokens at the cached price instead of the input price.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from router.tenancy.sqldb import Database, DatabaseUnavailable

log = logging.getLogger(__name__)

_MILLION = Decimal(1_000_000)
_COLUMNS = ("request_id", "tenant_id", "key_id", "model", "prompt_tokens", "cached_tokens",
            "completion_tokens", "cost", "status", "started_at", "finished_at")
_INSERT = (f"INSERT INTO usage_ledger ({', '.join(_COLUMNS)}) VALUES "
           f"({', '.join(['%s'] * len(_COLUMNS))}) ON CONFLICT (request_id) DO NOTHING")


def money(amount: Decimal) -> str:
    """Plain notation, no trailing zeros: ``"0.0000004"``, never ``"4E-7"``."""
    text = format(amount, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


@dataclass(frozen=True)
class Prices:
    """US dollars per million tokens."""

    input: Decimal
    cached_input: Decimal
    output: Decimal

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> Decimal:
        uncached = prompt_tokens - cached_tokens
        return (uncached * self.input + cached_tokens * self.cached_input
                + completion_tokens * self.output) / _MILLION


@dataclass(frozen=True)
class UsageRow:
    request_id: str
    tenant_id: str
    key_id: str | None
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost: Decimal
    status: str          # "ok", "disconnected", "error"
    started_at: float    # unix seconds
    finished_at: float

    def params(self) -> tuple[Any, ...]:
        return tuple(str(v) if isinstance(v, Decimal) else v
                     for v in (getattr(self, c) for c in _COLUMNS))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cost"] = str(self.cost)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageRow:
        return cls(**{**data, "cost": Decimal(data["cost"])})


class Ledger:
    def __init__(self, db: Database, spool_path: str | Path, *, flush_s: float, batch: int):
        self.db = db
        self.spool_path = Path(spool_path).expanduser()
        self._flush_s = flush_s
        self._batch = batch
        self._pending: list[UsageRow] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._spool_lock = threading.Lock()

    # -- lifecycle

    async def start(self) -> None:
        await asyncio.to_thread(self._replay_spool)
        self._flusher = asyncio.create_task(self._flush_loop(), name="ledger-flusher")

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.flush()

    # -- writing

    def record(self, row: UsageRow) -> None:
        self._pending.append(row)
        if len(self._pending) >= self._batch:
            self._wake.set()

    async def flush(self) -> None:
        """Writes every queued row (to the database, or to the spool if it is down), and the
        spool too when the database answers."""
        async with self._flush_lock:
            rows, self._pending = self._pending, []
            await asyncio.to_thread(self._write, rows)

    @property
    def spooled(self) -> int:
        """Rows waiting in the spool file."""
        try:
            with self.spool_path.open("rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    async def _flush_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._flush_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ledger flush failed")

    def _write(self, rows: list[UsageRow]) -> None:
        with self._spool_lock:
            if self._replay_spool_locked():
                try:
                    if rows:
                        self.db.transaction([(_INSERT, [r.params() for r in rows])])
                    return
                except DatabaseUnavailable as exc:
                    log.warning("ledger database unavailable (%s): spooling %d rows", exc,
                                len(rows))
            self._spool(rows)

    def _spool(self, rows: list[UsageRow]) -> None:
        if not rows:
            return
        data = b"".join(json.dumps(r.as_dict()).encode() + b"\n" for r in rows)
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        with self.spool_path.open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def _replay_spool(self) -> bool:
        with self._spool_lock:
            return self._replay_spool_locked()

    def _replay_spool_locked(self) -> bool:
        """Writes the spool to the database; False (the spool kept) if it is down."""
        try:
            lines = self.spool_path.read_bytes().splitlines()
        except FileNotFoundError:
            return True
        rows = []
        for line in lines:
            try:
                rows.append(UsageRow.from_dict(json.loads(line)))
            except (ValueError, TypeError):
                # A line torn by a crash mid-write: the rows before and after it still count.
                log.error("ledger spool: skipping an unreadable line: %r", line[:200])
        try:
            if rows:
                self.db.transaction([(_INSERT, [r.params() for r in rows])])
        except DatabaseUnavailable:
            return False
        self.spool_path.unlink()
        log.info("ledger: %d spooled rows written", len(rows))
        return True

    # -- reading

    async def usage(self, tenant_id: str | None, start: float, end: float,
                    limit: int = 1000) -> dict[str, Any]:
        """Totals and rows (newest first, at most ``limit``) of requests finished in
        [start, end); ``tenant_id`` None: every tenant."""
        await self.flush()
        where = "finished_at >= %s AND finished_at < %s"
        params: list[Any] = [start, end]
        if tenant_id is not None:
            where += " AND tenant_id = %s"
            params.append(tenant_id)
        columns = ", ".join(_COLUMNS)
        rows = await asyncio.to_thread(
            self.db.query, f"SELECT {columns} FROM usage_ledger WHERE {where} "
                           "ORDER BY finished_at DESC", params)
        # Totals over every row; exact: NUMERIC in PostgreSQL, text summed as Decimal here.
        totals = {"requests": len(rows), "prompt_tokens": 0, "cached_tokens": 0,
                  "completion_tokens": 0}
        cost = Decimal(0)
        items = []
        for i, raw in enumerate(rows):
            row = dict(zip(_COLUMNS, raw, strict=True))
            row["cost"] = Decimal(str(row["cost"]))
            for name in ("prompt_tokens", "cached_tokens", "completion_tokens"):
                totals[name] += row[name]
            cost += row["cost"]
            if i < limit:
                items.append({**row, "cost": money(row["cost"])})
        return {"object": "usage", "start": start, "end": end, "tenant_id": tenant_id,
                "totals": {**totals, "cost": money(cost)},
                "data": items, "has_more": len(rows) > limit}
