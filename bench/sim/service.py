"""The simulated truth: how long one engine step takes on a simulated worker.

A step runs every decoding sequence (one token each) and chunks of prefill, like the
engine's scheduler. Its time, in the simulation, is

    prefill:  sum over chunks of  tokens * spt(step prefill tokens) * (1 + mean context / A)
    decode:   decode_step(decodes) + kv_read_s_per_token * (context tokens of the decodes)
    step   =  (prefill + decode) * noise,   noise ~ lognormal(mean 1, sigma)

where ``spt`` and ``decode_step`` are a ``CostProfile``'s curves (router/routing/cost_model.py: the
same class the router uses), ``A`` (``attention_context_tokens``) is the context length at
which attention costs as much again as the rest of a prefill token, and the KV-read term is
a decode step's memory traffic for attention.

The router's ``kv_aware`` predicts with a profile of its own (``--policy-profile``). To keep
the simulation honest the two differ: by default the router's curves are the truth's divided
by 1.2 (it believes workers 20% faster), and the router knows nothing of the noise, the
attention term or the KV reads.

Built-in truths:
- ``H100_8B``: an 8B-class model (Llama-3-8B: 32 layers, 8 KV heads of 128) in bf16 on one
  H100, for Mooncake-scale prompts (thousands of tokens): prefill ~15-17k tokens/s at large
  chunks, decode step 10 ms at batch 1, 20 ms at 32, 45 ms at 256 -- published vLLM-class
  figures for that pair, not our measurement; attention parity at 32k context (per token,
  4 * context * 4096 * 32 attention FLOPs = 2 * 8e9 linear FLOPs at 32k); KV reads of
  131,072 bytes per context token at ~3 TB/s.
- any profile ``router.routing.cost_model.resolve_profile`` reads (a built-in name, a profile JSON,
  or ``bench/engine_bench.py``'s result), e.g. ``smollm2-cpu``, with no attention or KV-read
  term unless given.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from router.routing.cost_model import CostProfile, resolve_profile

H100_8B = CostProfile(
    name="llama3-8b-class, bf16, one H100 (simulated truth: published figures)",
    max_batch_tokens=8192, max_num_seqs=256,
    prefill=((16, 4.0e-4), (128, 1.0e-4), (1024, 6.5e-5), (8192, 6.0e-5)),
    decode=((1, 0.010), (32, 0.020), (128, 0.030), (256, 0.045)),
)
H100_8B_ATTENTION_CONTEXT = 32_768
H100_8B_KV_READ_S_PER_TOKEN = 131_072 / 3.0e12

BUILT_IN_TRUTHS = {"h100-8b": H100_8B}


def truth_profile(spec: str) -> CostProfile:
    """``h100-8b`` or anything ``resolve_profile`` takes."""
    return BUILT_IN_TRUTHS.get(spec) or resolve_profile(spec)


def scaled(profile: CostProfile, factor: float, name: str | None = None) -> CostProfile:
    """The same profile with every time multiplied by ``factor``."""
    if factor <= 0:
        raise ValueError("factor must be > 0")
    return CostProfile(
        name=name or f"{profile.name} x {factor:.3g}",
        max_batch_tokens=profile.max_batch_tokens, max_num_seqs=profile.max_num_seqs,
        prefill=tuple((x, y * factor) for x, y in profile.prefill),
        decode=tuple((x, y * factor) for x, y in profile.decode))


@dataclass(frozen=True)
class ServiceModel:
    profile: CostProfile
    noise_sigma: float = 0.1
    attention_context_tokens: float | None = None  # None: no attention term
    kv_read_s_per_token: float = 0.0

    def __post_init__(self) -> None:
        if self.noise_sigma < 0 or self.kv_read_s_per_token < 0:
            raise ValueError("noise_sigma and kv_read_s_per_token must be >= 0")
        if self.attention_context_tokens is not None and self.attention_context_tokens <= 0:
            raise ValueError("attention_context_tokens must be > 0")

    @property
    def max_batch_tokens(self) -> int:
        return self.profile.max_batch_tokens

    @property
    def max_num_seqs(self) -> int:
        return self.profile.max_num_seqs

    def noise(self, rng: random.Random) -> float:
        """A multiplicative factor with mean 1."""
        if not self.noise_sigma:
            return 1.0
        sigma = self.noise_sigma
        return rng.lognormvariate(-sigma * sigma / 2, sigma)

    def prefill_s(self, step_tokens: int, context_weighted_tokens: float) -> float:
        """Prefill time of a step with ``step_tokens`` prefill tokens whose chunks sum
        tokens * mean context position to ``context_weighted_tokens``."""
        if step_tokens <= 0:
            return 0.0
        per_token = self.profile.prefill_s_per_token(step_tokens)
        attention = 0.0
        if self.attention_context_tokens is not None:
            attention = context_weighted_tokens / self.attention_context_tokens
        return per_token * (step_tokens + attention)

    def decode_s(self, decodes: int, context_tokens: int) -> float:
        if decodes <= 0:
            return 0.0
        return self.profile.decode_step_s(decodes) + self.kv_read_s_per_token * context_tokens

    def step_s(self, step_tokens: int, context_weighted_tokens: float, decodes: int,
               decode_context_tokens: int, rng: random.Random) -> float:
        return ((self.prefill_s(step_tokens, context_weighted_tokens)
                 + self.decode_s(decodes, decode_context_tokens)) * self.noise(rng))


def chunk_context_weight(start: int, tokens: int) -> float:
    """tokens * their mean context length, for a chunk at positions start .. start+tokens-1
    (each attends over itself and everything before it)."""
    return tokens * (start + (tokens + 1) / 2)


def make_service(truth: str, *, noise_sigma: float, attention_context_tokens: float | None,
                 kv_read_s_per_token: float | None) -> ServiceModel:
    """The truth named ``truth``; ``h100-8b`` brings its attention and KV-read terms unless
    they are given (0 / a non-positive attention context turns them off)."""
    profile = truth_profile(truth)
    if truth == "h100-8b":
        if attention_context_tokens is None:
            attention_context_tokens = H100_8B_ATTENTION_CONTEXT
        if kv_read_s_per_token is None:
            kv_read_s_per_token = H100_8B_KV_READ_S_PER_TOKEN
    if attention_context_tokens is not None and attention_context_tokens <= 0:
        attention_context_tokens = None
    return ServiceModel(profile, noise_sigma, attention_context_tokens,
                        kv_read_s_per_token or 0.0)

