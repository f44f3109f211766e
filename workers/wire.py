"""Protobuf <-> engine dataclasses on the worker side: the one place that converts them.

proto3 scalars have no presence: a field the sender left out reads as 0. Where 0 is not a
meaningful value the conversion reads it as the field's neutral default (``n`` 0 -> 1,
``repetition_penalty`` 0 -> 1.0); ``temperature`` 0 stays 0 (greedy), so senders always set
it. ``top_p`` is ``optional`` since 0 means something (only the likeliest token): unset reads
as 1.0. Fields that may be absent (``seed``, ``max_tokens``) are ``optional`` in the proto
and become ``None`` here, and so does an absent ``grammar``; a
present one goes to the engine as the ``GrammarSpec`` message itself (the engine's grammar
compiler reads it).

Range checks against the model (vocabulary, context window) belong to the engine, which
raises before it queues anything; this module checks what the message alone can tell.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.errors import InvalidRequest
from core.pb.electron.v1 import worker_pb2 as pb
from workers.engine.kv_events import AllCleared, BlocksRemoved, BlocksStored, KVEvent
from workers.engine.outputs import (
    PositionLogprobs,
    Progress,
    RequestOutput,
    TokenLogprob,
)
from workers.engine.sampling_params import SamplingParams

if TYPE_CHECKING:  # the engine module loads torch; the conversion needs only field names
    from workers.engine.async_engine import LoadInfo

# Longest request id accepted: ids travel in logs, metrics labels and engine tables.
MAX_REQUEST_ID_LENGTH = 256


@dataclass(frozen=True)
class GenerateArgs:
    """A validated GenerateRequest, ready for ``AsyncEngine.generate``."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    priority: int
    cache_salt: str
    model: str  # "" when the sender did not name one


def generate_args(request: pb.GenerateRequest) -> GenerateArgs:
    """Converts and validates a GenerateRequest; errors are InvalidRequest naming the field."""
    if not request.request_id:
        raise InvalidRequest("'request_id' must not be empty", param="request_id")
    if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidRequest(f"'request_id' is longer than {MAX_REQUEST_ID_LENGTH} characters",
                             param="request_id")
    if not request.HasField("sampling"):
        raise InvalidRequest("'sampling' is required", param="sampling")
    return GenerateArgs(
        request_id=request.request_id,
        prompt_token_ids=tuple(request.token_ids),
        sampling=sampling_params(request.sampling),
        priority=request.priority,
        cache_salt=request.cache_salt,
        model=request.model,
    )


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """SamplingParams from the wire; SamplingParams itself validates the ranges."""
    return SamplingParams(
        n=msg.n or 1,
        temperature=msg.temperature,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty or 1.0,
        logit_bias=dict(msg.logit_bias),
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        min_tokens=msg.min_tokens,
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
        grammar=msg.grammar if msg.HasField("grammar") else None,
    )


def generate_response(output: RequestOutput) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        index=output.index,
        token_ids=output.token_ids,
        text=output.text,
        logprobs=[_position_logprobs(p) for p in output.logprobs],
        finish_reason=output.finish_reason.value if output.finish_reason is not None else "",
        forced_close=output.forced_close,
    )
    if output.usage is not None:
        msg.usage.prompt_tokens = output.usage.prompt_tokens
        msg.usage.cached_tokens = output.usage.cached_tokens
        msg.usage.completion_tokens = output.usage.completion_tokens
    return msg


def progress_response(progress: Progress) -> pb.GenerateResponse:
    """A sign of life of a request that produced nothing for a while (no delta)."""
    return pb.GenerateResponse(progress=pb.Progress(queued=progress.queued,
                                                    queue_position=progress.queue_position))


def _token_logprob(t: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes)


def _position_logprobs(p: PositionLogprobs) -> pb.PositionLogprobs:
    return pb.PositionLogprobs(chosen=_token_logprob(p.chosen),
                               top=[_token_logprob(t) for t in p.top])


# -- WatchState ---------------------------------------------------------------------------------

def snapshot_update(sequence: int, block_hashes: Iterable[int], block_size: int) -> pb.StateUpdate:
    return pb.StateUpdate(snapshot=pb.Snapshot(
        sequence=sequence, block_hashes=block_hashes, block_size=block_size))


def event_update(event: KVEvent) -> pb.StateUpdate:
    if isinstance(event, BlocksStored):
        msg = pb.KVEvent(sequence=event.sequence,
                         stored=pb.BlocksStored(block_hashes=event.block_hashes))
    elif isinstance(event, BlocksRemoved):
        msg = pb.KVEvent(sequence=event.sequence,
                         removed=pb.BlocksRemoved(block_hashes=event.block_hashes))
    elif isinstance(event, AllCleared):
        msg = pb.KVEvent(sequence=event.sequence, cleared=pb.AllCleared())
    else:
        raise TypeError(f"not a KV event: {event!r}")
    return pb.StateUpdate(event=msg)


def load_update(load: LoadInfo) -> pb.StateUpdate:
    return pb.StateUpdate(load=pb.Load(
        running=load.running,
        waiting=load.waiting,
        waiting_prefill_tokens=load.waiting_prefill_tokens,
        kv_blocks_used=load.kv_blocks_used,
        kv_blocks_total=load.kv_blocks_total,
        running_decode_tokens=load.running_decode_tokens,
    ))
