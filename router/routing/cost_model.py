"""Per-model cost profile: how long a worker takes to prefill and to decode, for routing.

A profile holds two measured curves and the engine's step limits:

- ``prefill``: seconds per prompt token as a function of the prefill tokens in one step
  (small steps pay fixed per-step costs; large ones approach the compute roof);
- ``decode``: seconds of one decode step as a function of the decode batch size;
- ``max_batch_tokens`` / ``max_num_seqs``: the engine's step token budget and batch limit.

``predicted_ttft_s`` turns a worker's queue into seconds: under chunked prefill each step runs
every decode first and fills the rest of the token budget with prefill, so ``n`` queued
prefill tokens beside ``d`` decoding requests take ``ceil(n / (budget - d))`` steps, each
paying its prefill tokens and a decode step of ``d`` sequences.

Profiles are JSON: ``{"name", "max_batch_tokens", "max_num_seqs", "prefill": [[tokens,
s_per_token], ...], "decode": [[batch, step_s], ...]}``. ``CostProfile.load`` also reads the
engine benchmark's result file (``bench/engine_bench.py --out``) and derives the curves from
its prefill TTFTs and decode throughputs, so a profile measured on the target machine (CPU or
an H100) replaces the built-in estimates with one flag.

Plain Python: no torch.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Curve = tuple[tuple[float, float], ...]


def _curve(points: Sequence[Sequence[float]], what: str) -> Curve:
    curve = tuple(sorted((float(x), float(y)) for x, y in points))
    if not curve:
        raise ValueError(f"the {what} curve has no points")
    xs = [x for x, _ in curve]
    if len(set(xs)) != len(xs) or xs[0] <= 0 or any(y <= 0 for _, y in curve):
        raise ValueError(f"the {what} curve needs distinct positive x and positive y: {curve}")
    return curve


def _interpolate(curve: Curve, xs: Sequence[float], x: float, extrapolate: bool) -> float:
    """Piecewise-linear in x; flat before the first point; past the last one, flat or (when
    ``extrapolate``) continuing the last segment."""
    i = bisect.bisect_left(xs, x)
    if i < len(xs) and xs[i] == x:
        return curve[i][1]
    if i == 0:
        return curve[0][1]
    if i == len(xs):
        if not extrapolate or len(curve) == 1:
            return curve[-1][1]
        i -= 1
    (x0, y0), (x1, y1) = curve[i - 1], curve[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class CostProfile:
    name: str
    max_batch_tokens: int
    max_num_seqs: int
    prefill: Curve  # (prefill tokens in one step, seconds per token)
    decode: Curve   # (decode batch size, seconds per step)

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 2 or self.max_num_seqs < 1:
            raise ValueError("max_batch_tokens must be >= 2 and max_num_seqs >= 1")
        object.__setattr__(self, "prefill", _curve(self.prefill, "prefill"))
        object.__setattr__(self, "decode", _curve(self.decode, "decode"))
        object.__setattr__(self, "_prefill_xs", tuple(x for x, _ in self.prefill))
        object.__setattr__(self, "_decode_xs", tuple(x for x, _ in self.decode))
        # Routing asks for integer step sizes and batch sizes within the engine's limits on
        # every decision, for every worker: tabulate them once.
        object.__setattr__(self, "_spt", tuple(
            self.prefill_s_per_token(n) for n in range(self.max_batch_tokens + 1)))
        object.__setattr__(self, "_step", tuple(
            self.decode_step_s(b) for b in range(self.max_num_seqs + 1)))

    # -- the curves

    def prefill_s_per_token(self, step_tokens: float) -> float:
        xs = self._prefill_xs  # type: ignore[attr-defined]
        return _interpolate(self.prefill, xs, step_tokens, extrapolate=False)

    def decode_step_s(self, batch: float) -> float:
        if batch <= 0:
            return 0.0
        xs = self._decode_xs  # type: ignore[attr-defined]
        return _interpolate(self.decode, xs, batch, extrapolate=True)

    def prefill_s(self, tokens: int) -> float:
        """Seconds to prefill ``tokens`` on an idle worker."""
        if tokens <= 0:
            return 0.0
        return tokens * self._spt[min(tokens, self.max_batch_tokens)]  # type: ignore[attr-defined]

    def predicted_ttft_s(self, queued_tokens: int, prompt_tokens: int, decoders: int) -> float:
        """Seconds until a prompt needing ``prompt_tokens`` of prefill gets its first token on
        a worker with ``queued_tokens`` of prefill ahead of it and ``decoders`` requests
        decoding meanwhile (FCFS)."""
        total = queued_tokens + prompt_tokens
        if total <= 0:
            return 0.0
        # The engine never runs more than max_num_seqs sequences, nor more decodes than the
        # token budget leaves room for beside one prefill token.
        decoders = min(decoders, self.max_num_seqs, self.max_batch_tokens - 1)
        chunk = self.max_batch_tokens - decoders
        steps = -(-total // chunk)
        prefill = total * self._spt[min(total, chunk)]  # type: ignore[attr-defined]
        return prefill + steps * self._step[decoders]  # type: ignore[attr-defined]

    # -- JSON

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "max_batch_tokens": self.max_batch_tokens,
                "max_num_seqs": self.max_num_seqs,
                "prefill": [list(p) for p in self.prefill],
                "decode": [list(p) for p in self.decode]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CostProfile:
        """A profile JSON, or the engine benchmark's result (recognised by its ``ours`` key)."""
        if "ours" in data:
            return cls.from_engine_bench(data)
        try:
            return cls(name=str(data["name"]), max_batch_tokens=int(data["max_batch_tokens"]),
                       max_num_seqs=int(data["max_num_seqs"]),
                       prefill=tuple(tuple(p) for p in data["prefill"]),
                       decode=tuple(tuple(p) for p in data["decode"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a cost profile: missing or malformed {exc}") from exc

    @classmethod
    def from_engine_bench(cls, result: Mapping[str, Any]) -> CostProfile:
        """Curves from ``bench/engine_bench.py``'s result: a prefill of L tokens took ttft_s in
        steps of min(L, budget) tokens; a batch of B decoded at decode_tps, i.e. one step per
        B / decode_tps seconds."""
        ours = result["ours"]
        engine = ours["engine_config"]
        budget = int(engine["max_num_batched_tokens"])
        measured = sorted((min(int(length), budget), int(length), v["ttft_s"] / int(length))
                          for length, v in ours["prefill"].items())
        # Several lengths above the budget share a step size: the longest (sorted last) wins,
        # its fixed costs being the best amortised.
        by_step = {step: s_per_token for step, _, s_per_token in measured}
        decode = [(int(batch), int(batch) / v["decode_tps"])
                  for batch, v in ours["decode"].items()]
        machine = result.get("machine", {})
        name = f"{machine.get('model', 'model')} on {machine.get('device', 'device')} " \
               f"({machine.get('dtype', '?')}), engine bench {machine.get('date', '')}".strip()
        return cls(name=name, max_batch_tokens=budget, max_num_seqs=int(engine["max_num_seqs"]),
                   prefill=tuple(by_step.items()), decode=tuple(decode))

    @classmethod
    def load(cls, path: str | Path) -> CostProfile:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read cost profile {path}: {exc}") from exc
        return cls.from_json(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


# SmolLM2-135M-Instruct, bfloat16, this project's 2-core development CPU, engine defaults
# (512-token step budget, 64 sequences). Estimates from short engine runs on a shared, busy
# machine, scaled to a quiet one (a decode step of one sequence ~50 ms, as the router tests
# see): replace with a profile measured by the engine benchmark on the serving machine.
SMOLLM2_CPU = CostProfile(
    name="smollm2-135m-instruct, bf16, 2-core CPU (estimate)",
    max_batch_tokens=512, max_num_seqs=64,
    prefill=((16, 4.0e-3), (64, 3.0e-3), (256, 2.8e-3), (512, 2.7e-3)),
    decode=((1, 0.050), (4, 0.065), (16, 0.110), (64, 0.300)),
)

# Llama-3-8B, bfloat16, one H100 (8192-token step budget, 256 sequences): roofline estimates
# (16 GB of weights at ~3 TB/s per decode step; ~600 dense TFLOP/s for large prefills), not
# measurements. ``engine_bench.py --device cuda --model random:llama3-8b`` measures the real one.
LLAMA3_8B_H100 = CostProfile(
    name="llama3-8b, bf16, H100 (roofline estimate)",
    max_batch_tokens=8192, max_num_seqs=256,
    prefill=((16, 5.0e-4), (128, 7.0e-5), (1024, 3.0e-5), (8192, 3.2e-5)),
    decode=((1, 0.0075), (32, 0.009), (128, 0.013), (256, 0.018)),
)

BUILT_IN = {"smollm2-cpu": SMOLLM2_CPU, "llama3-8b-h100": LLAMA3_8B_H100}


def resolve_profile(spec: str | None) -> CostProfile:
    """``None``: the SmolLM2 CPU default; a built-in name; or the path of a JSON file."""
    if spec is None:
        return SMOLLM2_CPU
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    return CostProfile.load(spec)
