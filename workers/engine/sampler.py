"""Picks each sequence's next token from its logits.

Row ``i`` of the logits belongs to ``requests[i]``. Stages, in this order; each is skipped for
the whole batch when no row needs it, and works only on the rows that need it:

1. ``logit_bias``: added to the logits (OpenAI: -100 effectively bans a token, +100 forces it).
2. ``min_tokens``: while fewer output tokens exist, the tokens that would stop the sequence get
   -inf: ``stop_token_ids``, and the EOS ids unless ``ignore_eos`` (then EOS stops nothing).
3. ``repetition_penalty`` (HF/vLLM), over prompt and output tokens: a positive logit is divided
   by the penalty, a negative one multiplied.
4. ``presence_penalty`` / ``frequency_penalty`` (OpenAI), over output tokens only:
   ``logit -= frequency * count + presence * (count > 0)``.
5. The grammar mask: the rows whose mask hands over a bitmask are masked together
   (``grammar.apply_bitmasks``), the others by their mask's ``apply(row)``; the engine calls
   ``accept`` later.
6. Logprobs: ``log_softmax`` of the logits as they are now. They describe the model's
   distribution after bias, penalties and masks, BEFORE temperature, top-k, top-p and min-p.
7. Greedy rows (``temperature`` below ``GREEDY_BELOW_TEMPERATURE``): argmax, the lowest id on
   ties. No random draw.
8. Sampled rows: divide by the temperature; top-k; top-p over the top-k survivors
   (renormalised, as HF and vLLM do; the most likely token always stays, so top-p 0 keeps
   only it); min-p relative to the most likely token; then one draw.

The logits tensor is modified in place.

One row cannot fail the batch: a row that cannot be sampled (its grammar mask fails or allows
no token; its logits hold NaN or +inf, or nothing finite, before or after the temperature)
is set aside in ``SamplerOutput.failed`` with the reason, its values replaced by zeros so the
batched kernels stay well defined, and the other rows are sampled as if it were not there
(every kernel works on each row alone, see below).

Reproducibility: a seeded request gives the same tokens whatever else is in the batch and
whatever its row. Each request has its own 64-bit stream key (seed + index, so the n sequences
of one request differ; unseeded requests draw one from the OS) and uses exactly one uniform per
sampled step: SplitMix64 of the key and the number of tokens it has generated so far, a
counter-based generator computed for all rows at once with integer tensor ops on the logits'
device (``_uniforms``; no per-row draw on the host), then turned into a token by inverse CDF.
Every operation on the way is either elementwise, a gather/scatter, or a kernel that
reduces each row on its own (max, topk, log_softmax, cumsum, sums over blocks of 64 tokens).
A plain full-row ``sum`` is avoided: ATen splits a lone long row across threads and so rounds
differently from the same row inside a batch (seen here: 49,152 values, 2 threads). The
number of top-p candidates a row uses depends only on that row (see ``_TOP_P_TIERS``).

Devices: the logits may live on any device (CUDA on a GPU worker). Whatever is combined with
them (index tensors, per-row parameters, the stream keys and counters) is built on the CPU and
sent there in one copy per tensor. The uniforms are integer arithmetic, exact everywhere, so a
seed draws the same uniforms on any device. The block tricks below serve the CPU only;
elsewhere argmax and topk are native.
"""

from __future__ import annotations

import secrets
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .grammar import apply_bitmasks
from .request import Request

# Candidates tried for a top-p row without top-k: the most likely 128 tokens, if they hold
# top_p of the mass, else 1024, else 8192, else the whole vocabulary (a full sort, ~3.5 ms a
# row on the target CPU, against ~0.1 ms for topk(128)).
_TOP_P_TIERS = (128, 1024, 8192)


@dataclass(frozen=True)
class RawLogprobs:
    """Logprobs at one position; ``top_*`` sorted by descending logprob."""

    chosen_logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]                 # one per request, in row order
    logprobs: list[RawLogprobs | None]   # None for requests that did not ask for logprobs
    # Rows that could not be sampled -> why (their token id and logprobs mean nothing).
    failed: dict[int, str] = field(default_factory=dict)


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)

    def __call__(self, logits: Tensor, requests: list[Request]) -> SamplerOutput:
        num_rows, vocab = len(requests), self.vocab_size
        if logits.dim() != 2 or tuple(logits.shape) != (num_rows, vocab):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {num_rows} requests "
                             f"and a vocabulary of {vocab}")
        if logits.dtype != torch.float32:
            raise TypeError(f"logits must be float32, not {logits.dtype}")
        logits = logits.contiguous()
        dev = logits.device
        params = [r.sampling for r in requests]
        failed: dict[int, str] = {}
        processed = self._process(logits, requests, failed)
        if not processed and all(p.greedy for p in params) and not any(p.logprobs for p in params):
            # The common decode batch: nothing to do but one argmax (whose chosen logit shows
            # whether its row was finite: argmax takes NaN and +inf as the largest).
            chosen = _argmax(logits)
            best = logits.gather(1, chosen.unsqueeze(1)).squeeze(1)
            _mark_non_finite(best, range(num_rows), failed, "the model's logits are not finite")
            return SamplerOutput(chosen.tolist(), [None] * num_rows, failed)
        _set_aside(logits, range(num_rows), failed, "the logits after bias, penalties and "
                   "masks are not finite")

        lp_rows = [i for i, p in enumerate(params) if p.logprobs]
        logprobs = _select(logits, lp_rows).log_softmax(-1) if lp_rows else None

        tokens = torch.empty(num_rows, dtype=torch.long, device=dev)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if greedy:
            tokens[_on(torch.tensor(greedy), dev)] = _argmax(_select(logits, greedy))
        if sampled:
            tokens[_on(torch.tensor(sampled), dev)] = self._sample(logits, requests, sampled,
                                                                   failed)
        token_ids = tokens.tolist()

        raw: list[RawLogprobs | None] = [None] * num_rows
        if logprobs is not None:
            raw_rows = _raw_logprobs(logprobs, [token_ids[i] for i in lp_rows],
                                     [params[i].top_logprobs for i in lp_rows])
            for i, entry in zip(lp_rows, raw_rows):
                raw[i] = entry if i not in failed else None
        return SamplerOutput(token_ids, raw, failed)

    # -- stages 1-5: in-place changes to the logits --------------------------------------------

    def _process(self, logits: Tensor, requests: list[Request], failed: dict[int, str]) -> bool:
        """Applies bias, min_tokens, penalties and grammar masks; False when none applied."""
        flat = logits.view(-1)
        changed = self._apply_logit_bias(flat, requests)
        changed |= self._apply_min_tokens(flat, requests)
        changed |= self._apply_repetition_penalty(flat, requests)
        changed |= self._apply_presence_frequency(flat, requests)
        changed |= _apply_masks(logits, requests, failed)
        return changed

    def _apply_logit_bias(self, flat: Tensor, requests: list[Request]) -> bool:
        keys: list[int] = []
        values: list[float] = []
        for i, r in enumerate(requests):
            for token, bias in r.sampling.logit_bias.items():
                keys.append(i * self.vocab_size + token)
                values.append(bias)
        if not keys:
            return False
        # Keys are unique (one dict per row), so a plain indexed add is exact.
        flat.index_add_(0, _on(torch.tensor(keys), flat.device),
                        _on(torch.tensor(values, dtype=flat.dtype), flat.device))
        return True

    def _apply_min_tokens(self, flat: Tensor, requests: list[Request]) -> bool:
        keys: list[int] = []
        for i, r in enumerate(requests):
            p = r.sampling
            if r.num_output_tokens >= p.min_tokens:
                continue
            stops = set(p.stop_token_ids)
            if not p.ignore_eos:
                stops.update(self.eos_token_ids)
            # An id outside the vocabulary can never be sampled: nothing to keep out.
            keys.extend(i * self.vocab_size + t for t in stops if 0 <= t < self.vocab_size)
        if not keys:
            return False
        flat[_on(torch.tensor(keys), flat.device)] = float("-inf")
        return True

    def _apply_repetition_penalty(self, flat: Tensor, requests: list[Request]) -> bool:
        rows = [i for i, r in enumerate(requests) if r.sampling.repetition_penalty != 1.0]
        if not rows:
            return False
        # Prompt and output tokens.
        keys = self._keys(rows, [requests[i].token_ids for i in rows], flat.device)
        penalty = torch.tensor([requests[i].sampling.repetition_penalty for i in rows])
        penalty = penalty.repeat_interleave(
            torch.tensor([requests[i].num_tokens for i in rows]))
        penalty = _on(penalty, flat.device)
        values = flat[keys]
        # A token seen twice appears twice in keys; both writes carry the same value.
        flat[keys] = torch.where(values > 0, values / penalty, values * penalty)
        return True

    def _apply_presence_frequency(self, flat: Tensor, requests: list[Request]) -> bool:
        rows = [i for i, r in enumerate(requests)
                if (r.sampling.presence_penalty or r.sampling.frequency_penalty)
                and r.num_output_tokens]
        if not rows:
            return False
        keys = self._keys(rows, [requests[i].output_token_ids for i in rows], flat.device)
        keys, counts = torch.unique(keys, return_counts=True)
        # Per row of the batch (a row without keys reads nothing); built here, sent at once.
        presence = _on(torch.tensor([r.sampling.presence_penalty for r in requests],
                                    dtype=torch.float32), flat.device)
        frequency = _on(torch.tensor([r.sampling.frequency_penalty for r in requests],
                                     dtype=torch.float32), flat.device)
        row = keys // self.vocab_size
        flat.index_add_(0, keys, -(frequency[row] * counts + presence[row]))
        return True

    def _keys(self, rows: list[int], token_lists: list[list[int]],
              device: torch.device) -> Tensor:
        """Flat indexes ``row * vocab + token`` of every token in each row's list, on
        ``device`` (computed on the CPU, sent in one copy)."""
        tokens = array("q")
        for ids in token_lists:
            tokens.extend(ids)
        if not tokens:
            return torch.empty(0, dtype=torch.long, device=device)
        offsets = torch.tensor(rows, dtype=torch.long) * self.vocab_size
        # frombuffer avoids torch.tensor(list) (~180 ns an int; a long prompt costs ms).
        return _on(torch.frombuffer(tokens, dtype=torch.long) + offsets.repeat_interleave(
            torch.tensor([len(ids) for ids in token_lists])), device)

    # -- stage 8: sampled rows -------------------------------------------------------------

    def _sample(self, logits: Tensor, requests: list[Request], rows: list[int],
                failed: dict[int, str]) -> Tensor:
        """Token ids for ``rows`` (not greedy), in that order; a row whose logits overflow
        when divided by its temperature goes to ``failed``."""
        params = [requests[i].sampling for i in rows]
        vocab = self.vocab_size
        dev = logits.device
        # One uniform in (0, 1] per row: the row's stream at its step, made on the device.
        u = _uniforms([_stream_key(requests[i]) for i in rows],
                      [requests[i].num_output_tokens for i in rows], dev)
        top_p = _on(torch.tensor([p.top_p for p in params], dtype=torch.float64), dev)
        # min_p 0: -inf, keeps all.
        log_min_p = _on(torch.tensor([p.min_p for p in params]).log(), dev)

        full: list[int] = []
        nucleus: list[int] = []
        by_top_k: dict[int, list[int]] = {}
        for j, p in enumerate(params):
            if 0 < p.top_k < vocab:
                by_top_k.setdefault(p.top_k, []).append(j)
            elif p.top_p < 1.0:
                nucleus.append(j)
            else:
                full.append(j)

        def scaled(group: list[int]) -> Tensor:
            temperature = _on(torch.tensor([params[j].temperature for j in group]),
                              dev).unsqueeze(1)
            if len(group) == logits.shape[0]:
                out = logits / temperature
            else:
                out = logits.index_select(
                    0, _on(torch.tensor([rows[j] for j in group]), dev)).div_(temperature)
            _set_aside(out, [rows[j] for j in group], failed,
                       "the logits divided by the temperature are not finite")
            return out

        tokens = torch.empty(len(rows), dtype=torch.long, device=dev)
        if full:
            idx = _on(torch.tensor(full), dev)
            tokens[idx] = _draw_full(scaled(full), log_min_p[idx], u[idx])
        for k, group in by_top_k.items():
            idx = _on(torch.tensor(group), dev)
            values, ids = _topk(scaled(group), k)
            # top-p renormalises over the top-k survivors.
            tokens[idx], _ = _draw_candidates(values.log_softmax(-1), ids, top_p[idx],
                                              log_min_p[idx], u[idx])
        if nucleus:
            idx = _on(torch.tensor(nucleus), dev)
            logp = scaled(nucleus).log_softmax(-1)
            for tier in (*_TOP_P_TIERS, vocab):
                k = min(tier, vocab)
                cand, ids = _topk(logp, k)
                drawn, covered = _draw_candidates(cand, ids, top_p[idx], log_min_p[idx], u[idx])
                if k == vocab:
                    covered[:] = True
                tokens[idx[covered]] = drawn[covered]
                if bool(covered.all()):
                    break
                left = ~covered
                idx, logp = idx[left], logp[left]
        return tokens


def _on(x: Tensor, device: torch.device) -> Tensor:
    """``x``, built on the CPU, on ``device`` (itself when that is the CPU): one copy that does
    not wait for the device's queue (``.to(device)`` and ``torch.tensor(..., device=device)``
    synchronize with a CUDA stream; from pageable memory the source is read before it
    returns, so a temporary may go at once)."""
    return x.to(device, non_blocking=True)


def _select(x: Tensor, rows: list[int]) -> Tensor:
    """Rows of ``x``, without a copy when ``rows`` is all of them in order."""
    if len(rows) == x.shape[0]:
        return x
    return x.index_select(0, _on(torch.tensor(rows), x.device))


# -- row kernels -----------------------------------------------------------------------------
# Viewing a row as blocks of _BLOCK tokens lets a vectorised max or sum over each block do the
# full pass (ATen's argmax, topk and long cumsum are scalar loops on the CPU, 5-20x slower).
# Every block reduction runs within one thread, so results do not depend on the batch. On
# another device (CUDA) argmax and topk are the native kernels, which need no such trick.

_BLOCK = 64


def _argmax(x: Tensor) -> Tensor:
    """``x.argmax(-1)`` (the lowest id on ties), through block maxima."""
    rows, vocab = x.shape
    if vocab % _BLOCK or x.device.type != "cpu":
        return x.argmax(-1)  # CUDA too: the first maximum on ties (NaN counts as the largest)
    blocks = x.view(rows, vocab // _BLOCK, _BLOCK)
    best = blocks.amax(-1).argmax(-1)  # the first block holding the maximum
    return best * _BLOCK + blocks[torch.arange(rows, device=x.device), best].argmax(-1)


def _topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``x.topk(k, -1)``, sorted descending. Through block maxima when k is small: the k
    largest values lie in the k blocks with the largest maxima."""
    rows, vocab = x.shape
    block = _BLOCK // 2
    if vocab % block or 4 * k * block > vocab or x.device.type != "cpu":
        return x.topk(k, -1)
    blocks = x.view(rows, vocab // block, block).amax(-1).topk(k, -1).indices
    offsets = torch.arange(block, device=x.device)
    ids = (blocks.unsqueeze(-1) * block + offsets).view(rows, k * block)
    values, pos = x.gather(1, ids).topk(k, -1)
    return values, ids.gather(1, pos)


def _stream_key(request: Request) -> int:
    """The request's 64-bit stream key as a signed int64 (made on first use)."""
    key = request.rng_key
    if key is None:
        seed = request.sampling.seed
        key = secrets.randbits(64) if seed is None else (seed + request.index) % 2**64
        key = request.rng_key = _signed(key)
    return key


def _signed(value: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    return value - 2**64 if value >= 2**63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)  # SplitMix64's constants, as int64 (they wrap the same)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _uniforms(keys: list[int], counters: list[int], device: torch.device) -> Tensor:
    """Float64 uniforms in (0, 1]: SplitMix64 of ``key + (counter + 1) * golden`` (int64
    arithmetic wraps modulo 2**64 on every device torch runs on), top 53 bits."""
    key = _on(torch.tensor(keys, dtype=torch.int64), device)
    counter = _on(torch.tensor(counters, dtype=torch.int64), device)
    z = key + (counter + 1) * _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return 1.0 - _shift_right(z, 11).to(torch.float64) * 2.0 ** -53


def _apply_masks(logits: Tensor, requests: list[Request], failed: dict[int, str]) -> bool:
    rows = [i for i, r in enumerate(requests) if r.logits_mask is not None]
    if not rows:
        return False
    plain_rows: list[int] = []
    plain_words: list[Tensor] = []
    for i in rows:
        mask = requests[i].logits_mask
        try:
            words = mask.bitmask()
            if words is None:
                mask.apply(logits[i])
            else:
                plain_rows.append(i)
                plain_words.append(words)
        except Exception as exc:  # this request's grammar: the other rows go on
            failed[i] = f"its grammar failed: {type(exc).__name__}: {exc}"
    if plain_rows:  # the rows whose mask is their grammar's alone, all at once
        apply_bitmasks(logits, plain_rows, plain_words)
    dead = _select(logits, rows).amax(-1) == float("-inf")
    for j in dead.nonzero().flatten().tolist():
        failed.setdefault(rows[j], "its grammar allows no token")
    return True


def _mark_non_finite(values: Tensor, rows: Iterable[int], failed: dict[int, str],
                     why: str) -> Tensor:
    """Puts the rows (``values[j]`` is row ``rows[j]``'s) whose value is not finite into
    ``failed``; returns the mask of those positions."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        rows = list(rows)
        for j in bad.nonzero().flatten().tolist():
            failed.setdefault(rows[j], why)
    return bad


def _set_aside(x: Tensor, rows: Iterable[int], failed: dict[int, str], why: str) -> None:
    """Rows of ``x`` (``x[j]`` is row ``rows[j]``) whose largest value is not finite (NaN,
    +inf, or all -inf), and rows already failed, are marked failed and zeroed in place: the
    batched kernels then stay well defined and the other rows are unaffected."""
    rows = list(rows)
    bad = _mark_non_finite(x.amax(-1), rows, failed, why)
    if failed:
        already = [j for j, row in enumerate(rows) if row in failed]
        if already:  # one indexed write, not one per row (each a copy on a GPU)
            bad[_on(torch.tensor(already), bad.device)] = True
    if bool(bad.any()):
        x[bad] = 0.0


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """Column index per row drawn with probability proportional to ``weights`` (>= 0).

    The first index whose running sum reaches ``u * total``: with ``u`` in (0, 1] the target
    is in (0, total], so the chosen index always has a positive weight. Running sums are
    float64, so tail tokens keep their probability. A long row goes in two levels: the block
    holding the target, then the token inside that block.
    """
    rows, n = weights.shape
    if n % _BLOCK or n <= 4 * _BLOCK:
        cdf = weights.double().cumsum(-1)
        return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
    blocks = weights.view(rows, n // _BLOCK, _BLOCK)
    block_cdf = blocks.sum(-1).double().cumsum(-1)
    target = (u * block_cdf[:, -1]).unsqueeze(1)
    block = torch.searchsorted(block_cdf, target)  # [rows, 1]
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    inner_cdf = blocks[torch.arange(rows, device=weights.device),
                       block.squeeze(1)].double().cumsum(-1)
    # Positive (target > before); at most the block's own total, which its in-block running
    # sum may round a little differently from the block sum.
    rest = torch.minimum(target - before, inner_cdf[:, -1:])
    return block.squeeze(1) * _BLOCK + torch.searchsorted(inner_cdf, rest).squeeze(1)


def _draw_full(x: Tensor, log_min_p: Tensor, u: Tensor) -> Tensor:
    """Draw over the whole vocabulary (no top-k, no top-p)."""
    shifted = x - x.amax(-1, keepdim=True)
    if bool((log_min_p > float("-inf")).any()):
        shifted.masked_fill_(shifted < log_min_p.unsqueeze(1), float("-inf"))
    return _inverse_cdf(shifted.exp_(), u)


def _draw_candidates(logp: Tensor, ids: Tensor, top_p: Tensor, log_min_p: Tensor,
                     u: Tensor) -> tuple[Tensor, Tensor]:
    """Draw among sorted candidates (``logp`` descending, normalised over the distribution the
    top-p mass refers to). Also says per row whether the candidates hold ``top_p`` of the mass,
    i.e. whether the nucleus fits in them."""
    probs = logp.double().exp()
    cum = probs.cumsum(-1)
    covered = cum[:, -1] >= top_p
    # Keep a token while the mass before it is below top_p: the smallest prefix reaching
    # top_p. The first token always stays, also for top_p 0 (only the likeliest token).
    keep = ((cum - probs) < top_p.unsqueeze(1)) | (top_p >= 1.0).unsqueeze(1)
    keep[:, 0] = True
    keep &= logp >= logp[:, :1] + log_min_p.unsqueeze(1)
    drawn = _inverse_cdf(probs * keep, u)
    return ids.gather(1, drawn.unsqueeze(1)).squeeze(1), covered


def _raw_logprobs(logprobs: Tensor, chosen: list[int], top_n: list[int]) -> list[RawLogprobs]:
    chosen_lp = logprobs.gather(1, _on(torch.tensor(chosen), logprobs.device).unsqueeze(1)
                                ).squeeze(1).tolist()
    values: list[list[float]] = [[] for _ in top_n]
    ids: list[list[int]] = [[] for _ in top_n]
    if max(top_n):
        top_values, top_ids = _topk(logprobs, max(top_n))
        values, ids = top_values.tolist(), top_ids.tolist()
    return [RawLogprobs(chosen_lp[j], tuple(ids[j][:n]), tuple(values[j][:n]))
            for j, n in enumerate(top_n)]
