"""The sampler and the grammar mask on CUDA logits (``gpu`` marker; skipped without CUDA).

The same batches go through ``Sampler`` on the CPU and on CUDA: the tokens are the same and
the logprobs agree within 1e-4, while spies on the sampler's kernels show that every stage ran,
on CUDA tensors only. Seeded rows keep their tokens when the batch around them changes, a
non-finite row fails alone, and grammar-masked rows (a real ``GrammarCompiler`` on SmolLM2's
tokenizer) only ever pick tokens their grammar allows, as on the CPU.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from core.config import DEFAULT_MODEL
from core.model_files import ModelFilesNotFound, resolve_model_path
from core.tokenizer import Tokenizer
from tests.support.sampling import (
    EOS,
    SEEDED_CONFIGS,
    VOCAB,
    AllowOnly,
    make_request,
    random_logits,
    run_seeded,
)
from tests.support.schemas import obj, schema_spec
from workers.engine import grammar as grammar_module
from workers.engine import sampler as sampler_module
from workers.engine.grammar import GrammarCompiler
from workers.engine.request import Request
from workers.engine.sampler import Sampler, SamplerOutput

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda"


def on_both(sampler: Sampler, logits: torch.Tensor, cpu_requests: list[Request],
            dev_requests: list[Request], seen: dict | None = None
            ) -> tuple[SamplerOutput, SamplerOutput]:
    """The same logits through the sampler on the CPU, then on the device (each a clone);
    ``seen`` (the spies' record) then holds the device run's calls only."""
    out_cpu = sampler(logits.clone(), cpu_requests)
    if seen is not None:
        seen.clear()
    out_dev = sampler(logits.clone().to(DEVICE), dev_requests)
    return out_cpu, out_dev


def assert_same(out_cpu: SamplerOutput, out_dev: SamplerOutput) -> None:
    assert out_dev.token_ids == out_cpu.token_ids
    assert out_dev.failed.keys() == out_cpu.failed.keys()
    for a, b in zip(out_cpu.logprobs, out_dev.logprobs):
        assert (a is None) == (b is None)
        if a is None:
            continue
        assert b.chosen_logprob == pytest.approx(a.chosen_logprob, abs=1e-4)
        assert b.top_ids == a.top_ids
        assert list(b.top_logprobs) == pytest.approx(list(a.top_logprobs), abs=1e-4)


# -- spies: every stage runs, on device tensors only -------------------------------------------

KERNELS = ("_select", "_argmax", "_topk", "_set_aside", "_inverse_cdf", "_draw_full",
           "_draw_candidates", "_raw_logprobs")
STAGES = ("_apply_logit_bias", "_apply_min_tokens", "_apply_repetition_penalty",
          "_apply_presence_frequency")


@pytest.fixture
def seen(monkeypatch) -> dict[str, set[str]]:
    """name -> the device types of the tensors each call of it received or returned (a stage
    records "skipped" when it had nothing to do). Cleared by the test between runs."""
    record: dict[str, set[str]] = {}

    def note(name: str, values) -> None:
        kinds = record.setdefault(name, set())
        for value in values:
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, torch.Tensor):
                    kinds.add(item.device.type)

    for name in KERNELS:
        def kernel_spy(*args, _original=getattr(sampler_module, name), _name=name, **kwargs):
            result = _original(*args, **kwargs)
            note(_name, (*args, *kwargs.values(), result))
            return result
        monkeypatch.setattr(sampler_module, name, kernel_spy)
    for name in STAGES:
        def stage_spy(self, flat, requests, _original=getattr(Sampler, name), _name=name):
            applied = _original(self, flat, requests)
            note(_name, (flat,))
            if not applied:
                record[_name].add("skipped")
            return applied
        monkeypatch.setattr(Sampler, name, stage_spy)
    original_keys = Sampler._keys

    def keys_spy(self, rows, token_lists, device):
        keys = original_keys(self, rows, token_lists, device)
        note("_keys", (keys,))
        return keys
    monkeypatch.setattr(Sampler, "_keys", keys_spy)
    original_bias = grammar_module._device_bias

    def bias_spy(bits, vocab_size, device):
        bias = original_bias(bits, vocab_size, device)
        note("_device_bias", (bias,))
        return bias
    monkeypatch.setattr(grammar_module, "_device_bias", bias_spy)
    return record


def assert_all_on_device(record: dict[str, set[str]], names=()) -> None:
    """Each of ``names`` ran, and everything recorded saw device tensors only."""
    for name in names:
        assert record.get(name) == {DEVICE}, f"{name}: {record.get(name)}"
    for name, kinds in record.items():
        assert kinds - {"skipped"} <= {DEVICE}, f"{name}: {kinds}"


# -- one mixed batch, step after step ------------------------------------------------------------

MIXED = [
    dict(temperature=0.0),                                          # greedy
    dict(temperature=0.0, logprobs=True, top_logprobs=5),
    dict(temperature=1.0, seed=1),                                  # the whole vocabulary
    dict(temperature=1.0, top_p=0.9, seed=2),                       # flat row: a full sort
    dict(temperature=0.8, top_p=0.9, seed=3, logprobs=True, top_logprobs=4),  # peaked row
    dict(temperature=0.7, top_k=50, seed=4),
    dict(temperature=1.2, top_k=50, top_p=0.9, seed=5, logprobs=True, top_logprobs=3),
    dict(temperature=1.0, min_p=0.1, seed=6),
    dict(temperature=0.9, repetition_penalty=1.3, seed=7),
    dict(temperature=0.0, repetition_penalty=1.5),
    dict(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.7),
    dict(temperature=1.0, top_p=0.95, frequency_penalty=1.5, presence_penalty=-0.5, seed=8,
         logprobs=True, top_logprobs=2),
    dict(temperature=0.0, logit_bias={11: 100.0, 12: -100.0}),      # forces 11
    dict(temperature=1.0, logit_bias={13: 5.0, 14: 3.0}, seed=9, logprobs=True),
    dict(temperature=0.0, min_tokens=50, stop_token_ids=(21,)),     # EOS and 21 kept out
    dict(temperature=1.0, min_tokens=50, seed=10, logprobs=True, top_logprobs=1),
    dict(temperature=0.6, top_k=7, min_p=0.05, seed=11, index=1),
]
FLAT, PEAKED, FORCED, MIN_TOKENS = 3, 4, 12, 14


def mixed_logits(step: int) -> torch.Tensor:
    logits = random_logits(len(MIXED), seed=100 + step)
    logits[FLAT] = random_logits(1, seed=200 + step, scale=0.1)[0]    # nucleus of ~44k tokens
    logits[PEAKED] = random_logits(1, seed=300 + step, scale=12.0)[0]  # in the first tier
    logits[MIN_TOKENS, [EOS, 21]] = 60.0                               # the argmax, twice
    logits[:, [40, 41, 5]] += 4.0                                      # seen tokens matter
    return logits


def mixed_requests() -> list[Request]:
    requests = []
    for config in MIXED:
        config = dict(config)
        index = config.pop("index", 0)
        req = make_request(index=index, **config)
        for token in (40, 41, 40, 42, 5):
            req.append_token(token)
        requests.append(req)
    return requests


def test_a_mixed_batch_gives_the_same_tokens_and_logprobs_on_cuda_as_on_the_cpu(seen):
    sampler = Sampler(VOCAB, (EOS,))
    cpu_requests, dev_requests = mixed_requests(), mixed_requests()
    tokens_seen = set()
    for step in range(6):
        logits = mixed_logits(step)
        out_cpu = sampler(logits.clone(), cpu_requests)
        seen.clear()
        dev_logits = logits.clone().to(DEVICE)
        out_dev = sampler(dev_logits, dev_requests)
        assert_same(out_cpu, out_dev)
        assert not out_dev.failed
        assert_all_on_device(seen, (*KERNELS, *STAGES, "_keys"))
        assert out_dev.token_ids[FORCED] == 11
        assert out_dev.token_ids[MIN_TOKENS] not in (EOS, 21)
        assert out_dev.token_ids[0] == int(dev_logits[0].argmax())
        tokens_seen.update(out_dev.token_ids[2:9])
        for reqs in (cpu_requests, dev_requests):
            for req, token in zip(reqs, out_dev.token_ids):
                req.append_token(token)
    assert len(tokens_seen) > 20  # really sampled


def test_a_plain_greedy_batch_on_cuda_takes_the_lowest_id_on_ties(seen):
    sampler = Sampler(VOCAB, (EOS,))
    logits = random_logits(4, seed=12)
    logits[:, [40_000, 7_000, 7_001]] = 100.0
    logits[3, [9_000, 8_999]] = 200.0
    requests = [make_request(temperature=0.0) for _ in range(4)]
    out_cpu, out_dev = on_both(sampler, logits, requests, requests, seen)
    assert out_dev.token_ids == out_cpu.token_ids == [7_000, 7_000, 7_000, 8_999]
    assert_all_on_device(seen, ("_argmax",))


# -- seeds ---------------------------------------------------------------------------------------



@pytest.mark.parametrize("config", SEEDED_CONFIGS.values(), ids=SEEDED_CONFIGS.keys())
def test_a_seed_gives_the_same_tokens_on_cuda_whatever_the_batch_and_row(config):
    alone = run_seeded(config, row=0, batch=1, steps=12, device=DEVICE)
    assert len(set(alone)) > 1  # really sampled, not one forced token
    assert run_seeded(config, row=0, batch=8, steps=12, device=DEVICE) == alone
    assert run_seeded(config, row=5, batch=8, steps=12, device=DEVICE) == alone
    assert run_seeded(config, row=3, batch=6, steps=12) == alone  # and as on the CPU


def test_the_uniforms_made_on_cuda_are_the_cpu_ones_bit_for_bit():
    keys = [0, 1, -1, 2**63 - 1, -(2**63), 123456789, -987654321] * 300
    steps = list(range(len(keys)))
    on_cuda = sampler_module._uniforms(keys, steps, torch.device(DEVICE))
    assert on_cuda.device.type == "cuda"
    assert on_cuda.cpu().tolist() == sampler_module._uniforms(keys, steps,
                                                               torch.device("cpu")).tolist()


# -- one row cannot fail the batch ---------------------------------------------------------------

BAD_ROWS = {"nan": float("nan"), "+inf": float("inf"), "-inf everywhere": float("-inf")}


@pytest.mark.parametrize("bad", list(BAD_ROWS))
@pytest.mark.parametrize("plain_greedy", [False, True])
def test_a_non_finite_row_fails_alone_on_cuda(bad, plain_greedy, seen):
    if plain_greedy:
        configs = [dict(temperature=0.0)] * 5
    else:
        configs = [dict(temperature=0.0, logprobs=True, top_logprobs=2),
                   dict(temperature=0.8, seed=1), dict(temperature=0.8, seed=9),
                   dict(temperature=0.8, seed=2, top_p=0.9, logprobs=True),
                   dict(temperature=0.8, seed=3, top_k=20)]
    logits = random_logits(len(configs), seed=21)
    if bad == "-inf everywhere":
        logits[2].fill_(float("-inf"))
    else:
        logits[2, 100] = BAD_ROWS[bad]
    cpu_requests = [make_request(**c) for c in configs]
    dev_requests = [make_request(**c) for c in configs]
    out_cpu, out_dev = on_both(Sampler(VOCAB, (EOS,)), logits, cpu_requests, dev_requests, seen)
    assert list(out_dev.failed) == [2] and "not finite" in out_dev.failed[2]
    assert_all_on_device(seen, ("_argmax",))
    good = [0, 1, 3, 4]
    assert [out_dev.token_ids[i] for i in good] == [out_cpu.token_ids[i] for i in good]
    alone = [Sampler(VOCAB, (EOS,))(logits[i:i + 1].to(DEVICE), [make_request(**configs[i])])
             for i in good]
    assert [out_dev.token_ids[i] for i in good] == [a.token_ids[0] for a in alone]
    assert out_dev.logprobs[2] is None
    for i in good:
        if out_dev.logprobs[i] is not None:
            assert math.isfinite(out_dev.logprobs[i].chosen_logprob)



def test_a_mask_that_allows_nothing_fails_only_its_row_on_cuda(seen):
    configs = [dict(temperature=0.0), dict(temperature=1.0, seed=4), dict(temperature=1.0, seed=5),
               dict(temperature=0.5, top_k=5, seed=6)]
    masks = [None, AllowOnly(None), None, AllowOnly(42)]
    logits = random_logits(len(configs), seed=22)
    both = []
    for _ in range(2):
        reqs = [make_request(**c) for c in configs]
        for req, mask in zip(reqs, masks):
            req.logits_mask = mask
        both.append(reqs)
    out_cpu, out_dev = on_both(Sampler(VOCAB, (EOS,)), logits, *both, seen)
    assert_all_on_device(seen, ("_select", "_topk", "_draw_full", "_draw_candidates"))
    assert list(out_dev.failed) == [1] and "allows no token" in out_dev.failed[1]
    assert out_dev.token_ids[3] == 42
    assert [out_dev.token_ids[i] for i in (0, 2, 3)] == [out_cpu.token_ids[i] for i in (0, 2, 3)]


# -- grammar masks -------------------------------------------------------------------------------

def tokenizer_path() -> Path:
    """SmolLM2's tokenizer: the embedded model's GGUF file; on a machine without that package,
    a Hugging Face tokenizer directory (``ELECTRON_TEST_TOKENIZER``, else ``.gputok`` at the
    repository's root, where the GPU runs keep SmolLM2's)."""
    named = os.environ.get("ELECTRON_TEST_TOKENIZER")
    if named:
        return Path(named)
    try:
        return resolve_model_path(DEFAULT_MODEL)
    except ModelFilesNotFound:
        local = Path(__file__).resolve().parents[2] / ".gputok"
        if (local / "tokenizer.json").is_file():
            return local
        pytest.skip("SmolLM2's tokenizer is not installed")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_model_path(tokenizer_path())


@pytest.fixture(scope="module")
def compiler(tok):
    comp = GrammarCompiler(tok, tok.vocab_size, tok.eos_token_ids, overlap=False)
    yield comp
    comp.close()


SCHEMA = obj({"name": {"type": "string", "maxLength": 12},
              "age": {"type": "integer", "minimum": 0, "maximum": 120},
              "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}})
BUDGET = 40
GRAMMAR_ROWS = [
    dict(temperature=0.0),
    dict(temperature=1.0, seed=31),
    dict(temperature=0.9, top_k=50, top_p=0.9, seed=32, logprobs=True, top_logprobs=3),
    dict(temperature=1.0, min_p=0.1, seed=33, repetition_penalty=1.2),
]


def test_grammar_masked_rows_on_cuda_pick_only_allowed_tokens_as_on_the_cpu(tok, compiler,
                                                                          seen):
    vocab = tok.vocab_size
    eos = set(tok.eos_token_ids)
    sampler = Sampler(vocab, tuple(sorted(eos)))
    spec = schema_spec(SCHEMA)
    yes = schema_spec({"enum": ["yes"]}, strict=False)
    sides = []
    for _ in range(2):
        reqs = [make_request(**c) for c in GRAMMAR_ROWS]
        for req in reqs:
            req.logits_mask = compiler.matcher(spec, max_tokens=BUDGET)
        # Once "yes" is written the grammar allows only EOS, which min_tokens keeps out: the
        # grammar wins (the all -inf fallback), then EOS.
        done = make_request(temperature=0.0, min_tokens=50)
        done.logits_mask = compiler.matcher(yes)
        for token in tok.encode('"yes"'):
            done.logits_mask.accept(token)
        sides.append([*reqs, done, make_request(temperature=1.0, seed=34)])  # one free row
    cpu_side, dev_side = sides
    bias_seen: set[str] = set()
    for step in range(BUDGET):
        live = [i for i, r in enumerate(cpu_side)
                if not (r.output_token_ids and r.output_token_ids[-1] in eos)]
        if live == [len(cpu_side) - 1]:
            break
        logits = random_logits(len(live), vocab=vocab, seed=500 + step)
        allowed = {i: cpu_side[i].logits_mask.allowed() for i in live
                   if cpu_side[i].logits_mask is not None}
        out_cpu, out_dev = on_both(sampler, logits, [cpu_side[i] for i in live],
                                   [dev_side[i] for i in live], seen)
        assert_same(out_cpu, out_dev)
        assert not out_dev.failed
        assert_all_on_device(seen, ("_select", "_set_aside"))
        bias_seen |= seen.get("_device_bias", set())
        for j, i in enumerate(live):
            token = out_dev.token_ids[j]
            if i in allowed:
                assert allowed[i].device.type == "cpu"
                assert bool(allowed[i][token]), f"row {i} took token {token}, not allowed"
            for req in (cpu_side[i], dev_side[i]):
                req.append_token(token)
                if req.logits_mask is not None:
                    req.logits_mask.accept(token)
    assert bias_seen == {DEVICE}  # the bitmask was expanded on the device
    for side in sides:
        assert side[len(GRAMMAR_ROWS)].output_token_ids[0] in eos  # the grammar won
    for req in dev_side[:len(GRAMMAR_ROWS)]:
        out = req.output_token_ids
        assert out[-1] in eos and len(out) <= BUDGET  # closed within the budget
        value = json.loads(tok.decode(out[:-1]))
        assert set(value) == {"name", "age", "tags"}
    assert [r.output_token_ids for r in dev_side] == [r.output_token_ids for r in cpu_side]


class Ban:
    """A stand-in budget: never forces a token, keeps ``ids`` out (as near the end of a tools
    output in auto mode)."""

    left, check_at, forced = 10, 0, False

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def ban(self) -> torch.Tensor:
        return self.ids


def test_the_grammar_mask_of_a_cuda_row_equals_the_cpu_row(tok, compiler, seen):
    vocab = tok.vocab_size
    spec = schema_spec(SCHEMA)
    prefix = tok.encode('{"name": "Al')

    def masks(case: str):
        out = []
        for _ in range(2):
            m = compiler.matcher(spec)
            for token in prefix:
                m.accept(token)
            allowed = m.allowed().nonzero().flatten()
            assert len(allowed) > 4
            if case == "ban some":
                m._budget = Ban(allowed[: len(allowed) // 2])
            elif case == "ban all":
                m._budget = Ban(allowed)
            elif case == "error":
                # A token the grammar does not allow now: the matcher errs.
                m.accept(next(t for t in range(1000, vocab) if not m._allows(t)))
            out.append(m)
        return out

    for case in ("plain", "ban some", "ban all", "error", "all banned by another stage"):
        m_cpu, m_dev = masks(case)
        row = random_logits(1, vocab=vocab, seed=7)[0]
        if case == "all banned by another stage":
            row.fill_(float("-inf"))  # e.g. logit_bias -100 everywhere the grammar allows
        row_cpu, row_dev = row.clone(), row.clone().to(DEVICE)
        m_cpu.apply(row_cpu)
        seen.clear()
        m_dev.apply(row_dev)
        assert row_dev.device.type == DEVICE
        assert torch.equal(row_dev.cpu(), row_cpu), case
        assert_all_on_device(seen)
        assert bool(torch.isfinite(row_cpu).any()), case
        if case in ("plain", "all banned by another stage"):
            assert seen.get("_device_bias") == {DEVICE}, case  # the bitmask went, not the bias
        if case.startswith("ban"):
            assert m_dev._budget.forced == m_cpu._budget.forced == (case == "ban some")
