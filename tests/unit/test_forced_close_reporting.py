"""How a reply closed early by the max_tokens budget is reported: the worker's final
GenerateResponse carries ``forced_close``; the router counts it per choice into the usage
extension ``structured_forced_close`` (absent when none) and the response header; the worker's
metrics expose ``electron:structured_forced_close_total``."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest

from router.chat.response import FORCED_CLOSE_HEADER, usage_body
from router.chat.usage import Usage
from workers.engine.outputs import FinishReason, RequestOutput
from workers.engine.outputs import Usage as EngineUsage
from workers.engine.stats import EngineStats
from workers.metrics import WorkerMetrics
from workers.wire import generate_response


def final(index: int, forced: bool) -> RequestOutput:
    return RequestOutput("r", index, (5,), "}", finish_reason=FinishReason.STOP,
                         usage=EngineUsage(10, 0, 7), forced_close=forced)


def test_the_final_message_carries_forced_close():
    assert generate_response(final(0, True)).forced_close
    assert not generate_response(final(0, False)).forced_close


def test_usage_counts_forced_choices_and_the_body_reports_them_only_when_any():
    usage = Usage()
    usage.start(10, 2)
    usage.observe(generate_response(final(0, False)))
    assert "structured_forced_close" not in usage_body(usage)
    usage.observe(generate_response(final(1, True)))
    assert usage.forced_closes == 1
    assert usage_body(usage)["structured_forced_close"] == 1
    usage.start(10, 1)  # a retry on another worker counts afresh
    assert usage.forced_closes == 0
    assert FORCED_CLOSE_HEADER == "X-Electron-Structured-Forced-Close"


def test_worker_metrics_count_forced_closes():
    stats = EngineStats(structured_forced_closes=3)
    load = SimpleNamespace(running=0, waiting=0, kv_blocks_used=0, kv_blocks_total=1)
    engine = SimpleNamespace(engine=SimpleNamespace(stats=stats), load=lambda: load)
    text = generate_latest(WorkerMetrics(engine, "w1").registry).decode()
    assert 'electron:structured_forced_close_total{worker_id="w1"} 3.0' in text


def test_a_grammar_request_below_its_minimum_is_a_400_naming_max_tokens():
    from core.errors import InvalidRequest
    from router.openai.errors import error_response

    exc = InvalidRequest("max_tokens (3) is below the 6 tokens of the shortest JSON value this "
                         "request's response_format allows; set max_tokens to at least 6",
                         param="max_tokens")
    response = error_response(exc)
    assert response.status_code == 400
    assert b'"param":"max_tokens"' in response.body.replace(b" ", b"")
