"""What making outputs costs the engine thread, and what moving it to the event loop saves.

    python bench/output_side.py --out bench/results/output_side.json
        [--model random:llama3-tiny] [--device cpu] [--batch 64] [--steps 30]

An AsyncEngine's engine thread runs ``Engine.run_step`` and hands the raw outputs to the
event loop, which makes their text (detokenizer, stop strings, logprob texts:
workers/engine/output_processor.py) while the engine thread runs the next step. Before, the
engine thread made them inline, as the synchronous ``Engine.step`` still does: that is the
baseline, measured in the same run on the same steps. For a batch of decode steps (random-
weight model, SmolLM2's tokenizer for the text) it times, per step, ``run_step`` (the engine
thread's work now) and ``make_outputs`` (the work moved off it), for three kinds of request:
plain greedy, two stop strings, and two stop strings with 20 top logprobs. Reports the
engine thread's time per step before and after and their ratio. On a GPU, the moved work
overlaps the next step's kernels; on this CPU it competes with them for the GIL, so the
ratio here is the engine-thread share moved, not an end-to-end speed-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import build_engine, random_prompts  # noqa: E402

from core.config import EngineConfig  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.engine.output_processor import make_outputs  # noqa: E402
from workers.engine.sampling_params import SamplingParams  # noqa: E402

KINDS = {
    "greedy": {},
    "stop_strings": {"stop": ("\n\nUser:", "###")},
    "stop_strings_top20_logprobs": {"stop": ("\n\nUser:", "###"), "logprobs": True,
                                    "top_logprobs": 20},
}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def measure(engine: Engine, batch: int, steps: int, kind: str) -> dict[str, float]:
    for i, ids in enumerate(random_prompts(batch, 64, f"out-{kind}")):
        engine.add(engine.make_requests(f"{kind}-{i}", ids, SamplingParams(
            temperature=0.0, max_tokens=steps + 8, ignore_eos=True, **KINDS[kind])))
    run_ms, make_ms = [], []
    while engine.has_unfinished:
        start = time.perf_counter()
        raws = engine.run_step()
        if engine.runner.device.type == "cuda":
            torch.cuda.synchronize()
        middle = time.perf_counter()
        _, stop = make_outputs(raws)
        end = time.perf_counter()
        engine.stop_sequences(stop)
        if len(raws) == batch and not any(r.finished for r in raws):  # full decode steps
            run_ms.append(1000 * (middle - start))
            make_ms.append(1000 * (end - middle))
    run, make = statistics.median(run_ms[2:]), statistics.median(make_ms[2:])
    return {"decode_steps": len(run_ms), "run_step_ms": round(run, 3),
            "make_outputs_ms": round(make, 3),
            "engine_thread_ms_before": round(run + make, 3),
            "engine_thread_ms_after": round(run, 3),
            "after_over_before": round(run / (run + make), 4)}


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:llama3-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("bench/results/output_side.json"))
    args = p.parse_args()
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          kv_cache_bytes=512 * 2**20, max_num_seqs=max(args.batch, 64),
                          max_num_batched_tokens=max(4096, 64 * args.batch),
                          torch_threads=args.threads)
    engine, _ = build_engine(config, args.tokenizer)
    measure(engine, args.batch, 4, "greedy")  # warm-up
    results = {kind: measure(engine, args.batch, args.steps, kind) for kind in KINDS}
    card = torch.cuda.get_device_name() if engine.runner.device.type == "cuda" else cpu_model()
    out = {"machine": {"device": card, "cores": torch.get_num_threads(),
                       "torch": torch.__version__},
           "command": " ".join(["python", *sys.argv]),
           "model": args.model, "dtype": args.dtype, "batch": args.batch, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
