"""Workers whose requests misbehave while the rest of their service (state stream, info,
health) keeps working, so the router keeps choosing them. A fault wraps the worker's engine
(``serve_worker(fault.wrap(engine), ...)``), so a request misbehaves the same whether it came
in a Session (the router's path) or a Generate call."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from core.errors import WorkerUnavailable


class _Fault:
    def __init__(self) -> None:
        self.calls = 0  # requests the worker was given

    def wrap(self, engine: Any) -> Any:
        """``engine`` (an AsyncEngine) with this fault on every request."""
        return _FaultyEngine(engine, self)

    def outputs(self, inner: AsyncIterator[Any]) -> AsyncIterator[Any]:
        raise NotImplementedError


class _FaultyEngine:
    def __init__(self, engine: Any, fault: _Fault):
        self._engine = engine
        self._fault = fault

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        self._fault.calls += 1
        return self._fault.outputs(self._engine.generate(*args, **kwargs))


class FailGenerate(_Fault):
    """Every request fails as a worker failure, before any output."""

    async def outputs(self, inner: AsyncIterator[Any]) -> AsyncIterator[Any]:
        raise WorkerUnavailable("injected failure")
        yield  # unreachable; makes this an async generator


class HangGenerate(_Fault):
    """No request is ever answered."""

    async def outputs(self, inner: AsyncIterator[Any]) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield  # unreachable


class GateGenerate(_Fault):
    """Each request sends its first output, then holds the rest until ``gate`` is set: streams
    stay open (and their requests in flight) for as long as a test needs."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.held = 0  # requests waiting at the gate now

    async def outputs(self, inner: AsyncIterator[Any]) -> AsyncIterator[Any]:
        first = True
        async with contextlib.aclosing(inner):
            async for output in inner:
                yield output
                if first:
                    first = False
                    self.held += 1
                    try:
                        await self.gate.wait()
                    finally:
                        self.held -= 1


class FailAfterFirst(_Fault):
    """Each request sends its first output, then fails as a worker failure whose message
    says what a broken worker's would (``detail``: peers, addresses)."""

    def __init__(self, detail: str) -> None:
        super().__init__()
        self.detail = detail

    async def outputs(self, inner: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async with contextlib.aclosing(inner):
            async for output in inner:
                yield output
                break
        raise WorkerUnavailable(self.detail)
