"""A streamed chat completion's ``chat.completion.chunk`` payloads, built from worker deltas.

Shapes (docs/api.md, "Streaming"): a choice's first chunk carries ``delta.role``; its last one is ``{"index": i,
"delta": {}, "finish_reason": …}``; with ``stream_options.include_usage`` every chunk has
``"usage": null`` and one more chunk with ``"choices": []`` carries the usage.

When the request uses tools, each choice's text goes through a ``ToolCallParser``: content
deltas come first, then per call one delta with its index, id, type, name and
``arguments: ""``, and one with the arguments; such a choice opens with ``content: null`` and a
choice that made calls and stopped by itself finishes with ``tool_calls``.
"""

from __future__ import annotations

from typing import Any

from core.errors import InternalError, WorkerUnavailable
from core.pb.electron.v1 import worker_pb2 as pb
from router.chat.response import (
    finish_reason_of,
    logprob_entries,
    tool_calls_finish,
    usage_body,
)
from router.chat.service import Prepared
from router.chat.usage import Usage
from router.tools.parser import ToolCallParser, stream_deltas


class ChunkStream:
    """One request's chunks: ``add`` each worker delta, then ``end``. ``usage`` is the
    request's count, fed by the generation as the deltas pass (the usage chunk reads it)."""

    def __init__(self, prepared: Prepared, usage: Usage, fingerprint: str):
        self._req, self._n = prepared.request, prepared.n
        self._top = self._req.top_logprobs or 0
        self._base: dict[str, Any] = {
            "id": prepared.completion_id, "object": "chat.completion.chunk",
            "created": prepared.created, "model": prepared.model,
            "system_fingerprint": fingerprint}
        if self._req.include_usage:
            self._base["usage"] = None
        self._started = [False] * self._n
        self._finished = 0
        self._usage = usage
        self._parsers = ([ToolCallParser(prepared.tools.names) for _ in range(self._n)]
                         if prepared.tools is not None else None)

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {**self._base, "choices": [choice]}

    def add(self, message: pb.GenerateResponse) -> list[dict[str, Any]]:
        """The chunks one worker delta makes (maybe none: text held back by the parser)."""
        i = message.index
        if not 0 <= i < self._n:
            raise InternalError(f"the worker sent choice index {i} for n={self._n}")
        logprobs = ({"content": logprob_entries(message.logprobs, self._top), "refusal": None}
                    if self._req.logprobs and message.logprobs else None)
        parser = self._parsers[i] if self._parsers is not None else None
        if parser is None:
            deltas = [{"content": message.text}] if message.text or logprobs is not None else []
        else:
            events = parser.feed(message.text)
            if message.finish_reason:
                events += parser.finish()
            deltas = stream_deltas(events)
        if not self._started[i]:
            # A tool-call choice opens with content null, as a message with calls has it.
            first: dict[str, Any] = {"role": "assistant",
                                     "content": "" if parser is None else None}
            if deltas and "content" in deltas[0]:
                first["content"] = deltas.pop(0)["content"]
            deltas.insert(0, first)
            self._started[i] = True
        if logprobs is not None and not deltas:
            deltas.append({})
        chunks = [self._chunk({"index": i, "delta": delta,
                               "logprobs": logprobs if k == 0 else None, "finish_reason": None})
                  for k, delta in enumerate(deltas)]
        if message.finish_reason:
            reason = finish_reason_of(message.finish_reason)
            if parser is not None and parser.calls:
                reason = tool_calls_finish(reason)
            chunks.append(self._chunk({"index": i, "delta": {}, "logprobs": None,
                                       "finish_reason": reason}))
            self._finished += 1
        return chunks

    @property
    def finished(self) -> bool:
        """Every choice has had its finish chunk."""
        return self._finished >= self._n

    def end(self) -> list[dict[str, Any]]:
        """After the worker's last delta: the usage chunk, when asked for."""
        if self._finished < self._n:
            raise WorkerUnavailable("the worker's stream ended before every choice finished")
        if self._req.include_usage:
            return [{**self._base, "choices": [], "usage": usage_body(self._usage)}]
        return []
