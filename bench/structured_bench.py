"""Structured-output benchmark: decode tokens/s with a JSON-schema mask against without;
with ``--complete``, whether sampled constrained replies are complete within max_tokens.

    python bench/structured_bench.py --out bench/results/structured.json [--rounds 8]
        [--chunk 8] [--batches 1,16] [--threads N]
    python bench/structured_bench.py --complete [--model smollm2|tiny] [--requests 240]
        [--out bench/results/structured_complete.json] [--threads N]

``--complete`` (docs/structured-output.md, "Closing within max_tokens"): sampled requests
(temperature 1, seeded) over the test schemas (tests/support/schemas.py) plus schemas with
patterns, formats, ``minItems`` and ``anyOf``, and over tool sets in required, named,
parallel and auto modes, with ``max_tokens`` drawn per budget band from the grammar's minimum
(tight: +0-4, short: +5-20, medium: +21-60, generous: +61-150). Every reply must parse and
validate against its schema (tool calls: every ``<tool_call>`` closed, its arguments valid);
reported per band with the forced-close rate. The replies that ended on their own are then
generated again, in one batch with budget-aware closing and in the same batch without it: those
the rule left alone must be the same, byte for byte (against the first, larger batch a reply
may differ where the forward pass rounds differently with the batch's size, and so run into
its budget: reported apart).

One process, SmolLM2-135M (float32, the synchronous ``Engine``), greedy. For each batch size B,
three configurations on the same prompts, each with its own engine and live batch; they take
turns of ``chunk`` decode steps, ``rounds`` times (the order rotating), so that the machine's
changing load hits them alike:

- ``plain``: no grammar, ``ignore_eos`` (the text never ends early);
- ``masked``: a JSON schema (an array of at least 100 small objects: strings, bounded
  integers and enums, so it cannot end inside the measured steps) with the mask filled on the
  helper thread beside the forward pass (the default);
- ``masked_no_overlap``: the same, with the mask filled on the engine thread when sampling.

Decode tokens/s of a turn = B * chunk / its wall time (prefill is done before the first turn,
and one warm-up turn is not counted). The result is the median over rounds, and the ratio
masked / plain; the target is a mask cost of at most 10 % at batch 16 (ratio >= 0.90). On a
shared machine wall time swings with other processes' load, so the same ratio is also given
per CPU second of this process (all its threads, the mask helper included), and the masks of
one step are timed alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from core.config import EngineConfig  # noqa: E402
from core.errors import InvalidRequest  # noqa: E402
from core.protocol import TOOL_CALL_CLOSE, TOOL_CALL_OPEN  # noqa: E402
from core.pb.electron.v1 import worker_pb2 as pb  # noqa: E402
from core.tokenizer import Tokenizer  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.engine.model_runner import ModelRunner  # noqa: E402
from workers.engine.sampling_params import SamplingParams  # noqa: E402

SCHEMA = {"type": "array", "minItems": 100, "items": {
    "type": "object", "additionalProperties": False,
    "required": ["name", "qty", "kind"],
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "qty": {"type": "integer", "minimum": 0, "maximum": 100},
                   "kind": {"enum": ["fruit", "vegetable", "grain"]}}}}
GRAMMAR = pb.GrammarSpec(json_schema=pb.GrammarSpec.JsonSchema(schema_json=json.dumps(SCHEMA),
                                                               strict=True))
CONFIGS = ("plain", "masked", "masked_no_overlap")
# Masked turns: a budget far above the schema's shortest document (100 items, ~1,500 tokens),
# so budget-aware closing stays out of the way, as it does for any request far from its end.
MASKED_MAX_TOKENS = 1900


def make_engine(runner: ModelRunner, tokenizer: Tokenizer, config: str, batch: int) -> Engine:
    settings = runner.config.model_copy(update={
        "max_num_seqs": batch, "max_num_batched_tokens": 4096, "enable_prefix_caching": False,
        "grammar_overlap": config != "masked_no_overlap"})
    return Engine(runner, tokenizer, settings, model_name="bench")


def prompts(tokenizer: Tokenizer, batch: int) -> list[list[int]]:
    return [tokenizer.encode_chat([{"role": "user", "content":
            f"List groceries as JSON (list {i}): name, quantity and kind of each."}])
            for i in range(batch)]


def start(engine: Engine, ids: list[list[int]], config: str, max_tokens: int) -> list:
    """Adds the batch and steps until every request has its first token (prefill done)."""
    if config == "plain":
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)
    else:
        params = SamplingParams(temperature=0, max_tokens=MASKED_MAX_TOKENS, grammar=GRAMMAR)
    requests = [r for i, p in enumerate(ids)
                for r in engine.make_requests(f"{config}-{i}", p, params)]
    engine.add(requests)
    while any(r.num_output_tokens == 0 for r in requests):
        engine.step()
    return requests


def timed_steps(engine: Engine, config: str, steps: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process, all its threads) of ``steps`` steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        if any(o.finished for o in engine.step()):
            raise RuntimeError(f"{config}: a request finished inside the measured steps")
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.inference_mode()
def measure(runners: dict[str, ModelRunner], tokenizer: Tokenizer, batch: int, rounds: int,
            chunk: int) -> tuple[dict[str, list[float]], dict[str, list[float]], float]:
    """Per round, ``chunk`` decode steps of each configuration (order rotating), on live
    batches: tokens per wall second and per CPU second, per round and configuration; and the
    masks' own time per step."""
    engines = {c: make_engine(runners[c], tokenizer, c, batch) for c in CONFIGS}
    ids = prompts(tokenizer, batch)
    live = {c: start(engines[c], ids, c, (rounds + 1) * chunk + 8) for c in CONFIGS}
    for c in CONFIGS:  # warm-up round, not counted
        timed_steps(engines[c], c, chunk)
    rates: dict[str, list[float]] = {c: [] for c in CONFIGS}
    cpu_rates: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for r in range(rounds):
        order = CONFIGS[r % 3:] + CONFIGS[:r % 3]
        for c in order:
            wall, cpu = timed_steps(engines[c], c, chunk)
            rates[c].append(batch * chunk / wall)
            cpu_rates[c].append(batch * chunk / cpu)
    mask_ms = mask_ms_per_step(live["masked_no_overlap"], runners["plain"].model_config.vocab_size)
    for c, engine in engines.items():
        engine.abort([req.request_id for req in live[c]])
        if engine._grammars is not None:
            engine._grammars.close()
    return rates, cpu_rates, mask_ms


def mask_ms_per_step(requests: list, vocab: int, repeats: int = 50) -> float:
    """CPU time of one step's masks for these live requests (fill + apply on the engine
    thread), timed alone: a cost the machine's load blurs far less than whole steps."""
    rows = torch.zeros(len(requests), vocab)
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        for i, req in enumerate(requests):
            req.logits_mask.apply(rows[i])
        best = min(best, time.perf_counter() - begin)
    return best * 1e3


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


EXTRA_SCHEMAS: list[tuple[str, dict]] = [
    ("pattern_code", {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "note": {"type": "string"}}, "required": ["code", "note"]}),
    ("formats", {"type": "object", "properties": {
        "day": {"type": "string", "format": "date"}, "mail": {"type": "string", "format": "email"},
        "id": {"type": "string", "format": "uuid"}}, "required": ["day", "mail", "id"]}),
    ("min_items_enum", {"type": "object", "properties": {
        "colors": {"type": "array", "minItems": 3, "items": {"enum": ["red", "green", "blue"]}},
        "score": {"type": "number", "exclusiveMinimum": 0.5, "maximum": 0.75}},
        "required": ["colors", "score"]}),
    ("deep_nested", {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "object", "properties": {"c": {"type": "array", "minItems": 1, "items": {
            "type": "object", "properties": {"d": {"type": "string", "minLength": 3}},
            "required": ["d"]}}}, "required": ["c"]}}, "required": ["b"]},
        "extra": {"type": "string"}}, "required": ["a"]}),
    ("any_of_objects", {"type": "object", "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"r": {"type": "number", "minimum": 1}},
         "required": ["r"]},
        {"type": "object", "properties": {"w": {"type": "integer", "minimum": 100},
                                          "h": {"type": "integer", "minimum": 100}},
         "required": ["w", "h"]}]}}, "required": ["shape"]}),
    ("free_strings", {"type": "object", "properties": {"essay": {"type": "string"},
                                                       "words": {"type": "array",
                                                                 "items": {"type": "string"}}},
                      "required": ["essay", "words"]}),
    ("refs", {"$defs": {"item": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[a-z]{2}[0-9]{2}$"},
        "qty": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["sku", "qty"]}},
        "type": "object", "properties": {"items": {"type": "array", "minItems": 2,
                                                   "items": {"$ref": "#/$defs/item"}}},
        "required": ["items"]}),
    ("top_level_array", {"type": "array", "minItems": 2, "items": {"type": "string",
                                                                   "minLength": 2}}),
]
BANDS = (("tight", 0, 4), ("short", 5, 20), ("medium", 21, 60), ("generous", 61, 150))


def complete_cases() -> list[tuple[str, pb.GrammarSpec, Any]]:
    """(name, spec, what validates it): a JSON schema, or the tool list (name -> parameters)
    with the mode."""
    from tests.support.schemas import SCHEMAS, TOOLS, json_object_spec, schema_spec, tool_spec

    cases: list[tuple[str, pb.GrammarSpec, Any]] = []
    for name, _, schema in SCHEMAS[::2]:  # the 21 base schemas
        cases.append((name, schema_spec(schema), schema))
    for name, schema in EXTRA_SCHEMAS:
        cases.append((name, schema_spec(schema), schema))
    cases.append(("json_object", json_object_spec(), {"type": "object"}))
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    cases += [
        ("tools_required", tool_spec("required"), ("required", params)),
        ("tools_named", tool_spec("named", name="book_table"), ("named", params)),
        ("tools_parallel", tool_spec("required", parallel=True), ("required", params)),
        ("tools_filler", tool_spec("required", filler=True), ("required", params)),
        ("tools_auto", tool_spec("auto"), ("auto", params)),
    ]
    return cases


def check_reply(text: str, expect: Any) -> tuple[bool, int, str]:
    """(valid, cut tool calls, why not valid)."""
    import jsonschema

    if isinstance(expect, dict):
        try:
            jsonschema.validate(json.loads(text), expect)
        except (ValueError, jsonschema.ValidationError) as exc:
            return False, 0, str(exc)[:200]
        return True, 0, ""
    mode, params = expect
    opened = text.count(TOOL_CALL_OPEN)
    bodies = re.findall(re.escape(TOOL_CALL_OPEN) + "(.*?)" + re.escape(TOOL_CALL_CLOSE),
                        text, re.S)
    cut = opened - len(bodies)
    if cut:
        return False, cut, "a tool call is cut"
    if mode != "auto" and not bodies:
        return False, 0, "no tool call"
    for body in bodies:
        try:
            call = json.loads(body)
            jsonschema.validate(call["arguments"], params[call["name"]])
        except (ValueError, KeyError, TypeError, jsonschema.ValidationError) as exc:
            return False, 0, f"bad call: {str(exc)[:200]}"
    return True, 0, ""


def run_batch(engine: Engine, jobs: list[dict]) -> dict[str, dict]:
    """Runs every job (request id -> prompt, params) to its end; text and final output."""
    for job in jobs:
        engine.add(engine.make_requests(job["id"], job["prompt"], job["params"]))
    texts: dict[str, list[str]] = {}
    finals: dict[str, Any] = {}
    with torch.inference_mode():
        while engine.has_unfinished:
            for out in engine.step():
                texts.setdefault(out.request_id, []).append(out.text)
                if out.finished:
                    finals[out.request_id] = out
    return {rid: {"text": "".join(texts.get(rid, [])), "final": out}
            for rid, out in finals.items()}


def complete_main(args: argparse.Namespace) -> None:
    import random
    import tempfile

    rng = random.Random(args.seed)
    if args.model == "tiny":
        from tests.support.tiny_model import make_tiny_llama_dir

        model = str(make_tiny_llama_dir(Path(tempfile.mkdtemp()) / "tiny"))
        model_name = "tiny random-weight Llama (tests/support/tiny_model.py), float32"
    else:
        model = None
        model_name = "smollm2-135m-instruct, float32"
    config = EngineConfig(dtype="float32", kv_cache_bytes=256 * 2**20, max_model_len=1024,
                          max_num_seqs=args.batch, max_num_batched_tokens=2048,
                          **({"model": model} if model else {}))
    runner = ModelRunner(config)
    tokenizer = Tokenizer.from_model_path(runner.model_path)
    engine = Engine(runner, tokenizer, config, model_name="bench")
    cases = complete_cases()
    jobs: list[dict] = []
    for i in range(args.requests):
        name, spec, expect = cases[i % len(cases)]
        band, lo, hi = BANDS[(i // len(cases)) % len(BANDS)]
        minimum = engine.grammars.minimum_tokens(spec) or 1
        max_tokens = minimum + rng.randint(lo, hi)
        prompt = tokenizer.encode_chat([{"role": "user", "content":
                                         f"Reply with JSON ({name}, request {i})."}])
        jobs.append({"id": f"c{i}", "case": name, "band": band, "minimum": minimum,
                     "max_tokens": max_tokens, "expect": expect, "prompt": prompt,
                     "params": SamplingParams(temperature=1.0, seed=1000 + i,
                                              max_tokens=max_tokens, grammar=spec)})
    # A budget below the minimum is refused (400 naming max_tokens).
    refused = 0
    for name, spec, _ in cases:
        minimum = engine.grammars.minimum_tokens(spec) or 0
        if minimum > 1:
            try:
                engine.make_requests("refuse", [1, 2, 3], SamplingParams(
                    max_tokens=minimum - 1, grammar=spec))
            except InvalidRequest as exc:
                refused += exc.param == "max_tokens"
    begin = time.perf_counter()
    results = run_batch(engine, jobs)
    elapsed = time.perf_counter() - begin
    bands: dict[str, dict] = {b: {"requests": 0, "valid": 0, "forced_close": 0, "cut_calls": 0,
                                  "finish": {}, "output_tokens": 0}
                              for b, _, _ in BANDS}
    failures = []
    for job in jobs:
        res = results[job["id"]]
        final, text = res["final"], res["text"]
        ok, cut, why = check_reply(text, job["expect"])
        ok = ok and final.finish_reason.value == "stop"
        row = bands[job["band"]]
        row["requests"] += 1
        row["valid"] += ok
        row["forced_close"] += final.forced_close
        row["cut_calls"] += cut
        row["output_tokens"] += final.usage.completion_tokens
        reason = final.finish_reason.value
        row["finish"][reason] = row["finish"].get(reason, 0) + 1
        job["forced"] = final.forced_close
        job["text"] = text
        if not ok:
            failures.append({"id": job["id"], "case": job["case"], "max_tokens": job["max_tokens"],
                             "finish": reason, "why": why or "finish " + reason,
                             "text": text[-300:]})
    for row in bands.values():
        n = row["requests"] or 1
        row["valid_rate"] = round(row["valid"] / n, 4)
        row["forced_close_rate"] = round(row["forced_close"] / n, 4)
    # Replies that ended on their own, generated again in one batch with the rule and in the
    # same batch without it (a different batch may round the forward pass differently, so
    # the comparison holds the batch fixed).
    natural = [j for j in jobs if not j["forced"]]
    with_rule = run_batch(engine, [{**j, "id": "on-" + j["id"]} for j in natural])
    real_matcher = engine.grammars.matcher
    engine.grammars.matcher = lambda spec, max_tokens=None: real_matcher(spec, None)
    without = run_batch(engine, [{**j, "id": "off-" + j["id"]} for j in natural])
    engine.grammars.matcher = real_matcher
    # The smaller batch may round differently and send a reply into its budget: only the
    # replies the rule left alone in this batch are compared.
    untouched = [j for j in natural if not with_rule["on-" + j["id"]]["final"].forced_close]
    same = sum(with_rule["on-" + j["id"]]["text"] == without["off-" + j["id"]]["text"]
               for j in untouched)
    same_as_first = sum(without["off-" + j["id"]]["text"] == j["text"] for j in natural)
    differ = [{"id": j["id"], "case": j["case"], "max_tokens": j["max_tokens"],
               "with_rule": with_rule["on-" + j["id"]]["text"][-200:],
               "without": without["off-" + j["id"]]["text"][-200:],
               "forced_with_rule": with_rule["on-" + j["id"]]["final"].forced_close}
              for j in untouched
              if with_rule["on-" + j["id"]]["text"] != without["off-" + j["id"]]["text"]]
    total = sum(r["requests"] for r in bands.values())
    out = {
        "command": "python " + shlex.join(sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "model": model_name, "temperature": 1.0,
        "schemas": sum(1 for c in cases if isinstance(c[2], dict)),
        "tool_sets": sum(1 for c in cases if not isinstance(c[2], dict)),
        "requests": total, "seconds": round(elapsed, 1),
        "bands": {b: {"extra_tokens_over_minimum": [lo, hi], **bands[b]} for b, lo, hi in BANDS},
        "valid_rate": round(sum(r["valid"] for r in bands.values()) / total, 4),
        "cut_tool_calls": sum(r["cut_calls"] for r in bands.values()),
        "forced_close_rate": round(sum(r["forced_close"] for r in bands.values()) / total, 4),
        "below_minimum_refused": f"{refused} of {sum(1 for c in cases if (engine.grammars.minimum_tokens(c[1]) or 0) > 1)}",
        "unforced_replies_same_without_closing": f"{same} of {len(untouched)}",
        "unforced_replies_forced_in_the_rerun_batch": len(natural) - len(untouched),
        "unforced_replies_same_as_in_the_first_batch": f"{same_as_first} of {len(natural)}",
        "failures": failures[:20],
        "unforced_replies_that_differ": differ[:10],
        "target": {"valid_rate": 1.0, "cut_tool_calls": 0,
                   "met": not failures and same == len(untouched)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "failures"}, indent=1))
    print(f"failures: {len(failures)}; wrote {args.out}")
    if engine._grammars is not None:
        engine._grammars.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--complete", action="store_true",
                    help="replies complete within max_tokens (see the module docstring)")
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--batch", type=int, default=48, help="--complete: sequences per step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=8, help="decode steps per turn")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.complete:
        args.out = args.out or ROOT / ("bench/results/structured_complete"
                                       f"{'_tiny' if args.model == 'tiny' else ''}.json")
        complete_main(args)
        return
    args.out = args.out or ROOT / "bench/results/structured.json"
    load_before = os.getloadavg()
    # One runner (weights and KV cache) per configuration: their batches stay live side by
    # side, so the configurations can take turns every few steps.
    runners = {c: ModelRunner(EngineConfig(dtype="float32", kv_cache_bytes=160 * 2**20,
                                           max_model_len=2048)) for c in CONFIGS}
    tokenizer = Tokenizer.from_model_path(runners["plain"].model_path)
    results: dict[str, dict] = {}
    for batch in (int(b) for b in args.batches.split(",")):
        rates, cpu_rates, mask_ms = measure(runners, tokenizer, batch, args.rounds, args.chunk)
        med = {c: statistics.median(v) for c, v in rates.items()}
        results[f"batch_{batch}"] = {
            "decode_tokens_per_s": {c: round(v, 1) for c, v in med.items()},
            "rounds_tokens_per_s": {c: [round(x, 1) for x in v] for c, v in rates.items()},
            "masked_over_plain": round(med["masked"] / med["plain"], 3),
            "masked_no_overlap_over_plain": round(med["masked_no_overlap"] / med["plain"], 3),
            "overlap_gain": round(med["masked"] / med["masked_no_overlap"], 3),
            # Each round's masked turn against the plain turn next to it in time.
            "masked_over_plain_round_median": round(statistics.median(
                m / p for m, p in zip(rates["masked"], rates["plain"])), 3),
            # Tokens per CPU second of this process (all threads, the mask helper included):
            # what other processes' load on a shared machine blurs least.
            "decode_tokens_per_cpu_s": {c: round(statistics.median(v), 1)
                                        for c, v in cpu_rates.items()},
            "masked_over_plain_cpu": round(statistics.median(cpu_rates["masked"])
                                           / statistics.median(cpu_rates["plain"]), 3),
            "masked_no_overlap_over_plain_cpu": round(
                statistics.median(cpu_rates["masked_no_overlap"])
                / statistics.median(cpu_rates["plain"]), 3),
            # The masks of one step timed alone (best of 50), against a plain step's time.
            "mask_ms_per_step": round(mask_ms, 3),
            "plain_step_ms": round(1e3 * batch / med["plain"], 1),
            "mask_share_of_plain_step": round(mask_ms * med["plain"] / (1e3 * batch), 4),
        }
        print(f"batch {batch}: {json.dumps(results[f'batch_{batch}'])}", flush=True)
    b16 = results.get("batch_16")
    out = {
        "command": "python " + shlex.join(sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "model": "smollm2-135m-instruct, float32, greedy",
        "grammar": {"library": "llguidance", "spec": {"type": "json_schema", "schema": SCHEMA,
                                                      "strict": True}},
        "rounds": args.rounds, "chunk_steps": args.chunk,
        "results": results,
        "target": {"masked_over_plain_at_batch_16_at_least": 0.90,
                   "met": None if b16 is None else b16["masked_over_plain"] >= 0.90},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
