"""The engine on CUDA: the Triton attention backend, decode CUDA graphs and the sampler on the
device, against transformers on the same device and against the engine's own eager path.

A tiny random Llama (tests/support/tiny_model.py) in float32 must give transformers' greedy
tokens and logprobs; bfloat16 stays within a tolerance of float32. Marked ``gpu`` (skipped
without CUDA). With ``TRITON_INTERPRET=1`` (and Triton installed) the same tests also run the
Triton backend on the CPU through Triton's interpreter, graphs aside.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.config import EngineConfig
from core.tokenizer import Tokenizer
from tests.support import triton_interpreter
from tests.support.schemas import schema_spec, tool_spec
from tests.support.tiny_model import make_tiny_llama_dir
from workers.engine.engine import Engine
from workers.engine.model_runner import ModelRunner
from workers.engine.outputs import FinishReason
from workers.engine.sampling_params import SamplingParams
from workers.models import triton_attention as ta

DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)]
if os.environ.get("TRITON_INTERPRET") == "1" and ta.available():
    DEVICES.append(pytest.param("cpu", id="cpu-interpreter"))
    triton_interpreter.patch()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-cuda"), max_position_embeddings=512)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    return request.param


def make_engine(model_dir: Path, device: str, **overrides) -> Engine:
    options = dict(model=str(model_dir), device=device, dtype="float32",
                   kv_cache_bytes=8 * 2**20, max_model_len=512, max_num_seqs=32,
                   max_num_batched_tokens=256, attention_backend="triton")
    options.update(overrides)
    config = EngineConfig(**options)
    runner = ModelRunner(config)
    assert runner.attention_backend == options["attention_backend"]
    return Engine(runner, Tokenizer.from_model_path(model_dir), config)


def prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(300, 40000, (length,), generator=gen).tolist()


@torch.inference_mode()  # as the worker's engine thread runs its steps
def run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]],
        abort_after: dict[str, int] | None = None) -> dict[tuple[str, int], dict]:
    """Runs the requests together to the end; per (request id, index): tokens, logprobs,
    finish reason and usage."""
    out: dict[tuple[str, int], dict] = {}
    for rid, (ids, params) in requests.items():
        engine.add(engine.make_requests(rid, ids, params))
    aborted: set[str] = set()
    while engine.has_unfinished:
        for o in engine.step():
            entry = out.setdefault((o.request_id, o.index),
                                   {"tokens": [], "logprobs": [], "top": [], "text": ""})
            entry["tokens"].extend(o.token_ids)
            entry["text"] += o.text
            entry["logprobs"].extend(lp.chosen.logprob for lp in o.logprobs)
            entry["top"].extend([t.logprob for t in lp.top] for lp in o.logprobs)
            if o.finish_reason is not None:
                entry["finish"], entry["usage"], entry["error"] = (o.finish_reason, o.usage,
                                                                   o.error)
        for rid, after in (abort_after or {}).items():
            done = len(out.get((rid, 0), {}).get("tokens", []))
            if rid not in aborted and done >= after:
                aborted.add(rid)
                for o in engine.abort([rid]):
                    out[(o.request_id, o.index)]["finish"] = o.finish_reason
    assert not any(e.get("error") for e in out.values()), [e.get("error") for e in out.values()]
    return out


def assert_no_leaks(engine: Engine) -> None:
    assert not engine.has_unfinished
    assert engine.kv.num_used_blocks == 0
    engine.scheduler.check_integrity()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_greedy_tokens_and_logprobs_equal_transformers(model_dir, device):
    import transformers

    engine = make_engine(model_dir, device)
    prompts = {f"p{i}": prompt(n, i) for i, n in enumerate((5, 40, 77, 16))}
    ours = run(engine, {rid: (ids, greedy(12, logprobs=True)) for rid, ids in prompts.items()})
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    for rid, ids in prompts.items():
        got = hf.generate(torch.tensor([ids], device=device), max_new_tokens=12, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        tokens = got.sequences[0, len(ids):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item()
                    for step, t in zip(got.logits, tokens)]
        assert ours[(rid, 0)]["tokens"] == tokens, rid
        assert ours[(rid, 0)]["logprobs"] == pytest.approx(logprobs, abs=1e-4), rid
    assert_no_leaks(engine)


def test_a_cached_prefix_gives_the_logits_of_the_uncached_prompt(model_dir, device):
    engine = make_engine(model_dir, device)
    ids = prompt(70, 3)
    params = greedy(6, logprobs=True, top_logprobs=5)
    first = run(engine, {"a": (ids, params)})[("a", 0)]
    second = run(engine, {"b": (ids, params)})[("b", 0)]
    assert first["usage"].cached_tokens == 0
    assert second["usage"].cached_tokens == 64  # all but the last block's worth
    assert second["tokens"] == first["tokens"]
    for a, b in zip(first["top"], second["top"]):
        assert a == pytest.approx(b, abs=1e-5)
    assert_no_leaks(engine)


@pytest.mark.gpu
def test_bfloat16_cached_prefix_within_tolerance_of_the_gathering_path(model_dir):
    """bfloat16 rounds differently per kernel: the Triton path over a cached prefix stays
    within a tolerance of the torch path (which gathers the context) on the same device."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    ids = prompt(70, 3)
    params = greedy(6, logprobs=True, top_logprobs=5)
    tops = {}
    for backend in ("triton", "torch"):
        engine = make_engine(model_dir, "cuda", dtype="bfloat16", attention_backend=backend,
                             cuda_graphs=False)
        run(engine, {"c": (ids, params)})
        cached = run(engine, {"d": (ids, params)})[("d", 0)]
        assert cached["usage"].cached_tokens == 64
        tops[backend] = cached["top"][0]
        assert_no_leaks(engine)
    assert tops["triton"] == pytest.approx(tops["torch"], abs=0.05)


SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, min_p=0.02, seed=7,
                         presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                         logit_bias={1000: 5.0, 2000: -100.0}, max_tokens=16, min_tokens=4,
                         logprobs=True, top_logprobs=3)


def test_seeded_sampling_gives_the_same_tokens_whatever_the_batch(model_dir, device):
    engine = make_engine(model_dir, device)
    ids = prompt(33, 5)
    alone = run(engine, {"s": (ids, SAMPLED)})[("s", 0)]
    others = {f"o{i}": (prompt(10 + 7 * i, 100 + i),
                        SamplingParams(temperature=0.7 + 0.1 * i, top_p=0.8, max_tokens=20,
                                       logprobs=i % 2 == 0))
              for i in range(5)}
    others["g"] = (prompt(50, 9), greedy(20))
    crowded = run(engine, {**others, "s": (ids, SAMPLED)})[("s", 0)]
    assert alone["tokens"] == crowded["tokens"]
    assert len(alone["tokens"]) == 16 and 2000 not in alone["tokens"]
    assert alone["logprobs"] == pytest.approx(crowded["logprobs"], abs=1e-4)
    # A different seed draws differently (the stream key is used).
    other = run(engine, {"t": (ids, replace(SAMPLED, seed=8))})
    assert other[("t", 0)]["tokens"] != alone["tokens"]
    assert_no_leaks(engine)


def test_n_sequences_aborts_and_preemption_leave_nothing_behind(model_dir, device):
    roomy = make_engine(model_dir, device)
    # 12 blocks of 16 tokens: the requests below need ~20 at once, so some are preempted.
    tight = make_engine(model_dir, device, kv_cache_bytes=12 * 2 * 2 * 16 * 2 * 16 * 4,
                        max_model_len=128)
    assert tight.runner.num_blocks == 12
    requests = {f"q{i}": (prompt(30, 20 + i), greedy(20)) for i in range(4)}
    requests["n"] = (prompt(20, 40), greedy(8, n=3))
    want = run(roomy, requests)
    got = run(tight, requests)
    assert tight.stats.preemptions > 0
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in want.items()}
    assert got[("n", 1)]["usage"].cached_tokens == 16  # siblings share the prompt's blocks
    cut = run(roomy, {"x": (prompt(40, 50), greedy(20)), "y": (prompt(30, 51), greedy(20))},
              abort_after={"x": 5})
    assert cut[("x", 0)]["finish"] is FinishReason.ABORT
    assert len(cut[("y", 0)]["tokens"]) == 20
    assert_no_leaks(roomy)
    assert_no_leaks(tight)


def test_json_schema_and_tool_calls_are_enforced_on_the_device(model_dir, device):
    engine = make_engine(model_dir, device)
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    requests = {
        "json": (prompt(20, 60), SamplingParams(temperature=1.0, seed=1, max_tokens=40,
                                                grammar=schema_spec(schema))),
        "tool": (prompt(25, 61), SamplingParams(temperature=1.0, seed=2, max_tokens=60,
                                                grammar=tool_spec("required"))),
        "plain": (prompt(30, 62), SamplingParams(temperature=1.0, seed=3, max_tokens=20)),
    }
    out = run(engine, requests)
    document = json.loads(out[("json", 0)]["text"])
    assert set(document) == {"name", "age"} and isinstance(document["age"], int)
    call = out[("tool", 0)]["text"]
    assert call.startswith("<tool_call>") and call.rstrip().endswith("</tool_call>")
    body = json.loads(call.strip()[len("<tool_call>"):-len("</tool_call>")])
    assert body["name"] in {"get_weather", "get_time"}
    assert_no_leaks(engine)


@pytest.fixture(scope="module")
def graph_engines(model_dir):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    graphs = make_engine(model_dir, "cuda", dtype="bfloat16")
    eager = make_engine(model_dir, "cuda", dtype="bfloat16", cuda_graphs=False)
    assert graphs.runner.graphs is not None and eager.runner.graphs is None
    assert graphs.runner.graph_capture_s is not None
    return graphs, eager


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3, 9, 32])
def test_graph_replays_and_eager_steps_give_identical_greedy_texts(graph_engines, batch):
    graphs, eager = graph_engines
    requests = {f"g{i}": (prompt(8 + 5 * i, 200 + i), greedy(24)) for i in range(batch)}
    with_graphs, without = run(graphs, requests), run(eager, requests)
    assert {k: v["tokens"] for k, v in with_graphs.items()} == {
        k: v["tokens"] for k, v in without.items()}
    assert_no_leaks(graphs)
    assert_no_leaks(eager)
