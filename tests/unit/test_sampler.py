"""The sampler: processing order, penalties, filters, logprobs and seeded reproducibility."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from core.errors import InvalidRequest
from router.chat.wire import to_generate_request
from router.openai.schemas import parse_chat_request
from tests.support.sampling import (
    EOS,
    SEEDED_CONFIGS,
    VOCAB,
    AllowOnly,
    make_request,
    random_logits,
    run_seeded,
)
from workers import wire
from workers.engine import sampler as sampler_module
from workers.engine.request import Request
from workers.engine.sampler import Sampler
from workers.engine.sampling_params import SamplingParams


def sample_one(sampler: Sampler, logits_row: torch.Tensor, request: Request) -> int:
    return sampler(logits_row.unsqueeze(0).clone(), [request]).token_ids[0]



# -- seeds -----------------------------------------------------------------------------------



@pytest.mark.parametrize("config", SEEDED_CONFIGS.values(), ids=SEEDED_CONFIGS.keys())
def test_same_seed_gives_same_tokens_whatever_the_batch_and_row(config):
    alone = run_seeded(config, row=0, batch=1)
    assert len(set(alone)) > 1  # really sampled, not one forced token
    assert run_seeded(config, row=0, batch=8) == alone
    assert run_seeded(config, row=5, batch=8) == alone


def test_different_seeds_and_sibling_indexes_give_different_tokens():
    sampler = Sampler(VOCAB, (EOS,))
    requests = [make_request(seed=1), make_request(seed=3), make_request(seed=1, index=1),
                make_request(), make_request()]
    logits = random_logits(1, scale=1.0)[0]
    for _ in range(20):
        out = sampler(logits.expand(len(requests), -1).clone(), requests)
        for req, token in zip(requests, out.token_ids):
            req.append_token(token)
    sequences = [tuple(r.output_token_ids) for r in requests]
    assert len(set(sequences)) == len(requests)
    assert len({r.rng_key for r in requests}) == len(requests)  # unseeded: from the OS


# -- greedy and forcing ----------------------------------------------------------------------

def test_greedy_rows_take_the_argmax_alone_and_beside_sampled_rows():
    sampler = Sampler(VOCAB, (EOS,))
    logits = random_logits(6, seed=3)
    expected = logits.argmax(-1).tolist()
    all_greedy = [make_request(temperature=0.0) for _ in range(6)]
    assert sampler(logits.clone(), all_greedy).token_ids == expected
    mixed = [make_request(temperature=0.0 if i % 2 else 1.0) for i in range(6)]
    tokens = sampler(logits.clone(), mixed).token_ids
    assert [t for i, t in enumerate(tokens) if i % 2] == expected[1::2]


def test_greedy_breaks_ties_toward_the_lowest_token_id():
    sampler = Sampler(VOCAB, (EOS,))
    logits = random_logits(2, seed=12)
    logits[:, [40_000, 7_000, 7_001]] = 100.0
    assert sampler(logits, [make_request(temperature=0.0)] * 2).token_ids == [7_000, 7_000]


def test_temperature_zero_with_a_seed_is_still_greedy():
    sampler = Sampler(VOCAB, (EOS,))
    logits = random_logits(1, seed=4, scale=0.5)[0]
    req = make_request(temperature=0.0, seed=99)
    assert [sample_one(sampler, logits, req) for _ in range(5)] == [int(logits.argmax())] * 5


def test_top_k_one_equals_greedy():
    sampler = Sampler(VOCAB, (EOS,))
    logits = random_logits(8, seed=5, scale=0.5)
    requests = [make_request(temperature=1.5, top_k=1, seed=i) for i in range(8)]
    assert sampler(logits.clone(), requests).token_ids == logits.argmax(-1).tolist()


def test_logit_bias_plus_100_forces_a_token():
    sampler = Sampler(VOCAB, (EOS,))
    logits = random_logits(16, seed=6)
    requests = [make_request(temperature=1.0, seed=i, logit_bias={777: 100.0}) for i in range(16)]
    assert sampler(logits, requests).token_ids == [777] * 16


def test_logit_bias_minus_100_bans_the_argmax():
    sampler = Sampler(VOCAB, (EOS,))
    logits = random_logits(1, seed=7)[0]
    logits[123] = 50.0  # the argmax by far
    runner_up = int(torch.cat([logits[:123], torch.tensor([-50.0]), logits[124:]]).argmax())
    greedy = make_request(temperature=0.0, logit_bias={123: -100.0})
    assert sample_one(sampler, logits, greedy) == runner_up
    for seed in range(20):
        sampled = make_request(temperature=1.0, seed=seed, logit_bias={123: -100.0})
        assert sample_one(sampler, logits, sampled) != 123


def test_logits_mask_that_allows_one_token_forces_it_and_is_not_accepted_by_the_sampler():
    sampler = Sampler(VOCAB, (EOS,))
    logits = random_logits(3, seed=8)
    requests = [make_request(temperature=0.0), make_request(temperature=1.0, seed=1),
                make_request(temperature=0.5, top_p=0.5, top_k=5)]
    masks = [AllowOnly(40), AllowOnly(41), AllowOnly(42)]
    for req, mask in zip(requests, masks):
        req.logits_mask = mask
    assert sampler(logits, requests).token_ids == [40, 41, 42]
    assert all(m.accepted == [] for m in masks)  # the engine accepts, after the step


class Broken:
    """A grammar whose mask raises."""

    def bitmask(self) -> None:
        return None

    def apply(self, logits: torch.Tensor) -> None:
        raise RuntimeError("matcher exploded")


@pytest.mark.parametrize("mask, why", [(AllowOnly(None), "allows no token"),
                                       (Broken(), "matcher exploded")])
def test_a_mask_that_fails_fails_only_its_own_row(mask, why):
    sampler = Sampler(VOCAB, (EOS,))
    reqs = [make_request(temperature=0.0), make_request(temperature=1.0, seed=4),
            make_request(temperature=1.0, seed=5)]
    reqs[1].logits_mask = mask
    logits = random_logits(3)
    alone = [sample_one(Sampler(VOCAB, (EOS,)), logits[i], reqs[i]) for i in (0, 2)]
    # The same draw again: a row's uniform depends on its stream key and step only.
    out = sampler(logits.clone(), reqs)
    assert set(out.failed) == {1} and why in out.failed[1]
    assert [out.token_ids[0], out.token_ids[2]] == alone


# -- one row cannot fail the batch (issue 13, finding 3) ----------------------------------------

BAD_ROWS = {"nan": float("nan"), "+inf": float("inf"), "-inf everywhere": float("-inf")}


@pytest.mark.parametrize("bad", list(BAD_ROWS))
@pytest.mark.parametrize("logprobs", [False, True])
def test_a_row_that_cannot_be_sampled_fails_alone_and_the_others_sample_as_alone(bad, logprobs):
    configs = [dict(temperature=0.0), dict(temperature=0.8, seed=1),
               dict(temperature=0.8, seed=2, top_p=0.9), dict(temperature=0.8, seed=3, top_k=20),
               dict(temperature=0.0, logit_bias={7: 5.0})]
    logits = random_logits(len(configs) + 1)
    if bad == "-inf everywhere":
        logits[2].fill_(float("-inf"))
    else:
        logits[2, 100] = BAD_ROWS[bad]
    good = [0, 1, 3, 4, 5]
    extra = dict(logprobs=True, top_logprobs=2) if logprobs else {}
    alone = [sample_one(Sampler(VOCAB, (EOS,)), logits[i], make_request(**configs[j], **extra))
             for j, i in enumerate(good)]
    reqs = [make_request(**c, **extra) for c in configs]
    reqs.insert(2, make_request(temperature=0.8, seed=9, **extra))
    out = Sampler(VOCAB, (EOS,))(logits.clone(), reqs)
    assert list(out.failed) == [2] and "not finite" in out.failed[2]
    assert [out.token_ids[i] for i in good] == alone
    if logprobs:
        assert out.logprobs[2] is None
        assert all(math.isfinite(out.logprobs[i].chosen_logprob) for i in good)


def test_a_non_finite_row_in_a_plain_greedy_batch_fails_alone():
    logits = random_logits(3)
    logits[1, 5] = float("nan")
    reqs = [make_request(temperature=0.0) for _ in range(3)]
    out = Sampler(VOCAB, (EOS,))(logits.clone(), reqs)
    assert list(out.failed) == [1]
    assert [out.token_ids[0], out.token_ids[2]] == [int(logits[0].argmax()),
                                                    int(logits[2].argmax())]


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 5e-6])
def test_a_temperature_below_the_epsilon_is_greedy_not_inf(temperature):
    params = SamplingParams(temperature=temperature, seed=1)
    assert params.greedy
    logits = random_logits(2)
    reqs = [make_request(temperature=temperature), make_request(temperature=0.8, seed=3)]
    out = Sampler(VOCAB, (EOS,))(logits.clone(), reqs)
    assert not out.failed and out.token_ids[0] == int(logits[0].argmax())
    assert not SamplingParams(temperature=1e-5).greedy


@pytest.mark.parametrize("kwargs, param", [
    ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias"),
    ({"stop": ("x" * 257,)}, "stop"),
    ({"stop_token_ids": tuple(range(65))}, "stop_token_ids"),
])
def test_the_router_s_field_bounds_hold_for_any_sender_of_the_wire(kwargs, param):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


@pytest.mark.parametrize("penalty", [1e-40, 0.05, 2.5])
def test_repetition_penalty_outside_its_bounds_is_refused(penalty):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(repetition_penalty=penalty)
    assert info.value.param == "repetition_penalty"
    SamplingParams(repetition_penalty=0.1)
    SamplingParams(repetition_penalty=2.0)


# -- min_tokens ------------------------------------------------------------------------------

def test_min_tokens_keeps_eos_and_stop_tokens_out_until_reached():
    sampler = Sampler(VOCAB, (EOS,))
    logits = torch.zeros(VOCAB)
    logits[EOS], logits[9], logits[4] = 30.0, 20.0, 10.0
    req = make_request(temperature=0.0, min_tokens=3, stop_token_ids=(9,))
    tokens = []
    for _ in range(4):
        token = sample_one(sampler, logits, req)
        tokens.append(token)
        req.append_token(token)
    assert tokens == [4, 4, 4, EOS]


def test_min_tokens_leaves_eos_alone_when_eos_is_ignored():
    sampler = Sampler(VOCAB, (EOS,))
    logits = torch.zeros(VOCAB)
    logits[EOS], logits[9] = 30.0, 20.0
    req = make_request(temperature=0.0, min_tokens=3, ignore_eos=True, stop_token_ids=(9,))
    assert sample_one(sampler, logits, req) == EOS  # EOS does not stop this sequence


# -- penalties: exact values on a tiny vocabulary, read back through logprobs ----------------

def processed_logits(logits: list[float], request: Request) -> list[float]:
    """The logits after the sampler's processing, up to a constant (from full logprobs)."""
    vocab = len(logits)
    out = Sampler(vocab, (EOS,))(torch.tensor([logits]), [request])
    raw = out.logprobs[0]
    by_id = dict(zip(raw.top_ids, raw.top_logprobs))
    assert sorted(by_id) == list(range(vocab))
    return [by_id[t] - by_id[0] for t in range(vocab)]


def relative(values: list[float]) -> list[float]:
    return [v - values[0] for v in values]


def make_tiny(prompt, output, **sampling) -> Request:
    req = make_request(prompt=prompt, temperature=0.0, logprobs=True, top_logprobs=6, **sampling)
    for token in output:
        req.append_token(token)
    return req


LOGITS = [1.0, 2.0, -2.0, 0.5, 3.0, -1.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    req = make_tiny([1, 2], [2, 3], repetition_penalty=2.0)
    expected = [1.0, 1.0, -4.0, 0.25, 3.0, -1.0]  # prompt and output tokens 1, 2, 3
    assert processed_logits(LOGITS, req) == pytest.approx(relative(expected), abs=1e-5)


def test_presence_and_frequency_penalties_count_output_tokens_only():
    req = make_tiny([1, 4], [3, 3, 4, 3], presence_penalty=0.25, frequency_penalty=0.5)
    expected = [1.0, 2.0, -2.0, 0.5 - 3 * 0.5 - 0.25, 3.0 - 0.5 - 0.25, -1.0]
    assert processed_logits(LOGITS, req) == pytest.approx(relative(expected), abs=1e-5)


def test_penalties_and_bias_apply_in_the_documented_order():
    req = make_tiny([5], [5, 4], logit_bias={4: -4.0, 2: 1.0}, repetition_penalty=2.0,
                    frequency_penalty=1.0)
    # bias, then repetition (4: 3-4=-1 -> -2; 5: -1 -> -2), then frequency (4, 5 once).
    expected = [1.0, 2.0, -1.0, 0.5, -2.0 - 1.0, -2.0 - 1.0]
    assert processed_logits(LOGITS, req) == pytest.approx(relative(expected), abs=1e-5)


# -- filters ---------------------------------------------------------------------------------

def draws(sampler: Sampler, logits_row: torch.Tensor, times: int, **sampling) -> list[int]:
    """One token from each of ``times`` requests seeded 0.. that share one row of logits."""
    requests = [make_request(seed=s, **sampling) for s in range(times)]
    return sampler(logits_row.expand(times, -1).clone(), requests).token_ids


def test_small_top_p_keeps_only_the_top_token():
    sampler = Sampler(VOCAB, (EOS,))
    logits = random_logits(1, seed=9, scale=2.0)[0]
    top_prob = logits.softmax(-1).max().item()
    tokens = draws(sampler, logits, 50, temperature=1.0, top_p=top_prob / 2)
    assert set(tokens) == {int(logits.argmax())}


@pytest.mark.parametrize("top_k", [0, 50])
def test_top_p_zero_keeps_only_the_likeliest_token(top_k):
    sampler = Sampler(VOCAB, (EOS,))
    logits = random_logits(1, seed=11, scale=0.1)[0]  # nearly flat: any nucleus would spread
    tokens = draws(sampler, logits, 50, temperature=1.5, top_p=0.0, top_k=top_k)
    assert set(tokens) == {int(logits.argmax())}


def test_top_p_zero_sent_by_the_router_keeps_only_the_likeliest_token_on_the_worker():
    """OpenAI's ``top_p: 0`` end to end: the router's wire request, the worker's reading of
    it, the sampler. (Unset on the wire, top_p reads as 1.0.)"""
    body = {"model": "electron", "messages": [{"role": "user", "content": "Hi"}],
            "temperature": 1.5, "top_p": 0}
    msg = to_generate_request(parse_chat_request(body, max_messages=10), request_id="r",
                              prompt_token_ids=[5, 6, 7], max_tokens=4, model="electron")
    params = wire.sampling_params(msg.sampling)
    assert params.top_p == 0.0 and not params.greedy
    sampler = Sampler(VOCAB, (EOS,))
    logits = random_logits(1, seed=12, scale=0.1)[0]
    requests = [Request(request_id=f"z{s}", parent_id=f"z{s}", prompt_token_ids=[5, 6, 7],
                        sampling=dataclasses.replace(params, seed=s)) for s in range(50)]
    tokens = sampler(logits.expand(50, -1).clone(), requests).token_ids
    assert set(tokens) == {int(logits.argmax())}
    msg.sampling.ClearField("top_p")
    assert wire.sampling_params(msg.sampling).top_p == 1.0


def test_top_p_keeps_the_smallest_prefix_reaching_top_p():
    sampler = Sampler(6, (EOS,))
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0, 0.0]).log()
    tokens = draws(sampler, logits, 400, temperature=1.0, top_p=0.75)
    assert set(tokens) == {0, 1}
    assert 0.5 < tokens.count(0) / len(tokens) < 0.75  # renormalised: 0.5 / 0.8 = 0.625


def test_top_p_nucleus_larger_than_the_first_candidate_tiers_is_sampled_exactly():
    vocab = 4096
    sampler = Sampler(vocab, (EOS,))
    logits = torch.linspace(0.0, -1.0, vocab)[torch.randperm(vocab, generator=torch.Generator()
                                                                 .manual_seed(0))]
    probs, order = logits.softmax(-1).sort(descending=True)
    nucleus_size = int((probs.cumsum(-1) - probs < 0.6).sum())
    assert nucleus_size > 1024  # beyond the 128 and 1024 tiers
    rank = {int(t): r for r, t in enumerate(order)}
    ranks = [rank[t] for t in draws(sampler, logits, 200, temperature=1.0, top_p=0.6)]
    assert max(ranks) < nucleus_size
    assert sum(r >= 1024 for r in ranks) > 20


def test_top_k_keeps_the_k_most_likely_tokens():
    sampler = Sampler(VOCAB, (EOS,))
    logits = random_logits(1, seed=10, scale=0.1)[0]
    allowed = set(logits.topk(3).indices.tolist())
    tokens = draws(sampler, logits, 100, temperature=1.0, top_k=3)
    assert set(tokens) == allowed


def test_min_p_drops_tokens_below_its_share_of_the_top_probability():
    sampler = Sampler(5, (EOS,))
    logits = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]).log()
    tokens = draws(sampler, logits, 300, temperature=1.0, min_p=0.25)  # keeps p >= 0.125
    assert set(tokens) == {0, 1}


@pytest.mark.parametrize("vocab", [4, 4096])  # one running sum; block sums, then one block
def test_unfiltered_sampling_follows_the_distribution(vocab):
    sampler = Sampler(vocab, (EOS,))
    logits = torch.full((vocab,), float("-inf"))
    chances = {0: 0.6, vocab // 3: 0.3, vocab - 1: 0.1}
    for token, p in chances.items():
        logits[token] = math.log(p)
    tokens = draws(sampler, logits, 2000, temperature=1.0)
    assert set(tokens) == set(chances)
    for token, p in chances.items():
        assert tokens.count(token) / 2000 == pytest.approx(p, abs=0.04)


# -- logprobs --------------------------------------------------------------------------------

def test_logprobs_report_the_chosen_token_and_a_sorted_top_list_before_temperature():
    vocab = 16
    sampler = Sampler(vocab, (EOS,))
    logits = random_logits(3, vocab=vocab, seed=11)
    requests = [make_request(temperature=0.5, seed=1, logprobs=True, top_logprobs=16),
                make_request(temperature=0.0, logprobs=True, top_logprobs=3),
                make_request(temperature=1.0, seed=2, logprobs=True)]
    out = sampler(logits.clone(), requests)
    expected = logits.log_softmax(-1)  # no bias or penalties: the model's own distribution
    for row, (token, raw) in enumerate(zip(out.token_ids, out.logprobs)):
        assert raw.chosen_logprob == pytest.approx(expected[row, token].item(), abs=1e-6)
        assert list(raw.top_logprobs) == sorted(raw.top_logprobs, reverse=True)
        for token_id, lp in zip(raw.top_ids, raw.top_logprobs):
            assert lp == pytest.approx(expected[row, token_id].item(), abs=1e-6)
    full = out.logprobs[0]
    assert len(full.top_ids) == 16 and len(set(full.top_ids)) == 16
    assert sum(math.exp(lp) for lp in full.top_logprobs) == pytest.approx(1.0, abs=1e-5)
    assert len(out.logprobs[1].top_ids) == 3
    assert out.logprobs[1].top_ids[0] == out.token_ids[1]  # greedy picks the top logprob
    assert out.logprobs[2].top_ids == () and out.logprobs[2].top_logprobs == ()


def test_top_logprobs_over_the_full_vocabulary_are_the_largest_ones():
    sampler = Sampler(VOCAB, (EOS,))
    logits = random_logits(4, seed=13)
    requests = [make_request(temperature=0.0, logprobs=True, top_logprobs=20) for _ in range(4)]
    out = sampler(logits.clone(), requests)
    values, ids = logits.log_softmax(-1).topk(20)
    for row, raw in enumerate(out.logprobs):
        assert list(raw.top_ids) == ids[row].tolist()
        assert list(raw.top_logprobs) == pytest.approx(values[row].tolist(), abs=1e-6)


def test_requests_without_logprobs_get_none():
    sampler = Sampler(VOCAB, (EOS,))
    requests = [make_request(temperature=1.0, logprobs=True), make_request(temperature=1.0)]
    out = sampler(random_logits(2), requests)
    assert out.logprobs[0] is not None and out.logprobs[1] is None


# -- robustness ------------------------------------------------------------------------------

def test_a_single_finite_logit_gives_that_token_and_no_nan_in_any_mode():
    sampler = Sampler(VOCAB, (EOS,))
    modes = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.3, top_p=0.5),
             dict(temperature=2.0, top_k=40), dict(temperature=1.0, min_p=0.5),
             dict(temperature=1.0, top_p=0.9, top_k=3, repetition_penalty=1.5,
                  frequency_penalty=2.0, presence_penalty=-2.0)]
    requests = [make_request(logprobs=True, top_logprobs=5, seed=i, **m)
                for i, m in enumerate(modes)]
    logits = torch.full((len(modes), VOCAB), float("-inf"))
    finite = [100 + i for i in range(len(modes))]
    for row, token in enumerate(finite):
        logits[row, token] = -1e4 if row % 2 else 1e4
    for req in requests:
        req.append_token(5)
    out = sampler(logits, requests)
    assert out.token_ids == finite
    for raw in out.logprobs:
        assert raw.chosen_logprob == 0.0
        assert not any(math.isnan(lp) for lp in raw.top_logprobs)


def test_logits_of_the_wrong_shape_are_refused():
    sampler = Sampler(VOCAB, (EOS,))
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, VOCAB), [make_request()])
    with pytest.raises(ValueError):
        sampler(torch.zeros(1, VOCAB - 1), [make_request()])


# -- the random stream -----------------------------------------------------------------------

def _splitmix64_uniform(key: int, step: int) -> float:
    """SplitMix64 written out on Python ints (the reference of sampler._uniforms)."""
    m = 2**64
    z = (key + (step + 1) * 0x9E3779B97F4A7C15) % m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % m
    return 1.0 - ((z ^ (z >> 31)) >> 11) * 2.0 ** -53


def test_uniforms_are_splitmix64_of_the_stream_key_and_step_computed_on_tensors():
    rng = random.Random(7)
    keys = [rng.getrandbits(64) for _ in range(2000)] + [0, 1, 2**63 - 1, 2**63, 2**64 - 1]
    steps = [rng.randrange(0, 10**7) for _ in keys]
    got = sampler_module._uniforms([k - 2**64 if k >= 2**63 else k for k in keys], steps,
                                   torch.device("cpu"))
    assert got.dtype == torch.float64
    assert got.tolist() == [_splitmix64_uniform(k, s) for k, s in zip(keys, steps)]
    assert 0.0 < got.min().item() and got.max().item() <= 1.0
    one_stream = sampler_module._uniforms([12345] * 100_000, list(range(100_000)),
                                          torch.device("cpu"))
    assert abs(one_stream.mean().item() - 0.5) < 0.005
    assert abs(one_stream.var().item() - 1 / 12) < 0.002
