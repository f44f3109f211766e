"""One Generate call's observability on the worker: its log context, its spans and the
per-request metrics.

The gRPC server span (``Tracing.server_interceptors``, continuing the router's trace from
the call's metadata) gets the OpenTelemetry GenAI attributes; once a sequence finishes, its
``Timeline`` (written by the engine thread) becomes child spans with the recorded start and
end times:

    queue          arrival -> the first step that computed it
    prefill        one span per step that computed part of the prompt (chunked prefill)
    first_token    arrival -> the first token (its duration is the time to first token)
    decode         first token -> the last
    finish         the finish (finish reason, preemptions)

No span work is done while the engine steps: nothing here runs until a sequence is over.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Span, StatusCode

from core.telemetry import Tracing

if TYPE_CHECKING:
    from workers.engine.outputs import RequestOutput
    from workers.metrics import WorkerMetrics
    from workers.wire import GenerateArgs


def request_attributes(args: GenerateArgs, model: str) -> dict[str, Any]:
    """GenAI semantic-convention attributes of a Generate request."""
    sampling = args.sampling
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": "electron",
        "gen_ai.request.model": model,
        "gen_ai.request.temperature": sampling.temperature,
        "gen_ai.request.top_p": sampling.top_p,
        "gen_ai.request.choice.count": sampling.n,
        "gen_ai.usage.input_tokens": len(args.prompt_token_ids),
        "electron.request_id": args.request_id,
        "electron.priority": args.priority,
    }
    if sampling.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = sampling.max_tokens
    if sampling.top_k:
        attributes["gen_ai.request.top_k"] = sampling.top_k
    if sampling.presence_penalty:
        attributes["gen_ai.request.presence_penalty"] = sampling.presence_penalty
    if sampling.frequency_penalty:
        attributes["gen_ai.request.frequency_penalty"] = sampling.frequency_penalty
    if sampling.seed is not None:
        attributes["gen_ai.request.seed"] = sampling.seed
    return attributes


class GenerationObserver:
    """Follows one Generate call: ``output`` for every delta, ``close`` when it ends."""

    def __init__(self, tracing: Tracing, metrics: WorkerMetrics | None, args: GenerateArgs,
                 model: str, worker_id: str):
        self._tracing = tracing
        self._metrics = metrics
        self._span: Span | None = None
        self._finished: list[RequestOutput] = []
        if tracing.enabled:
            span = trace.get_current_span()
            if span.is_recording():
                self._span = span
                span.set_attributes(request_attributes(args, model))
                span.set_attribute("electron.worker_id", worker_id)

    def output(self, out: RequestOutput) -> None:
        if out.finish_reason is None:
            return
        if self._metrics is not None:
            self._metrics.finished(out.finish_reason.value, out.timeline)
        if self._span is not None:
            self._finished.append(out)

    def close(self) -> None:
        span = self._span
        if span is None:
            return
        self._span = None
        finished = sorted(self._finished, key=lambda o: o.index)
        input_tokens = output_tokens = cached = 0
        reasons = []
        for out in finished:
            if out.usage is not None:
                input_tokens = max(input_tokens, out.usage.prompt_tokens)
                cached = max(cached, out.usage.cached_tokens)
                output_tokens += out.usage.completion_tokens
            reasons.append(out.finish_reason.value if out.finish_reason else "")
            if out.timeline is not None:
                self._timeline_spans(span, out)
        attributes: dict[str, Any] = {
            "gen_ai.usage.output_tokens": output_tokens,
            "gen_ai.response.finish_reasons": reasons,
            "electron.cached_tokens": cached}
        first = finished[0].timeline if finished else None
        if first is not None and first.first_token_ns is not None:
            attributes["electron.time_to_first_token_s"] = \
                (first.first_token_ns - first.arrival_ns) / 1e9
        span.set_attributes(attributes)
        if "error" in reasons:
            span.set_status(StatusCode.ERROR, "the engine failed the request")

    def _timeline_spans(self, parent: Span, out: RequestOutput) -> None:
        t = out.timeline
        assert t is not None
        tracer = self._tracing.tracer
        context = trace.set_span_in_context(parent)
        end = t.finished_ns or time.time_ns()

        def child(name: str, start: int, stop: int, **attributes: Any) -> None:
            attributes["gen_ai.choice.index"] = out.index
            s = tracer.start_span(name, context=context, start_time=start,
                                  attributes=attributes)
            s.end(end_time=max(stop, start))

        child("queue", t.arrival_ns, t.scheduled_ns or end)
        for i, (start, stop, tokens) in enumerate(t.prefill_chunks):
            child("prefill", start, stop, **{"electron.prefill.chunk": i,
                                             "electron.prefill.tokens": tokens})
        usage = out.usage
        if t.first_token_ns is not None:
            child("first_token", t.arrival_ns, t.first_token_ns, **{
                "electron.time_to_first_token_s": (t.first_token_ns - t.arrival_ns) / 1e9,
                "electron.cached_tokens": usage.cached_tokens if usage else 0})
            child("decode", t.first_token_ns, end, **{
                "gen_ai.usage.output_tokens": usage.completion_tokens if usage else 0})
        child("finish", end, end, **{
            "gen_ai.response.finish_reasons": [out.finish_reason.value if out.finish_reason
                                               else ""],
            "electron.preemptions": t.num_preemptions})
