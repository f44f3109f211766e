"""Streamed chat requests from the official openai SDK, one after another per client until
stopped, each recorded with what it saw (when its first content came, how it ended, the
usage it was told) and sent with its own ``X-Request-Id`` (the ledger row's client id)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import openai

from tests.support.serving import Router


@dataclass
class Call:
    client_id: str
    sent: float
    completion_id: str = ""  # the response's id ("chatcmpl-..."), once its first chunk came
    first_content: float | None = None
    ended: float | None = None
    outcome: str = ""  # "ok", "error event" (an error after content), "failed" (no content)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


@dataclass
class Load:
    """Clients each sending one streamed request after another until stopped."""

    base_url: str
    max_tokens: int = 48
    calls: list[Call] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def start(self, clients: int) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 30)

    async def _client(self, n: int) -> None:
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key="unused", max_retries=0,
                                    timeout=30)
        async with client:
            while not self._stop.is_set():
                call = Call(f"load-{n}-{uuid.uuid4().hex[:8]}", time.monotonic())
                self.calls.append(call)
                try:
                    stream = await client.chat.completions.create(
                        model="electron", stream=True, max_tokens=self.max_tokens, temperature=0,
                        messages=[{"role": "user", "content": f"client {n}: count slowly"}],
                        stream_options={"include_usage": True},
                        extra_headers={"X-Request-Id": call.client_id},
                        extra_body={"ignore_eos": True})
                    async for chunk in stream:
                        call.completion_id = call.completion_id or chunk.id
                        if chunk.choices and chunk.choices[0].delta.content \
                                and call.first_content is None:
                            call.first_content = time.monotonic()
                        if chunk.usage is not None:
                            call.prompt_tokens = chunk.usage.prompt_tokens
                            call.completion_tokens = chunk.usage.completion_tokens
                    call.outcome = "ok"
                except openai.APIError as exc:
                    call.outcome = "failed" if call.first_content is None else "error event"
                    call.error = f"{type(exc).__name__}: {exc}"
                call.ended = time.monotonic()


async def steady_load(router: Router, workers: int, clients: int = 4,
                      max_tokens: int = 16) -> Load:
    """Once ``router`` has connected ``workers`` workers: ``clients`` clients streaming
    through it, returned when twice as many requests have succeeded (the cluster serves)."""
    while len(router.worker_ids()) < workers:
        await asyncio.sleep(0.05)
    load = Load(router.base + "/v1", max_tokens=max_tokens)
    load.start(clients)
    while sum(c.outcome == "ok" for c in load.calls) < 2 * clients:
        await asyncio.sleep(0.05)
    return load
