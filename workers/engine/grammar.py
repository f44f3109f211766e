"""Grammar-constrained decoding with llguidance: compiled grammars and per-request matchers.

``GrammarCompiler`` (one per engine) turns a request's grammar spec (``core/grammar.py`` builds
its grammar, the same code the router checks requests with) into
a ``GrammarMatcher``, the sampler's ``LogitsMask``. Compiled grammars are cached per spec (LRU,
keyed by the message's deterministic serialization): a hit costs one ``deep_copy`` of a
pristine matcher (~10 µs) instead of a compile.

Per request, the matcher's state is the output tokens it has accepted. Preemption does not
touch it: a preempted request keeps its tokens and only recomputes their KV, so the matcher
stays where it was.

Overlap: after ``accept`` the mask of the next step is filled on a helper thread (llguidance
releases the GIL), so it runs beside the engine's next forward pass; ``apply`` waits for it.

The mask is one bit per token (llguidance's layout: bit ``t % 32`` of 32-bit word ``t // 32``),
turned into an additive bias (0 or -inf): on the CPU through a 256-entry byte table; for
logits on another device (CUDA) only the bitmask (4 bytes per 32 tokens) is copied there and
expanded into the bias on that device. The mask is always filled and read on the CPU.

Batched: every decision a row's mask takes (waiting for it, the budget's closing rule) is taken
per row on the CPU, but a row whose mask is the grammar's alone (most rows, most steps) hands
its bitmask to the sampler, which applies all such rows of a step together
(``apply_bitmasks``): on a GPU at once (one copy, one expansion, one add) rather than a dozen
small kernels per row; on the CPU row by row, which keeps each row in cache.
"""

from __future__ import annotations

import codecs
import logging
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch

from core.errors import InvalidRequest
from core.grammar import Grammar, build_grammar, cache_key, compile_error, short_error
from core.pb.electron.v1 import worker_pb2 as pb
from core.tokenizer import Tokenizer

from .json_close import Closer, CloseState, Unwritable, tool_call_schema

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
                 cache_size: int = 64, overlap: bool = True, mask_timeout_s: float = 5.0):
        eos = list(eos_token_ids)
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos)
        view = _TokenizerView(tokenizer, vocab_size, eos)
        self._tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(view),
                                                 n_vocab=vocab_size, eos_token=eos)
        self._text = _TokenText(tokenizer, view.tokens, eos[0])
        self._cache: OrderedDict[bytes, _Compiled] = OrderedDict()
        self._cache_size = cache_size
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask") if overlap else None
        self._mask_timeout_s = mask_timeout_s

    def matcher(self, spec: pb.GrammarSpec, max_tokens: int | None = None) -> GrammarMatcher:
        """A fresh matcher for ``spec``; raises InvalidRequest if it cannot compile.
        ``max_tokens``: the sequence's budget, which the matcher closes the output within
        (None: no budget-aware closing)."""
        compiled = self.compiled(spec)
        budget = None
        if max_tokens is not None and compiled.closer is not None:
            budget = _Budget(compiled.closer, max_tokens, compiled.minimum_tokens or 0,
                             compiled.call_tokens, self._text)
        return GrammarMatcher(compiled.pristine.deep_copy(), self.vocab_size,
                              self.eos_token_ids, self._pool, budget,
                              mask_timeout_s=self._mask_timeout_s)

    def minimum_tokens(self, spec: pb.GrammarSpec) -> int | None:
        """Tokens of the shortest output ``spec`` admits (the shortest valid value of a schema,
        the shortest call of a required or named tool; 0 in auto mode), or None when unknown."""
        return self.compiled(spec).minimum_tokens

    def compiled(self, spec: pb.GrammarSpec) -> _Compiled:
        key = cache_key(spec)
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = self._compile(spec)
            self._cache[key] = compiled
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return compiled

    def _compile(self, spec: pb.GrammarSpec) -> _Compiled:
        grammar = build_grammar(spec)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar.grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(compile_error(matcher.get_error()), param=grammar.param)
        closer, minimum, call_tokens = _closer(grammar), None, 0
        if closer is not None:
            try:
                minimum, call_tokens = self._minimum(matcher, closer)
            except Exception:  # noqa: BLE001 - never fail a request for this
                log.exception("budget-aware closing disabled for a grammar")
            if minimum is None:
                closer = None
        return _Compiled(matcher, closer, minimum, call_tokens)

    def _minimum(self, matcher: llguidance.LLMatcher, closer: Closer) -> tuple[int | None, int]:
        """Tokens of the shortest output (None when the grammar refuses what the closer thinks
        shortest: then the closer is not relied on), and of the shortest call (tools)."""
        call_tokens = len(self._text.encode(closer.shortest)) if closer.kind == "tools" else 0
        shortest = closer.minimum_output()
        ids = self._text.encode(shortest) if shortest else []
        probe = matcher.deep_copy()
        if probe.validate_tokens(ids) == len(ids) and probe.consume_tokens(ids) is not False \
                and (probe.is_accepting() or not ids):
            return len(ids), call_tokens
        log.warning("budget-aware closing disabled for a grammar whose shortest output it does "
                    "not accept: %r", shortest[:200])
        return None, call_tokens

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class _Compiled:
    pristine: llguidance.LLMatcher
    closer: Closer | None     # what outputs need to end (None: no budget-aware closing)
    minimum_tokens: int | None
    call_tokens: int = 0      # tools: the shortest call's tokens


class _TokenText:
    """Token ids <-> text for the closing rule: each token's bytes, single-byte tokens, and
    encoding a completion."""

    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes], eos: int):
        self.tokens = tokens
        self.eos = eos
        self.single = {t[0]: i for i, t in reversed(list(enumerate(tokens))) if len(t) == 1}
        self._tokenizer = tokenizer
        self._counts: dict[str, int] = {}
        self._angle: torch.Tensor | None = None

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def count(self, pieces: list[str]) -> int:
        """About the tokens of ``"".join(pieces)`` (each piece tokenized alone, cached)."""
        total = 0
        cache = self._counts
        for piece in pieces:
            n = cache.get(piece)
            if n is None:
                if len(cache) > 4096:
                    cache.clear()
                n = cache[piece] = len(self._tokenizer.encode(piece)) if piece else 0
            total += n
        return total

    def angle_ids(self) -> torch.Tensor:
        """Tokens holding '<' or '>': banned in auto mode near the budget, so no call starts
        that could not end."""
        if self._angle is None:
            self._angle = torch.tensor([i for i, t in enumerate(self.tokens)
                                        if b"<" in t or b">" in t], dtype=torch.long)
        return self._angle


# Slack of the closing rule beyond the completion and the jump (tokenization differences).
CLOSE_MARGIN = 2


class _Budget:
    """Budget-aware closing for one sequence (docs/structured-output.md, "Closing within
    max_tokens"). ``left`` is the tokens the sequence may still produce, the one being sampled
    included. The rule: force the tokens of the shortest completion once
    ``left <= needed + jump + CLOSE_MARGIN`` (``needed``: the completion's tokens; ``jump``:
    the most one free token can add to it, from the grammar). Tool calls, where none is open
    and none is needed: tokens that could open a call ('<', '>') are kept out once
    ``left <= shortest call + CLOSE_MARGIN + 1``, so no call starts that cannot end. Checks
    are spaced so that none is missed even if every token skipped added the most it can; far
    from the end they are rare (the scan of the text not read yet is the only other work)."""

    def __init__(self, closer: Closer, max_tokens: int, shortest_tokens: int, call_tokens: int,
                 text: _TokenText):
        self.state: CloseState = closer.state()
        self.tools = closer.kind == "tools"
        self.left = max_tokens
        self.jump = closer.jump
        self.spacing = closer.jump + closer.call_jump  # the most a skipped token may add
        self.call_zone = call_tokens + CLOSE_MARGIN + 1 if self.tools else 0
        self.text = text
        self.unread: list[int] = []
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.queue: deque[int] = deque()
        self.forced = False       # the rule changed what the grammar alone would allow
        self.banning = False
        self.check_at = self._next_check(shortest_tokens)

    def _next_check(self, needed: int) -> int:
        """The ``left`` at which to check next, given ``needed`` (an upper bound of the tokens
        the completion takes now): each of the k steps skipped may add up to ``spacing``."""
        room = self.left - needed - self.jump - CLOSE_MARGIN
        return max(self.left - max(0, room // (self.spacing + 1)), self.call_zone)

    def accept(self, token_id: int) -> None:
        self.left -= 1
        self.unread.append(token_id)
        if self.queue:
            if self.queue[0] == token_id:
                self.queue.popleft()
            else:
                self.queue.clear()

    def _read(self) -> None:
        tokens = self.text.tokens
        for t in self.unread:
            if t < len(tokens):
                self.state.feed(self.decoder.decode(tokens[t]))
        self.unread.clear()

    def _partial_char(self) -> list[int]:
        """Single-byte tokens that finish a UTF-8 character the text ends inside of."""
        pending = self.decoder.getstate()[0]
        if not pending:
            return []
        lead = pending[0]
        size = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4
        out = []
        for i in range(len(pending), size):
            byte = 0x80
            if i == 1 and lead == 0xE0:
                byte = 0xA0
            elif i == 1 and lead == 0xF0:
                byte = 0x90
            out.append(self.text.single.get(byte, -1))
        return out if -1 not in out else []

    def forced_token(self, matcher: llguidance.LLMatcher, allowed: Any) -> int | None:
        """The token the closing rule forces now, or None (sample freely, after ``ban``).
        ``allowed(t)`` says whether the grammar's mask allows t."""
        self.banning = False
        if self.left > self.check_at:
            return None
        self._read()
        if self.queue:
            if allowed(self.queue[0]):
                return self.queue[0]
            self.queue.clear()
        if matcher.is_stopped():
            return None
        try:
            pieces = self.state.completion_chunks()
        except Unwritable:
            # Not known here (e.g. a pattern this module cannot finish): the mask alone
            # decides this step; the next one tries again.
            log.debug("budget-aware closing: no completion found")
            return None
        if not pieces and self.tools and not self.state.in_call:
            # Complete as it stands, but calls may still start: near the end, keep them out
            # (auto: free text goes on; required and named: the output ends).
            self.check_at = self._next_check(0)
            if self.left > self.call_zone:
                return None
            if self.state.closer.mode == "auto":
                self.banning = True
                return None
            return self.text.eos if allowed(self.text.eos) else None
        head = self._partial_char()
        needed = sum(len(p.encode()) for p in pieces) + len(head)  # bytes bound tokens
        if self.left > needed + self.jump + CLOSE_MARGIN:
            self.check_at = self._next_check(needed)
            return None
        needed = self.text.count(pieces) + len(head)  # cheaper than the whole text's tokens
        if self.left > needed + self.jump + CLOSE_MARGIN + 1:
            self.check_at = min(self.left - 1, self._next_check(needed + 1))
            return None
        completion = "".join(pieces)
        ids = head + (self.text.encode(completion) if completion else [])
        if self.left > len(ids) + self.jump + CLOSE_MARGIN:
            self.check_at = min(self.left - 1, self._next_check(len(ids)))
            return None
        self.check_at = self.left  # check every step from here
        self.queue = deque(ids or [self.text.eos])
        if allowed(self.queue[0]):
            return self.queue[0]
        self.queue.clear()
        return None

    def ban(self) -> torch.Tensor | None:
        """Tokens to keep out now although the grammar allows them (see the class)."""
        return self.text.angle_ids() if self.banning else None


def _closer(grammar: Grammar) -> Closer | None:
    """What the grammar's outputs need to end (``json_close.py``), or None when that module
    cannot tell (e.g. a schema it does not understand): such a request is decoded without
    budget-aware closing."""
    try:
        if grammar.kind == "tools":
            return Closer("tools", tool_call_schema(grammar.tools), mode=grammar.mode,
                          parallel=grammar.parallel)
        return Closer("json", grammar.schema)
    except Exception:  # noqa: BLE001 - an odd schema only loses budget-aware closing
        return None


class GrammarMatcher:
    """One sequence's grammar state: the ``LogitsMask`` the sampler applies."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int,
                 eos_token_ids: tuple[int, ...], pool: ThreadPoolExecutor | None,
                 budget: _Budget | None = None, *, mask_timeout_s: float = 5.0):
        """``mask_timeout_s``: the longest a step waits for the helper thread's mask; past
        it the step fails this sequence alone (``TimeoutError`` from ``apply``)."""
        self._matcher = matcher
        self._mask_timeout_s = mask_timeout_s
        self._budget = budget
        self._vocab_size = vocab_size
        self._eos_ids = eos_token_ids
        self._eos = torch.tensor(eos_token_ids, dtype=torch.long)
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self._bytes = self._bits.numpy().view(np.uint8)  # the same memory
        self._pool = pool
        self._pending: Future[None] | None = None
        self._ready = False  # the mask of this step is filled
        self._step: _Step | None = None  # this step's decisions, once taken
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

    @property
    def is_accepting(self) -> bool:
        """The output so far is complete (EOS would be allowed)."""
        if self._pending is not None:  # the helper thread may be filling the next mask
            self._result(self._pending)
        return self._matcher.is_accepting()

    @property
    def forced_close(self) -> bool:
        """The budget forced the output's close (a token forced while others were allowed)."""
        return self._budget is not None and self._budget.forced

    def _wait(self) -> None:
        if self._ready:
            return
        if self._pending is not None:
            self._result(self._pending)
            self._pending = None
        else:
            self._fill()
        self._ready = True

    def _result(self, pending: Future[None]) -> None:
        try:
            pending.result(timeout=self._mask_timeout_s)
        except TimeoutError:
            raise TimeoutError(f"its next token mask was not ready within "
                               f"{self._mask_timeout_s:g} s") from None

    def _allows(self, token_id: int) -> bool:
        return 0 <= token_id < self._vocab_size and bool(
            (int(self._bits[token_id >> 5]) >> (token_id & 31)) & 1)

    def _forced(self) -> int | None:
        """After ``_wait``: the token the budget forces, if any."""
        budget = self._budget
        if budget is None or budget.left > budget.check_at:
            return None
        if self._matcher.is_error():
            return None
        try:
            token = budget.forced_token(self._matcher, self._allows)
        except Exception:  # noqa: BLE001 - a bug here must not fail the batch's step
            log.exception("budget-aware closing failed; this sequence goes on without it")
            self._budget = None
            return None
        if token is not None and not budget.forced:
            # Forcing counts as a close only while the grammar allowed something else.
            budget.forced = int(np.unpackbits(self._bytes).sum()) > 1
        return token

    def _bias(self) -> torch.Tensor:
        """Float [vocab]: 0 for the tokens the grammar allows next, -inf for the others."""
        self._wait()
        return self._bias_now()

    def _bias_now(self) -> torch.Tensor:
        if self._matcher.is_error():
            # Cannot happen for tokens the mask allowed; if it does, end the text cleanly.
            log.error("grammar matcher failed: %s", _short_error(self._matcher))
            bias = torch.full((self._vocab_size,), float("-inf"))
            bias[self._eos] = 0.0
            return bias
        return _bias_by_table(self._bits.unsqueeze(0), self._vocab_size)[0]

    def allowed(self) -> torch.Tensor:
        """Booleans [vocab]: the tokens the grammar allows next."""
        return self._bias() == 0

    def _decide(self) -> _Step | None:
        """This step's decisions, taken once (waiting for the mask, the budget's closing
        rule): None when adding the grammar's mask is all there is to do."""
        if self._step is None:
            self._wait()
            forced = self._forced()
            banned = self._budget.ban() if self._budget is not None else None
            self._step = _Step(forced, banned, self._matcher.is_error())
        step = self._step
        return None if step.forced is None and step.banned is None and not step.error else step

    def bitmask(self) -> torch.Tensor | None:
        """The next token's mask as int32 words on the CPU when it is all this row needs
        (the sampler then applies many rows' at once, ``apply_bitmasks``); None when the row
        needs ``apply`` (a token the budget forces or bans, a failed matcher)."""
        return self._bits if self._decide() is None else None

    def apply(self, logits: torch.Tensor) -> None:
        """Masks ``logits`` (one row, on any device) in place. Every decision is taken on the
        CPU, from the bitmask; only the bias added to the row goes to the row's device."""
        step = self._decide()
        if step is None:
            apply_bitmasks(logits.unsqueeze(0), [0], [self._bits])
            return
        if step.forced is not None:
            # Closing within the budget: only the completion's next token.
            logits.fill_(float("-inf"))
            logits[step.forced] = 0.0
            return
        bias = self._bias_now()
        banned = step.banned
        if banned is not None and bool((bias[banned] == 0).any()):
            kept = bias.clone()
            kept[banned] = float("-inf")
            if bool(kept.amax() == 0):
                bias = kept
                self._budget.forced = True
        # A fresh CPU tensor: read before ``to`` returns, so it does not need to wait.
        _add_bias(logits.unsqueeze(0), bias.to(logits.device, non_blocking=True).unsqueeze(0))

    def accept(self, token_id: int) -> None:
        self._ready, self._step = False, None
        if self._budget is not None:
            self._budget.accept(token_id)
        if not self._matcher.consume_token(token_id):
            log.error("grammar rejected token %d: %s", token_id, _short_error(self._matcher))
        if token_id not in self._eos_ids:
            self._schedule_fill()


@dataclass(frozen=True)
class _Step:
    """A row's decisions for one step (``GrammarMatcher._decide``)."""

    forced: int | None  # the only token the budget allows
    banned: torch.Tensor | None  # tokens the budget keeps out although the grammar allows them
    error: bool  # the matcher failed: only EOS


def apply_bitmasks(logits: torch.Tensor, rows: list[int], words: list[torch.Tensor]) -> None:
    """Masks ``logits`` [batch, vocab] in place: row ``rows[j]`` keeps the tokens whose bit is
    set in ``words[j]`` (int32 words on the CPU, llguidance's layout); ``rows`` ascending.

    On a GPU all rows at once (``apply_bitmasks_at_once``: one copy, one expansion, one add,
    where row by row would be a dozen small kernels per row). On the CPU row by row: each
    row's bias and add stay in cache, where all rows at once stream rows x vocab floats through
    memory several times (0.73x-0.88x as fast for 16-64 rows, bench/grammar_mask_ops.py)."""
    if logits.device.type != "cpu":
        apply_bitmasks_at_once(logits, rows, words)
        return
    for row, row_words in zip(rows, words):
        _add_bias(logits[row:row + 1], _bias_by_table(row_words.unsqueeze(0), logits.shape[1]))


def apply_bitmasks_at_once(logits: torch.Tensor, rows: list[int],
                           words: list[torch.Tensor]) -> None:
    """``apply_bitmasks`` in one batch of operations, on any device."""
    vocab = logits.shape[1]
    # One fresh CPU tensor: the matchers may refill their own words once this returns.
    stacked = torch.stack(words)
    if logits.device.type == "cpu":
        bias = _bias_by_table(stacked, vocab)
    else:
        bias = _bias_by_shifts(stacked.to(logits.device, non_blocking=True), vocab)
    if len(rows) == logits.shape[0]:
        _add_bias(logits, bias)
        return
    index = torch.tensor(rows).to(logits.device, non_blocking=True)
    picked = logits.index_select(0, index)
    _add_bias(picked, bias)
    logits.index_copy_(0, index, picked)


def _add_bias(logits: torch.Tensor, bias: torch.Tensor) -> None:
    """``logits += bias`` (rows of 0 and -inf) in place, except that a row left with nothing
    (every token its grammar allows was banned by another stage: min_tokens keeps EOS out,
    logit_bias -100) takes the bias itself: the grammar wins, its tokens equally likely.
    On a GPU chosen there, without waiting for it; on the CPU only when a row needs it."""
    logits.add_(bias)
    dead = logits.amax(-1, keepdim=True) == float("-inf")
    if logits.device.type != "cpu" or bool(dead.any()):
        logits.copy_(torch.where(dead, bias, logits))


def _bias_by_table(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Float [rows, vocab] on the CPU, 0 where a token's bit is set in ``words`` [rows, n]
    (int32, CPU), else -inf: one numpy take through the byte table."""
    rows = words.shape[0]
    bytes_ = words.numpy().view(np.uint8)
    return torch.from_numpy(np.take(_BYTE_BIAS, bytes_, axis=0).reshape(rows, -1)[:, :vocab_size])


def _bias_by_shifts(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The same bias made where ``words`` are (a GPU): each word shifted by 0..31."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    # An arithmetic shift of a negative word (bit 31 set) still leaves each bit in bit 0.
    set_bits = ((words.unsqueeze(2) >> shifts) & 1).view(words.shape[0], -1)[:, :vocab_size]
    return torch.full(set_bits.shape, float("-inf"), dtype=torch.float32,
                      device=words.device).masked_fill_(set_bits.bool(), 0.0)


def _short_error(matcher: llguidance.LLMatcher) -> str:
    return short_error(matcher.get_error())
