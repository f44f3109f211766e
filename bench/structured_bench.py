"""Structured-output benchmark: decode tokens/s with a JSON-schema mask against without.

    python bench/structured_bench.py --out bench/results/structured.json [--steps 64]
        [--repeats 3] [--batches 1,16] [--threads N]

One process, one SmolLM2-135M engine (float32, the synchronous ``Engine``), greedy. For each
batch size B, three configurations on the same prompts, interleaved repeat by repeat so that
machine noise hits them alike:

- ``plain``: no grammar, ``ignore_eos`` (the text never ends early);
- ``masked``: a JSON schema (an array of at least 100 small objects: strings, bounded
  integers and enums, so it cannot end inside the measured steps) with the mask filled on the
  helper thread beside the forward pass (the default);
- ``masked_no_overlap``: the same, with the mask filled on the engine thread when sampling.

Decode tokens/s = B * steps / the wall time of ``steps`` engine steps taken once every request
has its first token (prefill excluded). The result is the median over repeats, and the ratio
masked / plain; the target is a mask cost of at most 10 % at batch 16 (ratio >= 0.90).
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

from cluster.config import EngineConfig  # noqa: E402
from cluster.tokenizer import Tokenizer  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.engine.model_runner import ModelRunner  # noqa: E402
from workers.engine.sampling_params import SamplingParams  # noqa: E402

SCHEMA = {"type": "array", "minItems": 100, "items": {
    "type": "object", "additionalProperties": False,
    "required": ["name", "qty", "kind"],
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "qty": {"type": "integer", "minimum": 0, "maximum": 100},
                   "kind": {"enum": ["fruit", "vegetable", "grain"]}}}}
GRAMMAR = json.dumps({"type": "json_schema", "schema": SCHEMA, "strict": True})
CONFIGS = ("plain", "masked", "masked_no_overlap")


def make_engine(runner: ModelRunner, tokenizer: Tokenizer, overlap: bool, batch: int) -> Engine:
    return Engine(runner, tokenizer, max_num_seqs=max(batch, 1),
                  max_num_batched_tokens=4096, enable_prefix_caching=False,
                  model_name="bench", grammar_overlap=overlap)


def prompts(tokenizer: Tokenizer, batch: int, run: int) -> list[list[int]]:
    return [tokenizer.encode_chat([{"role": "user", "content":
            f"List groceries as JSON (list {run}-{i}): name, quantity and kind of each."}])
            for i in range(batch)]


def decode_rate(engine: Engine, ids: list[list[int]], config: str, steps: int) -> float:
    """Decode tokens/s over ``steps`` steps once every request has its first token."""
    if config == "plain":
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=steps + 8)
    else:
        params = SamplingParams(temperature=0, max_tokens=steps + 8, grammar=GRAMMAR)
    requests = [r for i, p in enumerate(ids)
                for r in engine.make_requests(f"{config}-{i}-{time.monotonic_ns()}", p, params)]
    engine.add(requests)
    with torch.inference_mode():
        while any(r.num_output_tokens == 0 for r in requests):
            engine.step()
        start = time.perf_counter()
        for _ in range(steps):
            outs = engine.step()
            if any(o.finished for o in outs):
                raise RuntimeError(f"{config}: a request finished inside the measured steps")
        elapsed = time.perf_counter() - start
        engine.abort([r.request_id for r in requests])
    return len(requests) * steps / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/structured.json")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    runner = ModelRunner(EngineConfig(dtype="float32", kv_cache_bytes=256 * 2**20,
                                      max_model_len=2048))
    tokenizer = Tokenizer.from_model_path(runner.model_path)
    results: dict[str, dict] = {}
    for batch in (int(b) for b in args.batches.split(",")):
        engines = {"plain": make_engine(runner, tokenizer, True, batch),
                   "masked": make_engine(runner, tokenizer, True, batch),
                   "masked_no_overlap": make_engine(runner, tokenizer, False, batch)}
        rates: dict[str, list[float]] = {c: [] for c in CONFIGS}
        for config in CONFIGS:  # warm-up: compile the grammar, touch every code path
            decode_rate(engines[config], prompts(tokenizer, batch, -1), config, 4)
        for run in range(args.repeats):
            ids = prompts(tokenizer, batch, run)
            for config in CONFIGS:
                rates[config].append(decode_rate(engines[config], ids, config, args.steps))
        med = {c: statistics.median(v) for c, v in rates.items()}
        results[f"batch_{batch}"] = {
            "decode_tokens_per_s": {c: round(v, 1) for c, v in med.items()},
            "all_runs_tokens_per_s": {c: [round(x, 1) for x in v] for c, v in rates.items()},
            "masked_over_plain": round(med["masked"] / med["plain"], 3),
            "masked_no_overlap_over_plain": round(med["masked_no_overlap"] / med["plain"], 3),
            "overlap_gain": round(med["masked"] / med["masked_no_overlap"], 3),
        }
        print(f"batch {batch}: {json.dumps(results[f'batch_{batch}'])}", flush=True)
        for engine in engines.values():
            if engine._grammars is not None:
                engine._grammars.close()
    b16 = results.get("batch_16")
    out = {
        "command": "python " + shlex.join(sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "model": "smollm2-135m-instruct, float32, greedy",
        "grammar": {"library": "llguidance", "spec": json.loads(GRAMMAR)},
        "steps": args.steps, "repeats": args.repeats,
        "results": results,
        "target": {"masked_over_plain_at_batch_16_at_least": 0.90,
                   "met": None if b16 is None else b16["masked_over_plain"] >= 0.90},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
