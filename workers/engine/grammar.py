"""Grammar-constrained decoding with llguidance: compiled grammars and per-request matchers.

``GrammarCompiler`` (one per engine) turns a request's grammar spec (``grammar_spec.py``) into
a ``GrammarMatcher``, the sampler's ``LogitsMask``. Compiled grammars are cached per spec (LRU,
keyed by the message's deterministic serialization): a hit costs one ``deep_copy`` of a
pristine matcher (~10 µs) instead of a compile.

Per request, the matcher's state is the output tokens it has accepted. Preemption does not
touch it: a preempted request keeps its tokens and only recomputes their KV, so the matcher
stays where it was.

Overlap: after ``accept`` the mask of the next step is filled on a helper thread (llguidance
releases the GIL), so it runs beside the engine's next forward pass; ``apply`` waits for it.

The mask is one bit per token (llguidance's layout: bit ``t % 32`` of 32-bit word ``t // 32``),
turned into an additive bias (0 or -inf) through a 256-entry byte table.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import numpy as np
import torch

from core.errors import InvalidRequest
from core.pb.electron.v1 import worker_pb2 as pb
from core.tokenizer import Tokenizer

from .grammar_spec import build_grammar

log = logging.getLogger(__name__)

# _BYTE_BIAS[b, i] is 0.0 if bit i of byte b is set, else -inf: a little-endian bitmask viewed
# as bytes becomes one additive bias per token through one take (numpy's take is ~10x faster
# here than torch's indexing or masked_fill on a 49,152-token row).
_BYTE_BIAS = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1,
                                    bitorder="little"), 0.0, -np.inf).astype(np.float32)


class _TokenizerView:
    """What ``llguidance.TokenizerWrapper`` reads: each token's bytes, EOS, special ids and an
    encode function (used for text the grammar forces)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        self._tokenizer = tokenizer
        # Rows of the model's vocabulary past the tokenizer's stand for no bytes.
        self.tokens = [tokenizer.token_bytes(i) for i in range(vocab_size)]
        self.eos_token_id = eos_token_ids[0]
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(tokenizer.special_token_ids)

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"))


class GrammarCompiler:
    """Compiles grammar specs into matchers for one tokenizer; caches compiled grammars."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int], *,
                 cache_size: int = 64, overlap: bool = True):
        eos = list(eos_token_ids)
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos)
        self._tokenizer = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_TokenizerView(tokenizer, vocab_size, eos)),
            n_vocab=vocab_size, eos_token=eos)
        self._cache: OrderedDict[bytes, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask") if overlap else None

    def matcher(self, spec: pb.GrammarSpec) -> GrammarMatcher:
        """A fresh matcher for ``spec``; raises InvalidRequest if it cannot compile."""
        key = cache_key(spec)
        pristine = self._cache.get(key)
        if pristine is None:
            pristine = self._compile(spec)
            self._cache[key] = pristine
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return GrammarMatcher(pristine.deep_copy(), self.vocab_size, self.eos_token_ids,
                              self._pool)

    def _compile(self, spec: pb.GrammarSpec) -> llguidance.LLMatcher:
        compiled = build_grammar(spec)
        matcher = llguidance.LLMatcher(self._tokenizer, compiled.grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"the grammar cannot be compiled: {_first_line(matcher)}",
                                 param=compiled.param)
        return matcher

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def cache_key(spec: pb.GrammarSpec) -> bytes:
    """What compiled grammars are cached under: equal specs give equal keys (in one process)."""
    return spec.SerializeToString(deterministic=True)


class GrammarMatcher:
    """One sequence's grammar state: the ``LogitsMask`` the sampler applies."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int,
                 eos_token_ids: tuple[int, ...], pool: ThreadPoolExecutor | None):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._eos_ids = eos_token_ids
        self._eos = torch.tensor(eos_token_ids, dtype=torch.long)
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self._bytes = self._bits.numpy().view(np.uint8)  # the same memory
        self._pool = pool
        self._pending: Future[None] | None = None
        self._schedule_fill()

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete: EOS is the only token it allows."""
        return self._matcher.is_stopped()

    def _fill(self) -> None:
        self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)

    def _schedule_fill(self) -> None:
        if self._pool is not None:
            self._pending = self._pool.submit(self._fill)

    def _bias(self) -> torch.Tensor:
        """Float [vocab]: 0 for the tokens the grammar allows next, -inf for the others."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        else:
            self._fill()
        if self._matcher.is_error():
            # Cannot happen for tokens the mask allowed; if it does, end the text cleanly.
            log.error("grammar matcher failed: %s", _first_line(self._matcher))
            bias = torch.full((self._vocab_size,), float("-inf"))
            bias[self._eos] = 0.0
            return bias
        return torch.from_numpy(
            np.take(_BYTE_BIAS, self._bytes, axis=0).reshape(-1)[:self._vocab_size])

    def allowed(self) -> torch.Tensor:
        """Booleans [vocab]: the tokens the grammar allows next."""
        return self._bias() == 0

    def apply(self, logits: torch.Tensor) -> None:
        bias = self._bias()
        logits.add_(bias)
        if bool(logits.amax() == float("-inf")):
            # Everything the grammar allows was banned by another stage (min_tokens keeps EOS
            # out, logit_bias -100): the grammar wins, its tokens equally likely.
            logits.copy_(bias)

    def accept(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            log.error("grammar rejected token %d: %s", token_id, _first_line(self._matcher))
        if token_id not in self._eos_ids:
            self._schedule_fill()


def _first_line(matcher: llguidance.LLMatcher) -> str:
    return (matcher.get_error() or "unknown error").splitlines()[0][:500]
