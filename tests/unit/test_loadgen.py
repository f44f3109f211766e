"""The load generator's workloads, statistics and stream client (bench/loadgen.py), without a
network: the client runs against a small OpenAI-style streaming app over httpx's ASGI
transport."""

from __future__ import annotations

import json
import random
from collections import Counter

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench import loadgen
from bench.loadgen import Planned, Result
from core.hashing import block_hashes
from core.model_files import resolve_model_path
from core.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_model_path(resolve_model_path("smollm2-135m-instruct"))


# -- text and workloads ----------------------------------------------------------------------------

def test_words_are_a_fixed_run_per_key():
    assert loadgen.words("a", 40) == loadgen.words("a", 40)
    assert loadgen.words("a", 40) != loadgen.words("b", 40)
    assert loadgen.words("a", 40).startswith(loadgen.words("a", 10))
    assert set(loadgen.words("a", 200).split()) <= set(loadgen.WORDS)


def test_each_word_is_one_token_for_smollm2(tokenizer):
    assert len(set(loadgen.WORDS)) == len(loadgen.WORDS) >= 256
    text = loadgen.words("count", 300)
    assert len(tokenizer.encode(" " + text)) == 300


def test_poisson_arrivals_come_at_the_requested_rate():
    arrivals = loadgen.poisson_arrivals(4000, 5.0, random.Random(1))
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    assert arrivals[-1] / 4000 == pytest.approx(0.2, rel=0.06)
    assert loadgen.poisson_arrivals(3, 0.0, random.Random(1)) == [0.0, 0.0, 0.0]


def test_shared_prefix_uniform_gives_each_group_its_questions_under_one_system_prompt():
    plan = loadgen.shared_prefix(groups=3, system_tokens=50, questions=4, question_tokens=6,
                                 rate=2.0, max_tokens=8, seed=7)
    assert Counter(p.tag for p in plan) == {"group-0": 4, "group-1": 4, "group-2": 4}
    by_group: dict[str, set[str]] = {}
    for p in plan:
        by_group.setdefault(p.tag, set()).add(p.messages[0][1])
    assert all(len(s) == 1 for s in by_group.values())      # one system prompt per group
    assert len({next(iter(s)) for s in by_group.values()}) == 3  # and they differ
    assert len({p.messages[1][1] for p in plan}) == 12  # every question differs
    assert len(plan[0].messages[0][1].split()) == 50
    assert [p.at_s for p in plan] == sorted(p.at_s for p in plan)
    assert plan == loadgen.shared_prefix(groups=3, system_tokens=50, questions=4,
                                         question_tokens=6, rate=2.0, max_tokens=8, seed=7)


def test_shared_prefix_zipf_makes_the_first_groups_popular():
    plan = loadgen.shared_prefix(groups=8, system_tokens=4, questions=100, question_tokens=2,
                                 rate=0, max_tokens=1, popularity="zipf", zipf_s=1.0)
    counts = Counter(p.tag for p in plan)
    assert sum(counts.values()) == 800
    assert counts["group-0"] > 3 * counts["group-7"]


def test_multi_turn_each_turn_resends_the_conversation_so_far():
    plan = loadgen.multi_turn(conversations=3, turns=4, system_tokens=10, user_tokens=5,
                              reply_tokens=7, rate=1.0, think_s=2.0, max_tokens=8, seed=3)
    assert len(plan) == 12 and [p.at_s for p in plan] == sorted(p.at_s for p in plan)
    for c in range(3):
        turns = [p for p in plan if p.tag == f"conversation-{c}"]
        for earlier, later in zip(turns, turns[1:]):
            assert later.messages[:len(earlier.messages)] == earlier.messages
            assert [r for r, _ in later.messages[len(earlier.messages):]] == ["assistant",
                                                                               "user"]
            assert later.at_s > earlier.at_s


def test_unique_prompts_share_no_block_under_the_chat_template(tokenizer):
    plan = loadgen.unique(count=20, prompt_tokens=64, rate=1.0, max_tokens=4)
    seen: set[int] = set()
    for p in plan:
        ids = tokenizer.encode_chat([{"role": r, "content": c} for r, c in p.messages])
        hashes = block_hashes(ids, 16)
        assert len(hashes) >= 4 and not seen & set(hashes)
        seen.update(hashes)


def test_mooncake_equal_hash_ids_give_equal_leading_text(tmp_path):
    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 0, "input_length": 1200, "output_length": 300, "hash_ids": [1, 2, 3]},
            {"timestamp": 3000, "input_length": 1100, "output_length": 10,
             "hash_ids": [1, 2, 4]}]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = loadgen.mooncake(trace, block_words=8, speed=2.0, limit=None, output_scale=0.1,
                            max_tokens=16)
    a, b = (p.messages[0][1].split() for p in plan)
    assert a[:16] == b[:16] and a[16:] != b[16:]
    # The last block is partial: 176 of 512 tokens -> 3 of 8 words; 76 -> 1.
    assert len(a) == 16 + 3 and len(b) == 16 + 1
    assert [p.at_s for p in plan] == [0.0, 1.5]
    assert [p.max_tokens for p in plan] == [16, 1]


def test_azure_replays_arrivals_and_scaled_lengths(tmp_path):
    trace = tmp_path / "azure.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:15:46.6805900,374,44\n"
                     "2023-11-16 18:15:50.9951690,9000,109\n")
    plan = loadgen.azure(trace, speed=1.0, limit=None, length_scale=0.1, max_tokens=8,
                         max_prompt_tokens=200)
    assert plan[0].at_s == 0.0 and plan[1].at_s == pytest.approx(4.314579)
    assert len(plan[0].messages[1][1].split()) == 37 and len(plan[1].messages[1][1].split()) == 200
    assert [p.max_tokens for p in plan] == [4, 8]


def test_ideal_cached_ratio_counts_the_leading_blocks_seen_before():
    def encode(messages: list[dict]) -> list[int]:
        return [int(x) for x in messages[0]["content"].split()]

    first = " ".join(str(i) for i in range(40))                    # 2 full blocks of 16
    shares_one = " ".join(str(i) for i in [*range(16), *range(100, 124)])
    repeat = first                                                 # all cached but the last token
    plan = [Planned(t, (("user", text),), 1, "x") for t, text in
            ((0.0, first), (1.0, shares_one), (2.0, repeat))]
    # 0 + 16 + 32 (40 tokens: at most (40 - 1) // 16 = 2 blocks) of 120 prompt tokens.
    assert loadgen.ideal_cached_ratio(plan, encode, 16) == pytest.approx(48 / 120)


# -- statistics ------------------------------------------------------------------------------------

def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert loadgen.percentile(values, 50) == 50 and loadgen.percentile(values, 99) == 99
    assert loadgen.percentile(values, 100) == 100 and loadgen.percentile([], 50) is None


def test_summarise_reports_latencies_throughput_cache_and_errors():
    done = [Result("a", float(i), sent_s=float(i), first_token_s=i + 0.5, finished_s=i + 2.5,
                   gaps_s=[0.1, 0.3], prompt_tokens=100, cached_tokens=50,
                   completion_tokens=5) for i in range(4)]
    failed = Result("a", 4.0, sent_s=4.5, error="HTTP 500: boom")
    s = loadgen.summarise([*done, failed], wall_s=6.0)
    assert (s["completed"], s["errors"]) == (4, 1) and s["error_samples"] == ["HTTP 500: boom"]
    assert s["ttft_s_p50"] == 0.5 and s["e2e_s_p99"] == 2.5
    assert s["itl_s_p50"] == 0.1 and s["itl_s_p99"] == 0.3
    assert s["tpot_mean_s"] == pytest.approx(0.5)          # (2.5 - 0.5) / (5 - 1)
    assert s["duration_s"] == 5.5                           # first send to last end
    assert s["output_tokens_per_s"] == pytest.approx(20 / 5.5)
    assert s["cached_token_ratio"] == 0.5 and s["client_wait_s_p99"] == 0.5


def test_attribute_workers_reads_the_router_decisions():
    log = ("2026-01-01 INFO router.routing: request chatcmpl-0a1b -> worker default-1: "
           "kv_aware ttft=1ms\nnoise\n"
           "2026-01-01 INFO router.routing: request chatcmpl-ff -> worker default-2: rr\n")
    results = [Result("x", 0, completion_id="chatcmpl-0a1b"), Result("x", 0),
               Result("x", 0, completion_id="chatcmpl-ff")]
    assert loadgen.attribute_workers(results, log) == 2
    assert [r.worker for r in results] == ["default-1", None, "default-2"]


# -- the client against an OpenAI-style stream -----------------------------------------------------

def openai_like_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if body["messages"][-1]["content"] == "fail":
            return JSONResponse({"error": {"message": "no", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=400)
        assert body["stream"] and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True
        n = body["max_tokens"]

        def events():
            base = {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "usage": None}
            yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                             "content": ""}}]}
            for i in range(n):
                yield {**base, "choices": [{"index": 0, "delta": {"content": f"t{i}"},
                                            "finish_reason": None}]}
            yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
            yield {**base, "choices": [], "usage": {
                "prompt_tokens": 30, "completion_tokens": n, "total_tokens": 30 + n,
                "prompt_tokens_details": {"cached_tokens": 16}}}

        async def sse():
            for event in events():
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


async def test_run_streams_measures_and_reads_usage_and_errors():
    plan = [Planned(0.0, (("user", "hello"),), 4, "ok"),
            Planned(0.01, (("user", "fail"),), 4, "bad"),
            Planned(0.02, (("user", "again"),), 3, "ok")]
    transport = httpx.ASGITransport(app=openai_like_app())
    results, wall = await loadgen.run(plan, "http://test/v1", max_concurrency=2,
                                      ignore_eos=True, transport=transport)
    ok, bad, again = results
    assert bad.error is not None and bad.error.startswith("HTTP 400") and bad.finished_s is None
    assert (ok.prompt_tokens, ok.cached_tokens, ok.completion_tokens) == (30, 16, 4)
    assert ok.completion_id == "chatcmpl-abc" and len(ok.gaps_s) == 3
    assert again.completion_tokens == 3 and again.sent_s >= 0.02
    assert ok.ttft_s is not None and 0 <= ok.ttft_s <= ok.e2e_s <= wall
    summary = loadgen.summarise(results, wall)
    assert summary["completed"] == 2 and summary["cached_token_ratio"] == pytest.approx(16 / 30)
