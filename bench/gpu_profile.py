"""Where a step's time goes: the engine's own steps under torch's profiler.

    python bench/gpu_profile.py --model random:llama3-8b --tokenizer DIR --out DIR
    python bench/gpu_profile.py --device cpu --model smollm2-135m-instruct --dtype auto \
        --kv-gib 1 --batches 1,16,64 --threads 2 --out DIR

Runs (on a random-weight model, bench/engine_bench.py's shapes and weights, or a real one):
one 1,024-token prefill, one 16-token chunk over an 8,176-token cached prefix (GPU only: on a
CPU the 8k prefill alone takes minutes), and decode steps of 128-token prompts at each of
``--batches``. For each it writes the wall time per step split into the runner (inputs, forward
launch), the sampler (which waits for the GPU), making the outputs (text, stop strings,
logprob texts: in the synchronous engine run here they are made inline, where an AsyncEngine
makes them on its event loop during the next step) and the rest of the engine step, and
torch's profiler table (top kernels by GPU time, top operators by CPU time; on a CPU the
operators by input shape, so each projection shows apart, and our CPU kernels as
``electron::<name>``) to ``OUT/profile.txt``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import build_engine, random_prompts  # noqa: E402

from core.config import EngineConfig  # noqa: E402
from workers import kernels  # noqa: E402
from workers.engine import engine as engine_module  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.engine.sampling_params import SamplingParams  # noqa: E402
from workers.models import attention  # noqa: E402
from workers.models.dtype import cpuinfo  # noqa: E402


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


def profile_cpu_kernels() -> None:
    """Our CPU kernels are plain extension functions, which torch's profiler does not see:
    each call is wrapped in a ``record_function`` of its name, so they show in the table."""
    module = kernels.cpu()
    if module is None:
        return

    def wrapped(fn):
        def call(*args):
            with torch.profiler.record_function(f"electron::{fn.__name__}"):
                return fn(*args)
        return call

    names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
    kernels._loaded["cpu"] = SimpleNamespace(**{n: wrapped(getattr(module, n)) for n in names})


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
    # On a CPU, shapes too: the table then shows each projection apart.
    with torch.profiler.profile(activities=activities,
                                record_shapes=not torch.cuda.is_available()) as prof:
        for _ in range(steps):
            timed.step()
        sync()
    per = {k: 1000 * v / steps for k, v in timed.totals.items()}
    out.append(f"## {name}: {steps} steps; per step: step {per['step']:.2f} ms, runner.execute "
               f"{per['execute']:.2f} ms, sampler {per['sampler']:.2f} ms, outputs "
               f"{per['outputs']:.2f} ms, rest "
               f"{per['step'] - per['execute'] - per['sampler'] - per['outputs']:.2f} ms "
               "(under the profiler)")
    if torch.cuda.is_available():
        table = prof.key_averages()
        out.append(table.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
        out.append(table.table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))
    else:
        table = prof.key_averages(group_by_input_shape=True)
        out.append(table.table(sort_by="self_cpu_time_total", row_limit=20,
                               max_name_column_width=50, max_shapes_column_width=70))


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:llama3-8b")
    p.add_argument("--tokenizer", type=Path, help="for a random: model (default SmolLM2's)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", help="as EngineConfig.dtype (auto, ...)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--batches", default="1,128", help="decode batch sizes, comma-separated")
    p.add_argument("--kv-gib", type=float, default=16.0)
    p.add_argument("--attention-backend", default="triton" if torch.cuda.is_available()
                   else "torch", choices=("auto", "torch", "triton"))
    p.add_argument("--no-bf16-dot", action="store_true",
                   help="CPU decode kernel: widen bfloat16 rows to floats even where AVX512-BF16's "
                        "dot products could run (attention.CPU_DECODE_BF16_DOT)")
    args = p.parse_args()
    attention.CPU_DECODE_BF16_DOT = not args.no_bf16_dot
    batches = [int(b) for b in args.batches.split(",")]
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          kv_cache_bytes=int(args.kv_gib * 2**30),
                          max_num_seqs=max(128, *batches), max_num_batched_tokens=8192,
                          attention_backend=args.attention_backend,
                          **({"torch_threads": args.threads} if args.threads else {}))
    if args.device == "cpu":
        profile_cpu_kernels()
    engine, _ = build_engine(config, args.tokenizer)
    runner = engine.runner
    timed = Timed(engine)
    gpu = runner.device.type == "cuda"
    card = torch.cuda.get_device_name() if gpu else f"cpu ({cpuinfo('model name')})"
    out = [f"# {card}, {args.model} in {runner.dtype}, {runner.attention_backend} attention, "
           f"weights {runner.model.weight_layout}, {torch.get_num_threads()} threads, graphs "
           f"captured in {runner.graph_capture_s} s"]

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
    if gpu:
        long = random_prompts(1, 8192, "p8k")[0][:8191]
        add(engine, [long], 1, "p8k")
        drain()
        add(engine, [long], 1, "p8k-cached")
        profile("cached 8k prompt: 15-token chunk over 8,176 cached tokens", engine, timed, 1,
                out)
        drain()
    for batch in batches:
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
