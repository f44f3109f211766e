"""Structured-output benchmark: decode tokens/s with a JSON-schema mask against without.

    python bench/structured_bench.py --out bench/results/structured.json [--rounds 8]
        [--chunk 8] [--batches 1,16] [--threads N]

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
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from core.config import EngineConfig  # noqa: E402
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
        params = SamplingParams(temperature=0, max_tokens=max_tokens, grammar=GRAMMAR)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/structured.json")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=8, help="decode steps per turn")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
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
