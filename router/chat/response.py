"""OpenAI's response shapes of a chat completion, built from worker deltas: the assistant
message (tool calls parsed out), logprob entries, finish reasons, usage and the
system fingerprint. Shared by the whole response and the streamed chunks (chunks.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import xxhash

from core.errors import InternalError
from core.pb.electron.v1 import worker_pb2 as pb
from core.protocol import FINISH_LENGTH, FINISH_STOP
from router.chat.usage import Usage
from router.tools.grammar_spec import ToolUse
from router.tools.parser import parse_all

# OpenAI's stand-in for "very unlikely" (JSON has no -inf; orjson would write null).
MIN_LOGPROB = -9999.0
# The worker's finish reasons (core/protocol.py) -> OpenAI's.
_FINISH_REASONS = {FINISH_STOP: "stop", FINISH_LENGTH: "length"}


def system_fingerprint(model: str) -> str:
    return "fp_" + xxhash.xxh3_64_hexdigest(model.encode())[:10]


def finish_reason_of(raw: str) -> str:
    reason = _FINISH_REASONS.get(raw)
    if reason is None:
        raise InternalError(f"the worker sent an unknown finish reason {raw!r}")
    return reason


def _logprob(value: float) -> float:
    return value if value >= MIN_LOGPROB else MIN_LOGPROB  # also maps NaN and -inf


def logprob_entries(positions: Sequence[pb.PositionLogprobs], top: int) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` entries of some generated tokens."""
    return [{
        "token": p.chosen.token,
        "logprob": _logprob(p.chosen.logprob),
        "bytes": list(p.chosen.bytes),
        "top_logprobs": [{"token": t.token, "logprob": _logprob(t.logprob),
                          "bytes": list(t.bytes)} for t in p.top[:top]],
    } for p in positions]


# Response header of a non-streamed reply: how many choices the max_tokens budget closed
# early (docs/structured-output.md, "Closing within max_tokens"); absent when none was.
FORCED_CLOSE_HEADER = "X-Electron-Structured-Forced-Close"


def usage_body(usage: Usage) -> dict[str, Any]:
    """OpenAI's ``usage`` object of a request's counted usage, with our extension
    ``structured_forced_close`` (choices closed early by the budget) when there were any."""
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    if usage.forced_closes:
        body["structured_forced_close"] = usage.forced_closes
    return body


def assistant_message(tools: ToolUse | None, text: str, finish: str | None) -> dict[str, Any]:
    """A choice's ``message`` and ``finish_reason``, its tool calls parsed out when tools are
    in use."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tools is None:
        return {"message": message, "finish_reason": finish}
    content, calls = parse_all(text, tools.names)
    if not calls:
        message["content"] = content
        return {"message": message, "finish_reason": finish}
    message["content"] = content or None
    message["tool_calls"] = [call.as_openai() for call in calls]
    return {"message": message, "finish_reason": tool_calls_finish(finish)}


def tool_calls_finish(finish: str | None) -> str | None:
    """A choice that made calls and stopped by itself finished for ``tool_calls``."""
    return "tool_calls" if finish == "stop" else finish
