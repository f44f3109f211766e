"""Tool calls read back from generated text, incrementally (``<tool_call>{json}</tool_call>``).

The same parser serves streamed and whole responses: a whole response is ``feed(text)`` then
``finish()``, a stream feeds each delta as it comes; any chunking of the same text yields the
same content and the same calls (a property test holds it to that).

What comes out:
- ``ContentDelta``: text outside the calls (the filler sentence, or a plain answer in ``auto``
  mode). Content is trimmed: whitespace at its start, at its end and around calls where nothing
  follows is dropped, so a stream never sends content that the whole response would not have.
- ``ToolCall``: one complete call (``call_`` id, name, arguments as a JSON string), emitted only
  once ``</tool_call>`` has arrived and its JSON parsed as ``{"name": <a declared tool>,
  "arguments": {...}}``. A call is never emitted half-parsed: text that could still become
  ``<tool_call>`` is held back until it is known to be one or not.
- A block that turns out not to be a valid call (bad JSON, an undeclared name, unclosed when the
  generation ends, e.g. at ``max_tokens``) is dropped: it is neither a call nor content, so a
  half-written call is never run and never read out by a text-to-speech layer. With the
  worker's grammar (required / named modes, and auto once a call opens) this happens only when
  the generation is cut short, and ``finish_reason: "length"`` says so.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from typing import Any

from core.protocol import TOOL_CALL_CLOSE as CLOSE
from core.protocol import TOOL_CALL_OPEN as OPEN

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str  # a JSON object's text

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


Event = ContentDelta | ToolCall


def stream_deltas(events: list[Event]) -> list[dict[str, Any]]:
    """The chunk ``delta`` objects of some events, in order: adjacent content joined; a call as
    one delta with its index, id, type, name and empty arguments, then one with the arguments
    (OpenAI's shape, which the SDKs' stream accumulation expects)."""
    deltas: list[dict[str, Any]] = []
    for event in events:
        if isinstance(event, ContentDelta):
            if deltas and "content" in deltas[-1]:
                deltas[-1]["content"] += event.text
            else:
                deltas.append({"content": event.text})
            continue
        deltas.append({"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                       "function": {"name": event.name, "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": event.index,
                                       "function": {"arguments": event.arguments}}]})
    return deltas


def _held_prefix(text: str, marker: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class ToolCallParser:
    """Reads one choice's generated text. ``names``: the declared tools."""

    def __init__(self, names: frozenset[str]):
        self._names = names
        self._buffer = ""        # text not yet classified (a call's body, or a possible OPEN)
        self._in_call = False
        self._searched = 0       # how much of a call's body was already searched for CLOSE
        self._content_started = False
        self._held_space = ""    # whitespace that only counts if more content follows
        self.calls = 0

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        self._buffer += text
        while True:
            if self._in_call:
                end = self._buffer.find(CLOSE, self._searched)
                if end < 0:
                    self._searched = max(0, len(self._buffer) - len(CLOSE) + 1)
                    return events
                body, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE):]
                self._in_call, self._searched = False, 0
                call = self._call(body)
                if call is not None:
                    events.append(call)
                continue
            start = self._buffer.find(OPEN)
            if start >= 0:
                self._content(self._buffer[:start], events)
                self._buffer = self._buffer[start + len(OPEN):]
                self._in_call = True
                continue
            keep = _held_prefix(self._buffer, OPEN)
            cut = len(self._buffer) - keep
            self._content(self._buffer[:cut], events)
            self._buffer = self._buffer[cut:]
            return events

    def finish(self) -> list[Event]:
        """The end of the text: a held-back partial marker is content; an unclosed call is
        dropped."""
        events: list[Event] = []
        if not self._in_call:
            self._content(self._buffer, events)
        self._buffer, self._in_call = "", False
        self._held_space = ""
        return events

    def _content(self, text: str, events: list[Event]) -> None:
        if not self._content_started:
            text = text.lstrip()
        if not text:
            return
        text = self._held_space + text
        kept = text.rstrip()
        self._held_space = text[len(kept):]
        if kept:
            self._content_started = True
            events.append(ContentDelta(kept))

    def _call(self, body: str) -> ToolCall | None:
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                and call["name"] in self._names
                and isinstance(call.get("arguments"), dict)):
            return None
        index, self.calls = self.calls, self.calls + 1
        return ToolCall(index=index, id=new_call_id(), name=call["name"],
                        arguments=json.dumps(call["arguments"], ensure_ascii=False))


def parse_all(text: str, names: frozenset[str]) -> tuple[str, list[ToolCall]]:
    """A whole generation's content and calls."""
    parser = ToolCallParser(names)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    return content, [e for e in events if isinstance(e, ToolCall)]
