"""Per-tenant request limits: requests per minute, requests in flight and tokens per minute
(docs/api.md, "Plans and limits"), shared by every router replica.

``RedisLimiter`` makes each check one round trip: a Lua script (EVALSHA) that, atomically on
the Redis server and with the server's clock,
  1. answers "revoked" if the key id is in the tenant's revoked set (or "not loaded" when the
     set lacks ``REVOKED_LOADED``: Redis restarted empty or was flushed; the limiter then
     loads the tenant's revoked keys from the database and asks again),
  2. drops RPM entries older than 60 s (a sliding-window log: one sorted-set member per
     admitted request, scored by its time) and concurrency leases past their expiry,
  3. refuses if the window is full or every slot is taken, else records both.
A concurrency slot is a member of the tenant's lease set scored by its expiry; the replica
holding it renews its leases every third of ``slot_lease_s``, so the slots of a replica that
died expire on their own within one lease. A request takes one slot per sequence it asks
for (``n``): three n=16 requests hold 48 of the plan's concurrency, as they hold 48 batch
slots of the workers. ``InProcessLimiter`` is the same, for one replica.

Tokens per minute are counted per calendar minute, reserved before the work starts and
settled when it ends: ``Slot.reserve`` adds the request's whole budget (prompt + n x max
tokens, at most the plan's TPM) to the minute's count, atomically refusing when it would
pass the limit (``_RESERVE_LUA`` in Redis); ``release`` replaces the reservation by the
tokens used, in the minute it was made. So requests in flight can never together overshoot
the limit by more than what one request at an empty minute may use.

A ``Slot`` is released exactly once (``release`` is idempotent), by whoever ends the
request; the router calls it from one place (``router.tenancy.admission``).

Every key a tenant's checks touch is ``<prefix>:{<tenant id>}:<name>`` (``tenant_key``): one
Redis Cluster hash tag per tenant, so each script runs on one cluster slot.

While Redis cannot be reached the router still starts and serves what needs no limit (health,
readiness, the admin API); each request that needs Redis gets a fast 503
(``LimitStoreUnavailable``, ``Retry-After``), never a 500, and never in-process limits (each
replica alone would let a tenant through N times its plan). A revocation Redis could not take
is kept and sent again until it does (the database has it already).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from core.errors import AuthenticationFailed, Overloaded, RateLimited
from router.tenancy.store import REVOKED_LOADED, Principal, revoked_keys_set, tenant_key

log = logging.getLogger(__name__)

WINDOW_S = 60.0

# KEYS: rpm log, concurrency leases, the tenant's revoked key ids, this minute's token count.
# ARGV: rpm limit, concurrency limit, slot id, lease ms, key id, tpm limit (0: none), ms left
# in this minute, sequences (lease members "<slot id>:<i>", i < sequences), REVOKED_LOADED.
# Returns {verdict, rpm used, ms until the limit resets}; verdict 0 admitted, 1 over the RPM
# limit, 2 over the concurrency limit, 3 revoked key, 4 over the tokens-per-minute limit,
# 5 the revoked set is not loaded (nothing recorded).
_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[5] ~= '' then
  if redis.call('SISMEMBER', KEYS[3], ARGV[9]) == 0 then
    return {5, 0, 0}
  end
  if redis.call('SISMEMBER', KEYS[3], ARGV[5]) == 1 then
    return {3, 0, 0}
  end
end
local window = 60000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local used = redis.call('ZCARD', KEYS[1])
local reset = 0
if used > 0 then
  reset = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]) + window - now
end
if redis.call('ZSCORE', KEYS[2], ARGV[3] .. ':0') then
  -- This slot is held already: a resend of an admission whose reply was lost (the
  -- client sends again after a broken connection). Admitted, and counted once.
  return {0, used, reset}
end
if used >= tonumber(ARGV[1]) then
  return {1, used, reset}
end
local width = tonumber(ARGV[8])
if redis.call('ZCARD', KEYS[2]) + width > tonumber(ARGV[2]) then
  return {2, used, reset}
end
if tonumber(ARGV[6]) > 0 and tonumber(redis.call('GET', KEYS[4]) or '0') >= tonumber(ARGV[6]) then
  return {4, used, tonumber(ARGV[7])}
end
local lease = tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
for i = 0, width - 1 do
  redis.call('ZADD', KEYS[2], now + lease, ARGV[3] .. ':' .. i)
end
redis.call('PEXPIRE', KEYS[2], lease)
if used == 0 then reset = window end
return {0, used + 1, reset}
"""

# KEYS: this minute's token count; ARGV: tokens to reserve, tpm limit.
# Returns {1 reserved | 0 refused, the minute's count}.
_RESERVE_LUA = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local want = tonumber(ARGV[1])
if used + want > tonumber(ARGV[2]) then
  return {0, used}
end
redis.call('INCRBY', KEYS[1], want)
redis.call('EXPIRE', KEYS[1], 120)
return {1, used + want}
"""

# KEYS: concurrency leases; ARGV: new expiry offset (ms), slot ids. Extends leases still held.
_RENEW_LUA = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 0
"""


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    reason: str | None   # None, "rpm", "concurrency", "tpm" or "revoked"
    rpm_limit: int
    rpm_used: int
    reset_s: float       # until the oldest request in the window leaves it

    def headers(self) -> dict[str, str]:
        return {"x-ratelimit-limit-requests": str(self.rpm_limit),
                "x-ratelimit-remaining-requests": str(max(0, self.rpm_limit - self.rpm_used)),
                "x-ratelimit-reset-requests": duration(self.reset_s)}


def duration(seconds: float) -> str:
    """OpenAI's reset header format: ``"20ms"``, ``"6s"``, ``"1m30s"``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    rest_s = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest_s}s" if minutes else f"{rest_s}s"


@dataclass(eq=False)
class Slot:
    """One admitted request's concurrency slot and its place in the RPM window."""

    tenant_id: str
    slot_id: str
    verdict: Verdict
    _limiter: Limiter = field(repr=False)
    principal: Principal | None = field(default=None, repr=False)
    sequences: int = 1                # concurrency it takes: one per sequence (n)
    reserved: int = 0                 # tokens reserved against the plan's TPM
    minute: int | None = None         # the calendar minute they were reserved in
    _released: bool = field(default=False, repr=False)

    @property
    def members(self) -> list[str]:
        """Its entries in the tenant's lease set, one per sequence."""
        return [f"{self.slot_id}:{i}" for i in range(self.sequences)]

    async def reserve(self, tokens: int) -> None:
        """Reserves ``tokens`` (at most the plan's TPM) in this minute's token count, or
        ``RateLimited`` when they do not fit; nothing on plans without TPM."""
        plan = self.principal.plan if self.principal is not None else None
        if plan is None or plan.tpm is None or self._released or tokens <= 0:
            return
        tokens = min(tokens, plan.tpm)
        minute = int(time.time() // 60)
        if self.minute is not None and self.minute != minute:
            minute = self.minute  # one slot's tokens stay in one minute
        await self._limiter._reserve(self, tokens, minute)
        self.reserved += tokens
        self.minute = minute

    def release(self, tokens: int = 0) -> None:
        """Gives the slot back; ``tokens`` (prompt + completion used) replace the
        reservation in the plan's tokens per minute."""
        if not self._released:
            self._released = True
            self._limiter._release(self, tokens)


def tpm_refusal(principal: Principal, rpm_used: int) -> Exception:
    return refusal(Verdict(False, "tpm", principal.plan.rpm, rpm_used, 60 - time.time() % 60),
                   principal)


def refusal(verdict: Verdict, principal: Principal) -> Exception:
    if verdict.reason == "revoked":
        return AuthenticationFailed("Incorrect API key provided: this key was revoked.")
    plan = principal.plan
    if verdict.reason == "tpm":
        return RateLimited(
            f"Rate limit reached for tenant {principal.tenant_id} on tokens per minute "
            f"(TPM): limit {plan.tpm}. Please try again in {duration(verdict.reset_s)}.",
            retry_after=verdict.reset_s, code="rate_limit_exceeded",
            headers={**verdict.headers(), "x-ratelimit-limit-tokens": str(plan.tpm)})
    if verdict.reason == "rpm":
        return RateLimited(
            f"Rate limit reached for tenant {principal.tenant_id} on requests per minute "
            f"(RPM): limit {plan.rpm}, used {verdict.rpm_used}. Please try again in "
            f"{duration(verdict.reset_s)}.", retry_after=verdict.reset_s,
            code="rate_limit_exceeded", headers=verdict.headers())
    return RateLimited(
        f"Concurrency limit reached for tenant {principal.tenant_id}: {plan.concurrency} "
        "sequences in flight (n counts each). Please retry when one of them finishes.",
        retry_after=1.0,
        code="concurrency_limit_exceeded", headers=verdict.headers())


class Limiter:
    """The interface both limiters keep."""

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Releases every slot this replica still holds."""

    async def admit(self, principal: Principal, sequences: int = 1) -> Slot:
        """A slot of ``sequences`` (the request's n, at most the plan's concurrency), or
        ``RateLimited`` / ``AuthenticationFailed`` (a revoked key)."""
        raise NotImplementedError

    async def revoke(self, tenant_id: str, key_id: str) -> None:
        """Every replica refuses ``key_id`` (of ``tenant_id``) from now on."""
        raise NotImplementedError

    async def is_revoked(self, tenant_id: str, key_id: str) -> bool:
        raise NotImplementedError

    async def _reserve(self, slot: Slot, tokens: int, minute: int) -> None:
        raise NotImplementedError

    def _release(self, slot: Slot, tokens: int) -> None:
        raise NotImplementedError

    def in_flight(self, tenant_id: str) -> int:
        """This replica's slots of the tenant, a sequence each (tests, metrics)."""
        raise NotImplementedError


class InProcessLimiter(Limiter):
    def __init__(self) -> None:
        self._log: dict[str, collections.deque[float]] = collections.defaultdict(
            collections.deque)
        self._held: dict[str, set[str]] = collections.defaultdict(set)
        self._tokens: dict[str, tuple[int, int]] = {}  # tenant -> (minute, tokens used)
        self._revoked: set[str] = set()

    async def admit(self, principal: Principal, sequences: int = 1) -> Slot:
        if principal.key_id is not None and principal.key_id in self._revoked:
            raise refusal(Verdict(False, "revoked", 0, 0, 0), principal)
        now = time.monotonic()
        tenant, plan = principal.tenant_id, principal.plan
        entries = self._log[tenant]
        while entries and entries[0] <= now - WINDOW_S:
            entries.popleft()
        used = len(entries)
        reset = entries[0] + WINDOW_S - now if entries else WINDOW_S
        reason = None
        if used >= plan.rpm:
            reason = "rpm"
        elif len(self._held[tenant]) + sequences > plan.concurrency:
            reason = "concurrency"
        elif plan.tpm is not None and self._tokens_this_minute(tenant) >= plan.tpm:
            reason, reset = "tpm", 60 - time.time() % 60
        if reason is not None:
            raise refusal(Verdict(False, reason, plan.rpm, used, reset), principal)
        entries.append(now)
        slot = Slot(tenant, uuid.uuid4().hex, Verdict(True, None, plan.rpm, used + 1, reset),
                    self, principal, sequences)
        self._held[tenant].update(slot.members)
        return slot

    async def _reserve(self, slot: Slot, tokens: int, minute: int) -> None:
        assert slot.principal is not None and slot.principal.plan.tpm is not None
        used = self._tokens_in(slot.tenant_id, minute)
        if used + tokens > slot.principal.plan.tpm:
            raise tpm_refusal(slot.principal, slot.verdict.rpm_used)
        self._tokens[slot.tenant_id] = (minute, used + tokens)

    def _release(self, slot: Slot, tokens: int) -> None:
        self._held[slot.tenant_id].difference_update(slot.members)
        minute = slot.minute if slot.minute is not None else int(time.time() // 60)
        delta = tokens - slot.reserved
        if delta and minute == int(time.time() // 60):  # a past minute no longer counts
            used = self._tokens_in(slot.tenant_id, minute)
            self._tokens[slot.tenant_id] = (minute, max(0, used + delta))

    def _tokens_in(self, tenant_id: str, minute: int) -> int:
        counted, used = self._tokens.get(tenant_id, (0, 0))
        return used if counted == minute else 0

    def _tokens_this_minute(self, tenant_id: str) -> int:
        return self._tokens_in(tenant_id, int(time.time() // 60))

    async def revoke(self, tenant_id: str, key_id: str) -> None:
        self._revoked.add(key_id)

    async def is_revoked(self, tenant_id: str, key_id: str) -> bool:
        return key_id in self._revoked

    def in_flight(self, tenant_id: str) -> int:
        return len(self._held.get(tenant_id, ()))


class LimitStoreUnavailable(Overloaded):
    """The limit store (Redis: limits, slots, revocations) cannot be reached or answered an
    error: a 503 the client retries; its message (naming the host) is for the log. The app
    answers any ``RedisError`` a route meets as this (router/api/app.py)."""

    public_text = "The rate limit store is unavailable; retry shortly."

    @classmethod
    def of(cls, exc: Exception) -> LimitStoreUnavailable:
        return cls(f"the limit store is unavailable: {type(exc).__name__}: {exc}",
                   retry_after=1.0)


def _unavailable(exc: Exception) -> LimitStoreUnavailable:
    log.warning("the limit store is unavailable: %s: %s", type(exc).__name__, exc)
    return LimitStoreUnavailable.of(exc)


class RedisLimiter(Limiter):
    def __init__(self, url: str, *, prefix: str, slot_lease_s: float,
                 revoked_of: Callable[[str], Awaitable[Collection[str]]] | None = None):
        """``revoked_of(tenant_id)``: the tenant's revoked key ids from the database, what
        a revoked-keys set Redis lost is loaded from (None: no database, nothing to load)."""
        # A command that meets a connection Redis closed (it restarted) is sent once more, on
        # a new connection, at once; a timeout is not (it would double the wait).
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=3,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
        self._prefix = prefix
        self._revoked_of = revoked_of
        self._unsent_revocations: set[tuple[str, str]] = set()
        self._lease_ms = max(1, int(slot_lease_s * 1000))
        self._admit = self._redis.register_script(_ADMIT_LUA)
        self._renew = self._redis.register_script(_RENEW_LUA)
        self._reserve_script = self._redis.register_script(_RESERVE_LUA)
        self._held: dict[str, set[str]] = collections.defaultdict(set)
        self._releases: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None

    def _keys(self, tenant_id: str) -> tuple[str, str]:
        return tenant_key(self._prefix, tenant_id, "rpm"), tenant_key(self._prefix, tenant_id,
                                                                      "slots")

    def admit_keys(self, tenant_id: str, now: float) -> list[str]:
        """The keys the admission script of ``tenant_id`` touches (one hash tag)."""
        return [*self._keys(tenant_id), revoked_keys_set(self._prefix, tenant_id),
                self._tpm_key(tenant_id, now)]

    async def start(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as exc:  # serve anyway: what needs Redis gets a 503 until it is back
            log.error("the limit store (Redis) is unreachable at start (%s: %s): requests "
                      "that need limits or revocations get 503 until it answers",
                      type(exc).__name__, exc)
        self._renewer = asyncio.create_task(self._renew_loop(), name="slot-lease-renewer")

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        held = [(t, s) for t, slots in self._held.items() for s in slots]
        self._held.clear()
        if held:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for tenant, slot_id in held:
                        pipe.zrem(self._keys(tenant)[1], slot_id)
                    await pipe.execute()
            except Exception as exc:  # they expire with their leases
                log.warning("could not release %d slots at shutdown: %s", len(held), exc)
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        await self._redis.aclose()

    async def admit(self, principal: Principal, sequences: int = 1) -> Slot:
        plan = principal.plan
        slot_id = uuid.uuid4().hex
        for attempt in range(2):
            now = time.time()
            try:
                verdict_code, used, reset_ms = await self._admit(
                    keys=self.admit_keys(principal.tenant_id, now),
                    args=[plan.rpm, plan.concurrency, slot_id, self._lease_ms,
                          principal.key_id or "", plan.tpm or 0, int((60 - now % 60) * 1000),
                          sequences, REVOKED_LOADED])
            except RedisError as exc:
                # Limits cannot be checked: refuse (a 503 the client retries), never serve
                # unmetered.
                raise _unavailable(exc) from None
            if int(verdict_code) != 5 or attempt:
                break
            await self._load_revoked(principal.tenant_id)
        if int(verdict_code) == 5:  # emptied again at once: nothing is believed unloaded
            raise LimitStoreUnavailable("the revoked-keys set did not stay loaded")
        reason = (None, "rpm", "concurrency", "revoked", "tpm")[int(verdict_code)]
        verdict = Verdict(reason is None, reason, plan.rpm, int(used), int(reset_ms) / 1000)
        if reason is not None:
            raise refusal(verdict, principal)
        slot = Slot(principal.tenant_id, slot_id, verdict, self, principal, sequences)
        self._held[principal.tenant_id].update(slot.members)
        return slot

    def _tpm_key(self, tenant_id: str, now: float) -> str:
        return self._tpm_minute_key(tenant_id, int(now // 60))

    def _tpm_minute_key(self, tenant_id: str, minute: int) -> str:
        return tenant_key(self._prefix, tenant_id, f"tpm:{minute}")

    async def _reserve(self, slot: Slot, tokens: int, minute: int) -> None:
        assert slot.principal is not None and slot.principal.plan.tpm is not None
        try:
            reserved, _ = await self._reserve_script(
                keys=[self._tpm_minute_key(slot.tenant_id, minute)],
                args=[tokens, slot.principal.plan.tpm])
        except RedisError as exc:
            raise _unavailable(exc) from None
        if not int(reserved):
            raise tpm_refusal(slot.principal, slot.verdict.rpm_used)

    def _release(self, slot: Slot, tokens: int) -> None:
        self._held[slot.tenant_id].difference_update(slot.members)
        task = asyncio.get_running_loop().create_task(self._give_back(slot, tokens))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _give_back(self, slot: Slot, tokens: int) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrem(self._keys(slot.tenant_id)[1], *slot.members)
                delta = tokens - slot.reserved  # the reservation settled to the tokens used
                if delta:
                    minute = slot.minute if slot.minute is not None else int(time.time() // 60)
                    key = self._tpm_minute_key(slot.tenant_id, minute)
                    pipe.incrby(key, delta)
                    pipe.expire(key, 120)
                await pipe.execute()
        except Exception as exc:  # the lease expires on its own
            log.warning("releasing slot %s failed (it expires with its lease): %s",
                        slot.slot_id, exc)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                for tenant, slots in [(t, list(s)) for t, s in self._held.items() if s]:
                    await self._renew(keys=[self._keys(tenant)[1]],
                                      args=[self._lease_ms, *slots])
                for tenant, key_id in list(self._unsent_revocations):
                    await self._redis.sadd(revoked_keys_set(self._prefix, tenant), key_id)
                    self._unsent_revocations.discard((tenant, key_id))
                    log.info("revocation of key %s reached the limit store", key_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("renewing slot leases failed: %s", exc)

    async def revoke(self, tenant_id: str, key_id: str) -> None:
        """The database has the revocation already: if Redis cannot take it now, it is sent
        again until it does (and a Redis that comes back empty loads it from the database)."""
        try:
            await self._redis.sadd(revoked_keys_set(self._prefix, tenant_id), key_id)
        except RedisError as exc:
            log.warning("the limit store is unavailable (%s); the revocation of key %s is "
                        "sent again until it answers", exc, key_id)
            self._unsent_revocations.add((tenant_id, key_id))

    async def is_revoked(self, tenant_id: str, key_id: str) -> bool:
        key = revoked_keys_set(self._prefix, tenant_id)
        for attempt in range(2):
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    loaded, revoked = await pipe.sismember(key, REVOKED_LOADED) \
                        .sismember(key, key_id).execute()
            except RedisError as exc:
                raise _unavailable(exc) from None
            if loaded or attempt:
                break
            await self._load_revoked(tenant_id)
        if not loaded:
            raise LimitStoreUnavailable("the revoked-keys set did not stay loaded")
        return bool(revoked)

    async def _load_revoked(self, tenant_id: str) -> None:
        """Copies the tenant's revoked keys from the database into its set, marked loaded
        last. While the database is unavailable too, ``DatabaseUnavailable`` (a 503): a key
        is never believed unrevoked for want of the set."""
        revoked = list(await self._revoked_of(tenant_id)) if self._revoked_of else []
        key = revoked_keys_set(self._prefix, tenant_id)
        try:
            for i in range(0, len(revoked), 1000):
                await self._redis.sadd(key, *revoked[i:i + 1000])
            await self._redis.sadd(key, REVOKED_LOADED)
        except RedisError as exc:
            raise _unavailable(exc) from None
        log.info("loaded %d revoked keys of tenant %s into the limit store", len(revoked),
                 tenant_id)

    def in_flight(self, tenant_id: str) -> int:
        return len(self._held.get(tenant_id, ()))

    async def slots_in_use(self, tenant_id: str) -> int:
        """Live slots of the tenant over every replica (tests)."""
        key = self._keys(tenant_id)[1]
        now_ms = int(time.time() * 1000)
        return int(await self._redis.zcount(key, now_ms, "+inf"))


def make_limiter(redis_url: str | None, *, prefix: str, slot_lease_s: float,
                 revoked_of: Callable[[str], Awaitable[Collection[str]]] | None = None
                 ) -> Limiter:
    if redis_url:
        return RedisLimiter(redis_url, prefix=prefix, slot_lease_s=slot_lease_s,
                            revoked_of=revoked_of)
    return InProcessLimiter()
