"""Requests, logits and seeded-sampling cases shared by the sampler's tests (CPU and CUDA)."""

from __future__ import annotations

import itertools

import torch

from workers.engine.request import Request
from workers.engine.sampler import Sampler
from workers.engine.sampling_params import SamplingParams

VOCAB = 49_152
EOS = 2
_ids = itertools.count()


def make_request(prompt: list[int] | None = None, index: int = 0, **sampling) -> Request:
    rid = f"r{next(_ids)}"
    return Request(request_id=rid, parent_id=rid, prompt_token_ids=prompt or [5, 6, 7],
                   sampling=SamplingParams(**sampling), index=index)


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale


class AllowOnly:
    """A grammar that allows one token, or none (the LogitsMask protocol)."""

    def __init__(self, token: int | None):
        self.token = token
        self.accepted: list[int] = []

    def bitmask(self) -> None:
        return None  # applied row by row

    def apply(self, logits: torch.Tensor) -> None:
        keep = logits[self.token].item() if self.token is not None else None
        logits.fill_(float("-inf"))
        if self.token is not None:
            logits[self.token] = keep

    def accept(self, token_id: int) -> None:
        self.accepted.append(token_id)


# A seeded request of each kind, and the requests it is batched beside.
SEEDED_CONFIGS = {
    "temperature": dict(temperature=0.8),
    "top_p": dict(temperature=0.8, top_p=0.9),
    "top_k_top_p": dict(temperature=1.2, top_k=50, top_p=0.9),
    "min_p": dict(temperature=1.0, min_p=0.05),
    "penalties_logprobs": dict(temperature=0.7, top_p=0.95, frequency_penalty=0.5,
                               presence_penalty=0.3, repetition_penalty=1.2, logprobs=True,
                               top_logprobs=3),
}
NEIGHBOURS = [
    dict(temperature=0.0),
    dict(temperature=0.9, seed=11),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=20, seed=12),
    dict(temperature=1.0, top_p=0.5),
    dict(temperature=0.5, min_p=0.1, frequency_penalty=1.0),
    dict(temperature=1.0, top_p=0.8, top_k=100, logit_bias={3: 5.0}),
]


def run_seeded(config: dict, row: int, batch: int, steps: int = 20,
               device: str = "cpu") -> list[int]:
    """Tokens of one seeded request at ``row`` of a batch of ``batch`` requests on ``device``;
    its own logits are the same each run, the other rows' logits and parameters change with
    the run."""
    sampler = Sampler(VOCAB, (EOS,))
    target = make_request(seed=1234, **config)
    others = [make_request(**NEIGHBOURS[(j + batch) % len(NEIGHBOURS)]) for j in range(batch - 1)]
    requests = others[:row] + [target] + others[row:]
    for step in range(steps):
        # Peaked neighbours stay in the first top-p tier; a full sort costs ~4 ms a row.
        logits = random_logits(batch, seed=1000 * batch + step + row, scale=12.0)
        # From flat to peaked, so top-p rows use every candidate tier.
        logits[row] = random_logits(1, seed=step, scale=(1.0, 3.0, 6.0, 12.0)[step % 4])[0]
        out = sampler(logits.to(device), requests)
        assert not out.failed
        for req, token in zip(requests, out.token_ids):
            req.append_token(token)
    return target.output_token_ids
