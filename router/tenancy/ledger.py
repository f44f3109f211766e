"""The usage ledger: one row per finished or disconnected request, never lost.

``record`` only queues the row; a background task writes the queue in batches (every
``flush_s``, or at once when ``batch`` rows wait) in one transaction, and ``stop`` writes what
is left. When the database cannot be reached the batch is appended to a local spool file
(one JSON line per row, fsynced) and the flusher replays the spool once the database answers
again. A row's key (``request_id``) is made by the server for each request, never the
client's ``X-Request-Id`` (kept as ``client_request_id``): N requests are N rows, whatever
headers they carry, and a replay that is interrupted and repeated writes no row twice
(``ON CONFLICT DO NOTHING`` on that key).

A row the database refuses (not "unavailable": the row itself, e.g. a value it cannot
store) never takes its batch with it: the batch is written again row by row, and each
refused row is quarantined alone, appended with the reason to the dead-letter file (the
spool's path + ``.dead``) and counted (``quarantined``, the
``electron:ledger_quarantined_rows_total`` metric). The spool is replayed the same way, so
one bad row never blocks it, and a replay at start never fails the start.

Cost is exact decimal arithmetic: the prices per million tokens of docs/api.md ("Price and
the ledger"), with cached prompt
tokens at the cached price instead of the input price.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from core.errors import InvalidRequest
from router.tenancy.sqldb import Database, DatabaseUnavailable

log = logging.getLogger(__name__)

_MILLION = Decimal(1_000_000)
_PRINTABLE_ID = re.compile(r"[\x21-\x7e]{1,256}")  # every request id, ours or a client's
_COLUMNS = ("request_id", "client_request_id", "tenant_id", "key_id", "model",
            "prompt_tokens", "cached_tokens", "completion_tokens", "cost", "status",
            "started_at", "finished_at")
_TOKENS = ("prompt_tokens", "cached_tokens", "completion_tokens")
MAX_USAGE_ROWS = 1000  # rows per /v1/usage page
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
    request_id: str      # the server's id for the request: the row's key
    tenant_id: str
    key_id: str | None
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost: Decimal
    status: str          # "ok", "incomplete", "disconnected", "error"
    started_at: float    # unix seconds
    finished_at: float
    client_request_id: str | None = None  # the client's X-Request-Id, when it sent one

    def params(self) -> tuple[Any, ...]:
        return tuple(str(v) if isinstance(v, Decimal) else v
                     for v in (getattr(self, c) for c in _COLUMNS))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cost"] = str(self.cost)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageRow:
        """A spooled row (rows spooled before client ids had a column carry none)."""
        return cls(**{**data, "cost": Decimal(data["cost"])})


class UsageCursor:
    """Where a page of /v1/usage ends: (finished_at, request_id) of its last row, as an
    opaque URL-safe string."""

    @staticmethod
    def encode(finished_at: float, request_id: str) -> str:
        raw = json.dumps([finished_at, request_id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def decode(cursor: str) -> tuple[float, str]:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            finished_at, request_id = json.loads(raw)
            if (isinstance(finished_at, bool) or not isinstance(finished_at, (int, float))
                    or not math.isfinite(finished_at) or not isinstance(request_id, str)
                    or not _PRINTABLE_ID.fullmatch(request_id)):
                raise ValueError(cursor)
            return float(finished_at), request_id
        except (ValueError, TypeError, binascii.Error):
            raise InvalidRequest("'cursor' is not a cursor this API returned",
                                 param="cursor") from None


class _Unwritten(Exception):
    """The database became unavailable; ``rows`` were neither written nor quarantined."""

    def __init__(self, rows: list[UsageRow], cause: DatabaseUnavailable):
        super().__init__(str(cause))
        self.rows, self.cause = rows, cause


class Ledger:
    def __init__(self, db: Database, spool_path: str | Path, *, flush_s: float, batch: int):
        self.db = db
        self.spool_path = Path(spool_path).expanduser()
        self.dead_letter_path = self.spool_path.with_name(self.spool_path.name + ".dead")
        self.quarantined = 0  # rows the database refused, written to the dead-letter file
        self.on_quarantine: Callable[[int], None] | None = None  # the metric's counter
        self._flush_s = flush_s
        self._batch = batch
        self._pending: list[UsageRow] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._spool_lock = threading.Lock()
        # Spools this ledger takes over at start: those of router processes that no longer
        # run (``electron-serve router --processes`` lowered; cluster/router_processes.py).
        self.adopt_spools: list[Path] = []

    # -- lifecycle

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._adopt_spools)
            await asyncio.to_thread(self._replay_spool)
        except Exception:  # the flusher tries again; a start never fails on the spool
            log.exception("ledger: replaying the spool at start failed; it is kept")
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
                    self._insert(rows)
                    return
                except _Unwritten as exc:
                    log.warning("ledger database unavailable (%s): spooling %d rows",
                                exc.cause, len(exc.rows))
                    rows = exc.rows
            self._spool(rows)

    def _insert(self, rows: list[UsageRow]) -> None:
        """Writes ``rows`` in one transaction; when the database refuses it for a row's sake,
        row by row, quarantining each refused row alone. ``_Unwritten``: the database became
        unavailable; its ``rows`` are those neither written nor quarantined (the caller
        keeps them)."""
        if not rows:
            return
        try:
            self.db.transaction([(_INSERT, [r.params() for r in rows])])
            return
        except DatabaseUnavailable as exc:
            raise _Unwritten(rows, exc) from exc
        except Exception as exc:  # noqa: BLE001 - any refusal of the driver's: row by row
            log.warning("ledger: the database refused a batch of %d rows (%s: %s); writing "
                        "them one by one", len(rows), type(exc).__name__, exc)
        for i, row in enumerate(rows):
            try:
                self.db.transaction([(_INSERT, [row.params()])])
            except DatabaseUnavailable as exc:
                raise _Unwritten(rows[i:], exc) from exc
            except Exception as exc:  # noqa: BLE001 - this row refused: set aside alone
                self._quarantine(row, f"{type(exc).__name__}: {exc}")

    def _quarantine(self, row: UsageRow | None, reason: str, raw: bytes | None = None) -> None:
        entry = {"reason": reason[:2000], "quarantined_at": time.time(),
                 "row": row.as_dict() if row is not None else None}
        if raw is not None:
            entry["line"] = raw.decode("utf-8", "backslashreplace")
        self._append(self.dead_letter_path, [json.dumps(entry).encode() + b"\n"])
        self.quarantined += 1
        if self.on_quarantine is not None:
            self.on_quarantine(1)
        log.error("ledger: row %s quarantined in %s: %s",
                  row.request_id if row is not None else "(unreadable)",
                  self.dead_letter_path, reason[:200])

    def _spool(self, rows: list[UsageRow]) -> None:
        if rows:
            self._append(self.spool_path, [json.dumps(r.as_dict()).encode() + b"\n"
                                           for r in rows])

    @staticmethod
    def _append(path: Path, lines: list[bytes]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
            f.write(b"".join(lines))
            f.flush()
            os.fsync(f.fileno())

    def _adopt_spools(self) -> None:
        """Moves each adopted spool's lines to the end of this one (fsynced before the other
        file goes), so that the replay below writes them. A crash in between leaves the rows
        in both files; the ledger's insert skips a request id it already has."""
        with self._spool_lock:
            for path in self.adopt_spools:
                try:
                    data = Path(path).read_bytes()
                except FileNotFoundError:
                    continue
                if data and not data.endswith(b"\n"):
                    data += b"\n"  # a torn last line stays one line (quarantined on replay)
                if data:
                    self._append(self.spool_path, [data])
                Path(path).unlink()
                log.info("ledger: took over %d spooled rows from %s", data.count(b"\n"), path)

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
            except (ValueError, TypeError) as exc:
                # A line torn by a crash mid-write: the rows before and after it still count.
                self._quarantine(None, f"unreadable spool line: {exc}", raw=line[:4096])
        try:
            self._insert(rows)
        except _Unwritten as exc:
            if len(exc.rows) < len(rows):  # keep only what is left (atomically)
                partial = self.spool_path.with_name(self.spool_path.name + ".tmp")
                partial.unlink(missing_ok=True)
                self._append(partial, [json.dumps(r.as_dict()).encode() + b"\n"
                                       for r in exc.rows])
                os.replace(partial, self.spool_path)
            return False
        self.spool_path.unlink()
        log.info("ledger: %d spooled rows written", len(rows))
        return True

    # -- reading

    async def usage(self, tenant_id: str | None, start: float, end: float,
                    limit: int = MAX_USAGE_ROWS, cursor: str | None = None) -> dict[str, Any]:
        """Totals of the requests finished in [start, end) (``tenant_id`` None: every
        tenant), summed by the database, and one page of their rows: newest first, at most
        ``limit``, after ``cursor`` (the ``next_cursor`` of the page before). Rows reach the
        database within ``flush_s`` of their request's end."""
        if not 1 <= limit <= MAX_USAGE_ROWS:
            raise InvalidRequest(f"'limit' must be 1 to {MAX_USAGE_ROWS}", param="limit")
        after = UsageCursor.decode(cursor) if cursor else None
        return await asyncio.to_thread(self._usage, tenant_id, start, end, limit, after)

    def _usage(self, tenant_id: str | None, start: float, end: float, limit: int,
               after: tuple[float, str] | None) -> dict[str, Any]:
        where = "finished_at >= %s AND finished_at < %s"
        params: list[Any] = [start, end]
        if tenant_id is not None:
            where += " AND tenant_id = %s"
            params.append(tenant_id)
        # Exact: NUMERIC in PostgreSQL; a decimal aggregate in SQLite.
        sums = ", ".join(f"COALESCE(SUM({c}), 0)" for c in _TOKENS)
        (count, *tokens, cost), = self.db.query(
            f"SELECT COUNT(*), {sums}, {self.db.decimal_sum('cost')} FROM usage_ledger "
            f"WHERE {where}", params)
        page_where, page_params = where, list(params)
        if after is not None:
            page_where += " AND (finished_at < %s OR (finished_at = %s AND request_id < %s))"
            page_params += [after[0], after[0], after[1]]
        rows = self.db.query(
            f"SELECT {', '.join(_COLUMNS)} FROM usage_ledger WHERE {page_where} "
            "ORDER BY finished_at DESC, request_id DESC LIMIT %s", [*page_params, limit + 1])
        items = []
        for raw in rows[:limit]:
            row = dict(zip(_COLUMNS, raw, strict=True))
            row["cost"] = money(Decimal(str(row["cost"])))
            items.append(row)
        has_more = len(rows) > limit
        return {"object": "usage", "start": start, "end": end, "tenant_id": tenant_id,
                "totals": {"requests": int(count),
                           **{name: int(v) for name, v in zip(_TOKENS, tokens, strict=True)},
                           "cost": money(Decimal(str(cost or 0)))},
                "data": items, "has_more": has_more,
                "next_cursor": UsageCursor.encode(items[-1]["finished_at"],
                                                  items[-1]["request_id"])
                if has_more else None}
