"""A chat request on the wire: the one pydantic -> proto converter (``to_generate_request``)
and the checks that decide what may be sent (context window, vocabulary).

Context window (docs/api.md, "Context window": clamp or reject, never crash): a prompt that
leaves no room for one completion token is 400 ``context_length_exceeded`` (param
``messages``); an explicit ``max_tokens``/``max_completion_tokens`` larger than the room left
is rejected the same way (param: that field), because silently returning fewer tokens than
asked would look like a normal "length" finish; an unset one is clamped to the room left.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.errors import ContextLengthExceeded, InvalidRequest
from core.pb.electron.v1 import worker_pb2 as pb
from router.openai.schemas import ChatCompletionRequest
from router.tenancy.terms import TenantTerms


def effective_cache_salt(req: ChatCompletionRequest, terms: TenantTerms | None) -> str:
    """The tenant's salt, then the request's own: a client's ``cache_salt`` can narrow its
    tenant's cache sharing but never reach another tenant's (tenant salts hold no '|')."""
    if terms is None or not terms.cache_salt:
        return req.cache_salt or ""
    return terms.cache_salt + "|" + (req.cache_salt or "")


def to_generate_request(req: ChatCompletionRequest, *, request_id: str,
                        prompt_token_ids: Sequence[int], max_tokens: int,
                        model: str, grammar: pb.GrammarSpec | None = None,
                        terms: TenantTerms | None = None) -> pb.GenerateRequest:
    """The wire request. Every sampling field is set explicitly: proto3 reads an unset scalar
    as 0, and temperature 0 means greedy (top_p 0, which OpenAI allows too, keeps only the
    likeliest token)."""
    sampling = pb.SamplingParams(
        n=req.n or 1,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),  # vLLM's -1 and 0 both disable it
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        logit_bias=req.logit_bias or {},
        stop=req.stop or (),
        stop_token_ids=req.stop_token_ids or (),
        ignore_eos=bool(req.ignore_eos),
        max_tokens=max_tokens,
        min_tokens=req.min_tokens or 0,
        logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs or 0,
    )
    if req.seed is not None:
        sampling.seed = req.seed % 2**64  # OpenAI seeds are int64; the wire's are uint64
    if grammar is not None:
        sampling.grammar.CopyFrom(grammar)
    return pb.GenerateRequest(
        request_id=request_id, token_ids=prompt_token_ids, sampling=sampling,
        cache_salt=effective_cache_salt(req, terms),
        # Requests carry their tenant's plan's priority (a client cannot raise its own; with
        # auth off every request has the default terms, priority 0). Only a caller without
        # terms sends the request's own, vLLM's lower-first turned into the wire's higher-first.
        priority=terms.priority if terms is not None else -(req.priority or 0),
        model=model)


def completion_budget(req: ChatCompletionRequest, num_prompt_tokens: int,
                      max_model_len: int) -> int:
    """How many tokens the completion may have (see the module docstring)."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"messages resulted in {num_prompt_tokens} tokens. Please reduce the length of the "
            "messages.", param="messages")
    limit, param = req.completion_limit
    if limit is None:
        budget = room
    elif limit > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + limit} tokens ({num_prompt_tokens} in the "
            f"messages, {limit} in the completion). Please reduce the length of the messages "
            f"or completion.", param=param)
    else:
        budget = limit
    if req.min_tokens and req.min_tokens > budget:
        raise InvalidRequest(f"min_tokens ({req.min_tokens}) exceeds the {budget} completion "
                             "tokens this request can have", param="min_tokens")
    return budget


def check_token_ids(req: ChatCompletionRequest, vocab_size: int) -> None:
    for param, ids in (("logit_bias", req.logit_bias or ()),
                       ("stop_token_ids", req.stop_token_ids or ())):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise InvalidRequest(f"{param} holds token id {bad[0]}, outside this model's "
                                 f"vocabulary of {vocab_size} tokens", param=param)


def check_buffered_size(req: ChatCompletionRequest, budget: int, limit: int) -> None:
    """A response built whole holds up to n x ``budget`` tokens, each with 1 + top_logprobs
    entries: refuse one that could pass ``limit`` (``router.max_buffered_tokens``) before any
    work is done, rather than build it (n=16 x 20 top logprobs x a whole context is ~1 GB of
    Python objects). A streamed response sends each token as it comes: no bound."""
    n = req.n or 1
    per_token = 1 + ((req.top_logprobs or 0) if req.logprobs else 0)
    if n * budget * per_token > limit:
        most = max(1, limit // (n * per_token))
        limit_set, field = req.completion_limit
        param = field if limit_set is not None else "n"
        raise InvalidRequest(
            f"this response would hold up to {n} x {budget} tokens x {per_token} logprob "
            f"entries, more than the {limit} a response that is not streamed may hold; set "
            f"max_tokens to at most {most}, lower n or top_logprobs, or stream it",
            param=param)
