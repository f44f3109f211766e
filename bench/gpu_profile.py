"""Where a GPU step's time goes: the engine's own steps under torch's profiler.

    python bench/gpu_profile.py --model random:llama3-8b --tokenizer DIR --out DIR

Runs, on a random-weight model (bench/engine_bench.py's shapes and weights): one 1,024-token
prefill, one 16-token chunk over an 8,176-token cached prefix, and decode steps at batch 1 and
128. For each it writes the wall time per step split into the runner (inputs, forward
launch), the sampler (which waits for the GPU), making the outputs (text, stop strings,
logprob texts: in the synchronous engine run here they are made inline, where an AsyncEngine
makes them on its event loop during the next step) and the rest of the engine step, and
torch's profiler table (top kernels by GPU time, top operators by CPU time) to ``OUT/profile.txt``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import build_engine, random_prompts  # noqa: E402

from core.config import EngineConfig  # noqa: E402
from workers.engine import engine as engine_module  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.engine.sampling_params import SamplingParams  # noqa: E402


class Timed:
    """Wraps the runner's execute and the sampler to add up their wall time."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.totals = {"execute": 0.0, "sampler": 0.0, "outputs": 0.0, "step": 0.0}
        engine.runner.execute = self._timed(engine.runner.execute, "execute")
        engine.sampler = self._timed(engine.sampler, "sampler")
        engine_module.make_outputs = self._timed(engine_module.make_outputs, "outputs")

    def _timed(self, fn, key: str):
        def call(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.totals[key] += time.perf_counter() - start
        return call

    def step(self) -> None:
        start = time.perf_counter()
        self.engine.step()
        self.totals["step"] += time.perf_counter() - start

    def reset(self) -> None:
        for key in self.totals:
            self.totals[key] = 0.0


def add(engine: Engine, prompts: list[list[int]], max_tokens: int, tag: str) -> None:
    for i, ids in enumerate(prompts):
        engine.add(engine.make_requests(f"{tag}-{i}", ids, SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True)))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile(name: str, engine: Engine, timed: Timed, steps: int, out: list[str]) -> None:
    sync()
    timed.reset()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            timed.step()
        sync()
    per = {k: 1000 * v / steps for k, v in timed.totals.items()}
    out.append(f"## {name}: {steps} steps; per step: step {per['step']:.2f} ms, runner.execute "
               f"{per['execute']:.2f} ms, sampler {per['sampler']:.2f} ms, outputs "
               f"{per['outputs']:.2f} ms, rest "
               f"{per['step'] - per['execute'] - per['sampler'] - per['outputs']:.2f} ms "
               "(under the profiler)")
    table = prof.key_averages()
    out.append(table.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    out.append(table.table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:llama3-8b")
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests this script")
    p.add_argument("--kv-gib", type=float, default=16.0)
    p.add_argument("--attention-backend", default="triton" if torch.cuda.is_available()
                   else "torch", choices=("auto", "torch", "triton"))
    args = p.parse_args()
    config = EngineConfig(model=args.model, device=args.device, dtype="bfloat16",
                          kv_cache_bytes=int(args.kv_gib * 2**30), max_num_seqs=128,
                          max_num_batched_tokens=8192, attention_backend=args.attention_backend)
    engine, _ = build_engine(config, args.tokenizer)
    runner = engine.runner
    timed = Timed(engine)
    card = torch.cuda.get_device_name() if runner.device.type == "cuda" else "cpu"
    out = [f"# {card}, {args.model}, {runner.attention_backend} attention, graphs captured "
           f"in {runner.graph_capture_s} s"]

    def drain() -> None:
        while engine.has_unfinished:
            engine.step()

    # Warm-up: every shape once.
    add(engine, random_prompts(1, 1024, "warm"), 2, "w1")
    drain()
    add(engine, random_prompts(128, 64, "warm128"), 4, "w128")
    drain()

    add(engine, random_prompts(1, 1024, "p1k"), 1, "p1k")
    profile("prefill 1024 tokens (one step)", engine, timed, 1, out)
    drain()
    long = random_prompts(1, 8192, "p8k")[0][:8191]
    add(engine, [long], 1, "p8k")
    drain()
    add(engine, [long], 1, "p8k-cached")
    profile("cached 8k prompt: 15-token chunk over 8,176 cached tokens", engine, timed, 1, out)
    drain()
    for batch in (1, 128):
        add(engine, random_prompts(batch, 128, f"d{batch}"), 40, f"d{batch}")
        for _ in range(2 + batch * 128 // 8192):  # the prefills and a first decode
            engine.step()
        profile(f"decode batch {batch}", engine, timed, 20, out)
        drain()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.txt").write_text("\n\n".join(out) + "\n")
    print("\n".join(line for line in out if line.startswith("#")))


if __name__ == "__main__":
    main()
