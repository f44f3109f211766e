"""The usage ledger: one row per finished or disconnected request, never lost.

Write-ahead: ``record`` appends the row to this process's spool file at once (one JSON line,
an O_APPEND write: a process killed a moment later, even by SIGKILL, has it on disk, in the
kernel's page cache). A background task flushes every ``flush_s`` (or at once when ``batch``
rows wait): it seals the spool (renamed to ``<spool>.replay`` and fsynced: a batch is durable
before it goes to the database, so a machine crash loses at most the rows since the last
flush) and writes the replay file to the database in batches of ``batch`` rows, each in one
transaction, then removes it. While the database cannot be reached the replay file is kept
(only the rows not yet written) and the spool goes on growing behind it; the flusher writes
both once the database answers again. At start a ledger takes over what a previous run of
its process left (its spool, its replay file) and replays it the same way, in bounded
batches. Each router process has a spool of its own (cluster/router_processes.py).

A row's key (``request_id``) is made by the server for each request, never the client's
``X-Request-Id`` (kept as ``client_request_id``): N requests are N rows, whatever headers
they carry, and a replay that is interrupted and repeated writes no row twice (the insert
leaves a row it already has as it is).

Requests open at a crash: ``open`` lists an admitted request until its row is recorded, and
each flush appends to the new spool, for every request still open, its row so far
(provisional: status ``interrupted``, the tokens billed until then, tagged with this run's
id). This run never writes its own provisional rows; a later run replaying the spool
does: a request whose own row never came (the process died with it open) is billed what
its last provisional row says, at most one flush interval behind what was sent. The insert
lets a request's own row (or a later provisional one) replace a provisional row, never the
reverse.

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
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from core.aio import within
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
# A provisional row (status ``interrupted``: the router died with the request open) gives way
# to the request's own row, and to a later provisional one; any other row stays as written.
PROVISIONAL_STATUS = "interrupted"
_INSERT = (f"INSERT INTO usage_ledger ({', '.join(_COLUMNS)}) VALUES "
           f"({', '.join(['%s'] * len(_COLUMNS))}) ON CONFLICT (request_id) DO UPDATE SET "
           + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c != "request_id")
           + f" WHERE usage_ledger.status = '{PROVISIONAL_STATUS}'")


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
        # Its fields are flat scalars: a shallow copy (``dataclasses.asdict`` deep-copies
        # each value, which a profile of the router showed among its costs per request).
        out = dict(self.__dict__)
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
        self.spool_path = Path(spool_path).expanduser()  # the write-ahead file
        self.replay_path = self.spool_path.with_name(self.spool_path.name + ".replay")
        self.dead_letter_path = self.spool_path.with_name(self.spool_path.name + ".dead")
        self.quarantined = 0  # rows the database refused, written to the dead-letter file
        self.on_quarantine: Callable[[int], None] | None = None  # the metric's counter
        # While True (the schema is not migrated yet: the database was down at start) rows
        # only go to the spool; ``resume`` lets them go on to the database.
        self.paused = False
        self.run_id = uuid.uuid4().hex  # this process's run: its provisional rows are its own
        self._flush_s = flush_s
        self._batch = batch
        self._fd: int | None = None  # the spool, open for appending
        self._recorded = 0           # rows recorded since the last flush
        self._unsaved: list[UsageRow] = []  # rows the spool could not take (a disk error)
        self._open: dict[str, Callable[[], UsageRow]] = {}  # request id -> its row so far
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        # The files' work on threads, one at a time: a flush cancelled (``stop``) still
        # waits for its thread, to keep the rows it could not save.
        self._persist_lock = threading.Lock()
        # Spools this ledger takes over at start: those of router processes that no longer
        # run (``electron-serve router --processes`` lowered; cluster/router_processes.py).
        self.adopt_spools: list[Path] = []

    # -- lifecycle

    async def start(self) -> None:
        """Takes what a previous run left (its spool, and the spools adopted) into the replay
        file and, unless paused, writes it to the database in batches."""
        try:
            await asyncio.to_thread(self._take_over)
            if not self.paused:
                await asyncio.to_thread(self._replay)
        except Exception:  # the flusher tries again; a start never fails on the spool
            log.exception("ledger: replaying the spool at start failed; it is kept")
        self._flusher = asyncio.create_task(self._flush_loop(), name="ledger-flusher")

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        if not await self.flush():
            await self.flush()  # the spool, held back while the replay file was written
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def resume(self) -> None:
        """The database is ready (migrated): rows go on to it from the next flush."""
        self.paused = False
        self._wake.set()

    # -- writing

    def open(self, request_id: str, progress: Callable[[], UsageRow]) -> None:
        """An admitted request, until ``record`` writes its row: at each flush the spool gets
        its row so far (``progress()``, status ``interrupted``), which only a later run
        writes, if this one never wrote the request's own row (it died first)."""
        self._open[request_id] = progress

    def record(self, row: UsageRow) -> None:
        """Appends the row to the spool at once (a process killed after this loses it not);
        the flusher fsyncs and writes it to the database."""
        self._open.pop(row.request_id, None)
        if not self._append_spool([_line(row)]):
            self._unsaved.append(row)
        self._recorded += 1
        if self._recorded >= self._batch:
            self._wake.set()

    async def flush(self) -> bool:
        """Seals the spool (fsynced) into the replay file and writes that to the database in
        batches. True when everything recorded so far is in the database."""
        async with self._flush_lock:
            self._recorded = 0
            held = self._fd is not None and self.replay_path.exists()
            sealed = self._rotate()
            unsaved, self._unsaved = self._unsaved, []
            work = asyncio.ensure_future(asyncio.to_thread(self._persist, sealed, unsaved))
            try:
                left, done = await asyncio.shield(work)
            except asyncio.CancelledError:
                # The thread goes on whatever happens here: the rows it cannot save come
                # back before the next flush (stop's) takes the lock, not lost with this one.
                left, _ = await work
                self._unsaved[:0] = left
                raise
            self._unsaved[:0] = left
            return done and not left and not held

    @property
    def spooled(self) -> int:
        """Rows on disk not yet known to be in the database (provisional ones aside)."""
        count = 0
        for path in (self.replay_path, self.spool_path):
            try:
                with path.open("rb") as f:
                    count += sum(1 for line in f if b'"provisional"' not in line)
            except FileNotFoundError:
                pass
        return count

    async def _flush_loop(self) -> None:
        while True:
            try:
                await within(self._wake.wait(), self._flush_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ledger flush failed")

    def _append_spool(self, lines: list[bytes]) -> bool:
        """On the event loop: an O_APPEND write of a few hundred bytes to the page cache."""
        try:
            if self._fd is None:
                self.spool_path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.spool_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                   0o600)
            data = b"".join(lines)
            while data:
                data = data[os.write(self._fd, data):]
            return True
        except OSError:
            log.exception("ledger: the spool %s cannot be written; the row waits in memory",
                          self.spool_path)
            return False

    def _rotate(self) -> int | None:
        """On the event loop, so no row is appended meanwhile: the spool becomes the replay
        file when there is none (else it goes on growing until the replay file is written),
        and the new spool starts with the rows so far of the requests still open. Returns
        the sealed spool's descriptor (to fsync and close), or None."""
        sealed = None
        if self._fd is not None and not self.replay_path.exists():
            os.rename(self.spool_path, self.replay_path)
            sealed, self._fd = self._fd, None
        if self._open:
            self._append_spool([_line(progress(), provisional=self.run_id)
                                for progress in self._open.values()])
        return sealed

    def _persist(self, sealed: int | None, unsaved: list[UsageRow]
                 ) -> tuple[list[UsageRow], bool]:
        """On a thread: fsyncs the spool (a batch is on disk before it goes to the
        database), then writes the replay file and the rows the spool could not take.
        Returns the rows still unsaved, and whether the replay file was written."""
        with self._persist_lock:
            return self._persist_locked(sealed, unsaved)

    def _persist_locked(self, sealed: int | None, unsaved: list[UsageRow]
                        ) -> tuple[list[UsageRow], bool]:
        if sealed is not None:
            os.fsync(sealed)
            os.close(sealed)
        fd = self._fd
        if fd is not None:
            try:
                os.fsync(fd)
            except OSError:  # closed by a stop meanwhile: fsynced there
                pass
        if self.paused:
            return unsaved, False
        try:
            self._insert(unsaved)
            unsaved = []
        except _Unwritten as exc:
            unsaved = exc.rows
        return unsaved, self._replay()

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
        _append(self.dead_letter_path, [json.dumps(entry).encode() + b"\n"])
        self.quarantined += 1
        if self.on_quarantine is not None:
            self.on_quarantine(1)
        log.error("ledger: row %s quarantined in %s: %s",
                  row.request_id if row is not None else "(unreadable)",
                  self.dead_letter_path, reason[:200])

    def _take_over(self) -> None:
        """At start, before anything is recorded: the spool a previous run of this process
        left, then each adopted spool (and its replay file), go to the end of the replay
        file (fsynced before the other file goes). A crash in between leaves rows in both
        files; the ledger's insert skips a request id it already has."""
        for path in [self.spool_path, *(q for p in self.adopt_spools
                                        for q in (Path(p).with_name(Path(p).name + ".replay"),
                                                  Path(p)))]:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size and not self.replay_path.exists() and path == self.spool_path:
                _fsync_file(path)
                os.rename(path, self.replay_path)
            else:
                with path.open("rb") as f:
                    data = f.read()
                if data and not data.endswith(b"\n"):
                    data += b"\n"  # a torn last line stays one line (quarantined on replay)
                if data:
                    _append(self.replay_path, [data])
                path.unlink()
            if path != self.spool_path:
                log.info("ledger: took over the spooled rows of %s", path)

    def _replay(self) -> bool:
        """Writes the replay file to the database, ``batch`` rows at a time; True once it is
        all written (the file removed), False (the rest kept) if the database went down."""
        try:
            f = self.replay_path.open("rb")
        except FileNotFoundError:
            return True
        with f:
            written = 0
            while True:
                batch: list[tuple[int, UsageRow]] = []  # (its line's offset, the row)
                while len(batch) < self._batch:
                    offset = f.tell()
                    line = f.readline()
                    if not line:
                        break
                    row = self._replayed(line)
                    if row is not None:
                        batch.append((offset, row))
                if not batch:
                    break
                try:
                    self._insert([row for _, row in batch])
                except _Unwritten as exc:
                    self._keep_from(f, batch[len(batch) - len(exc.rows)][0])
                    log.warning("ledger database unavailable (%s): %d rows written, the rest "
                                "wait in %s", exc.cause, written, self.replay_path)
                    return False
                written += len(batch)
        self.replay_path.unlink()
        if written:
            log.info("ledger: %d spooled rows written", written)
        return True

    def _replayed(self, line: bytes) -> UsageRow | None:
        """A spool line's row; None for this run's own provisional rows (the request's own
        row comes) and for a torn line (quarantined: the rows around it still count)."""
        try:
            data = orjson.loads(line)
            provisional = data.pop("provisional", None)
            if provisional == self.run_id:
                return None
            return UsageRow.from_dict(data)
        except (ValueError, TypeError, AttributeError) as exc:
            self._quarantine(None, f"unreadable spool line: {exc}", raw=line[:4096])
            return None

    def _keep_from(self, f, offset: int) -> None:
        """Keeps only the replay file's lines from ``offset`` on (atomically)."""
        partial = self.replay_path.with_name(self.replay_path.name + ".tmp")
        with partial.open("wb") as out:
            f.seek(offset)
            shutil.copyfileobj(f, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, self.replay_path)


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


def _line(row: UsageRow, provisional: str | None = None) -> bytes:
    data = row.as_dict()
    if provisional is not None:
        data["provisional"] = provisional
    return orjson.dumps(data) + b"\n"


def _append(path: Path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        f.write(b"".join(lines))
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())
