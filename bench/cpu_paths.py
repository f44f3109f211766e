"""CPU paths of the torch engine, each against what it replaced, in one run.

    python bench/cpu_paths.py --out bench/results/cpu_paths.json

1. **Prefill shapes** (`workers.models.attention.padded_length`). In a fresh process per
   side, SDPA in bfloat16 on 3,000 prefill shapes drawn like a serving mix (chunks of 2..512
   new tokens, log-uniform; half whole prompts, half over a cached context of up to 8,192
   tokens): exact lengths against lengths padded to buckets. RSS (after ``malloc_trim``) is
   read after every 500; on a CPU with AMX, torch compiles and keeps brgemm kernels per shape.
2. **A forward's heap** (`workers.malloc.step_heap`). Our engine with SmolLM2: a 1,024-token
   prefill and decode steps at batch 1 and 16, each timed with the forward inside
   ``step_heap`` and outside it, alternating, in one process; minor page faults per prefill.
2b. **The heap's top between steps** (`workers.malloc.TRIM_THRESHOLD`). The same engine:
   a 1,024-token prefill and decode at batch 1, 16 and 64, alternating between trimming the
   heap's top past 2 MiB and past 8 MiB (what a step leaves free there stays mapped for the
   next one).
3. **Decode attention** (`workers.models.attention.CPU_DECODE_KERNEL`, `SDPA_MAX_DECODES`).
   The same engine's decode at batch 8, 16 and 64 (128-token prompts, 33 new tokens),
   alternating between the compiled kernel that reads the blocks in place (today) and the
   torch path it replaced (SDPA over gathered blocks up to 16 decodes, batched matmuls over
   gathered rows beyond); in bfloat16 on a CPU with AVX512-BF16 also the kernel with its
   rows widened to floats (``CPU_DECODE_BF16_DOT = False``, as other CPUs run it).
3a. **The decode kernel alone** (`workers.models.attention.CPU_DECODE_BF16_DOT`). µs per
   call in bfloat16 over 30 layers' caches (out of cache, as in the engine) at batch 1, 16
   and 64, alternating between AVX512-BF16's dot products and rows widened to floats; only
   on a CPU with AVX512-BF16.
3b. **Projections in bfloat16** (the "pairs" weight layout,
   `workers.models.llama.SMALL_BATCH_ROWS`). The same engine (``dtype: auto``) at batch 1,
   2, 16 and 64 and a 1,024-token prefill, alternating between our pairs kernel for every
   step (today, on AVX512-BF16), oneDNN's packed copy with our kernel over the
   plain weights for steps of up to two tokens (today elsewhere) and the packed copy for
   every step.
3c. **The residual add and RMS norm** (`workers.models.llama.CPU_NORM_KERNEL`). The same
   engine at batch 1 and 16 and a 1,024-token prefill, alternating between our fused kernel
   (today) and torch's add and ``F.rms_norm``.
3d. **The MLP's activation** (`workers.models.llama.CPU_SILU_MUL_KERNEL`). The same engine,
   in the dtype ``auto`` serves and in float32, at batch 1, 16 and 64 and a 1,024-token
   prefill, alternating between our kernel reading gate and up in place (today) and torch's
   ``F.silu(gate) * up`` after a split (and, for sliced weights, a reordering copy).
3e. **RoPE and the cache write** (`workers.models.llama.CPU_ROPE_KERNEL`). The same engine,
   in the dtype ``auto`` serves and in float32, at batch 1, 16 and 64 and a 1,024-token
   prefill, alternating between our kernel rotating queries and keys in place and copying
   keys and values to their slots (today) and torch's multiply, roll, addcmul and two index
   copies.
3f. **Prefill attention** (`workers.models.attention.CPU_PREFILL_KERNEL`). The same engine
   (``dtype: auto``): a 1,024-token prefill and decode at batch 16 (a control, which the
   switch does not touch), alternating between our kernel over the paged cache (today, in
   bfloat16 on AVX512-BF16) and SDPA.
3g. **Projections alone** (the "pairs" and "panels" weight layouts). ms per pass over
   SmolLM2's four projections, 30 layers of distinct weights, at 1 to 2,048 rows,
   alternating: in bfloat16 (``--projections-dtype``, the default) our pairs kernel against
   oneDNN's packed copy, only where the pairs kernel serves; in float32 our panels kernel
   against column slices in one batched matmul and ``F.linear``.
3h. **The prefill kernel alone** (`workers/kernels/prefill_attention.cpp`). ms per call for
   one SmolLM2 layer's heads (9 query heads, 3 KV heads of 64) in bfloat16: a 1,024-token
   prompt, a 256-token one, and 128 and 16 new tokens over a 1,024-token context, alternating
   between the kernel on AMX's tiles (where the CPU has them), on `vdpbf16ps`, and SDPA over
   the context already gathered (which the engine's SDPA path adds).
4. **Weight layout** (`workers.models.llama.cpu_weight_layout`). The same engine in float32
   (``--layout-dtype bfloat16``: in bfloat16):
   decode at batch 1, 16 and 64 and a 1,024-token prefill, alternating between projections
   that run on our panels kernel (float32 only; today on CPUs other than Intel's), on column
   slices of their weight, one per thread, as one batched matmul (before; today where the
   kernels cannot be built), on oneDNN's packed copy (with our kernel for steps of up to two
   tokens), and on plain ``F.linear`` (today on Intel CPUs).
5. **Weight dtype** (`workers.models.dtype.pick_dtype`, what ``dtype: auto`` serves). Two
   engines with SmolLM2, one in bfloat16 and one in float32: decode at batch 1 and 16 and a
   1,024-token prefill, alternating between them.

``--parts`` runs some of them (e.g. ``--parts layout``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPES_PROGRAM = """
import ctypes, json, random, sys, time
import torch, torch.nn.functional as F
import workers
from workers.models.attention import padded_length
torch.set_num_threads(int(sys.argv[2]))
libc = ctypes.CDLL(None)
def rss():
    libc.malloc_trim(0)
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
pad = padded_length if sys.argv[1] == "padded" else (lambda n: n)
rng = random.Random(0)
heads, kv_heads, d = 9, 3, 64  # SmolLM2-135M
trace, start, t0 = [], rss(), time.perf_counter()
for i in range(3000):
    n = round(2 * 256 ** rng.random())
    context = n + rng.choice([0, rng.randint(1, 8192)])
    q_len, k_len = pad(n), pad(context)
    q = torch.randn(1, heads, q_len, d, dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, k_len, d, dtype=torch.bfloat16)
    if context == n:
        F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
    else:
        mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
        F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True)
    if i % 500 == 499:
        trace.append(round(rss() - start, 1))
print(json.dumps({"growth_trace_mib": trace, "seconds": time.perf_counter() - t0}))
"""


def shapes(threads: int) -> dict[str, Any]:
    out = {}
    for side in ("exact", "padded"):
        done = subprocess.run([sys.executable, "-c", SHAPES_PROGRAM, side, str(threads)],
                              cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, check=True, timeout=900)
        out[side] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"shapes {side}: RSS growth {out[side]['growth_trace_mib']} MiB, "
              f"{out[side]['seconds']:.1f} s", flush=True)
    return out


def minor_faults() -> int:
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[7])


def alternating(ours: Any, label: str, sides: dict[str, Callable[[], None]],
                workloads: list[str], repeats: int) -> dict[str, Any]:
    """Tokens/s of each workload ("prefill_1024", or "decode_bN": N 128-token prompts, 32
    decode steps timed) on each side, alternating sides ``repeats`` times; each side's
    callable switches the engine to it. The ratio is the first side over the second.
    A prefill also counts its minor page faults."""
    from engine_bench import random_prompts

    first, second = list(sides)[:2]
    out: dict[str, Any] = {}
    for what in workloads:
        rates: dict[str, list[float]] = {s: [] for s in sides}
        faults: dict[str, list[int]] = {s: [] for s in sides}
        for r in range(repeats):
            for side, switch in sides.items():
                switch()
                tag = f"{label}/{what}/{side}/{r}"
                if what == "prefill_1024":
                    before = minor_faults()
                    seconds = ours.run(random_prompts(1, 1024, tag), 1)
                    faults[side].append(minor_faults() - before)
                    rates[side].append(1024 / seconds)
                else:
                    batch, n = int(what.rsplit("b", 1)[1]), 33
                    one = ours.run(random_prompts(batch, 128, tag), 1)
                    all_ = ours.run(random_prompts(batch, 128, tag + "/n"), n)
                    rates[side].append(batch * (n - 1) / (all_ - one))
        median = {s: statistics.median(v) for s, v in rates.items()}
        out[what] = {"tokens_per_s": rates, "median": median,
                     "ratio": median[first] / median[second]}
        if len(sides) > 2:
            last = list(sides)[-1]
            out[what]["over_last"] = {s: m / median[last] for s, m in median.items()}
        if what == "prefill_1024":
            out[what]["minor_faults"] = faults
        print(f"{what}: {first} / {second} = {out[what]['ratio']:.3f} ({median})", flush=True)
    return out


def heap(threads: int, repeats: int) -> dict[str, Any]:
    import torch
    from engine_bench import OurEngine, parse_args, random_prompts

    from workers import malloc

    torch.set_num_threads(threads)
    ours = OurEngine.build(parse_args(["--threads", str(threads)]), 64)
    runner = ours.engine.runner

    def use(memory: Callable[[], Any]) -> Callable[[], None]:
        return lambda: setattr(runner, "_step_memory", memory)

    ours.run(random_prompts(1, 1024, "heap/warm"), 1)
    out = alternating(ours, "heap", {"step_heap": use(malloc.step_heap),
                                     "without": use(contextlib.nullcontext)},
                      ["prefill_1024", "decode_b1", "decode_b16"], repeats)
    runner._step_memory = malloc.step_heap
    return out


def heap_top(threads: int, repeats: int) -> dict[str, Any]:
    import torch
    from engine_bench import OurEngine, parse_args, random_prompts

    from workers import malloc

    torch.set_num_threads(threads)
    ours = OurEngine.build(parse_args(["--threads", str(threads)]), 64)
    today = malloc.TRIM_THRESHOLD

    def keep(mib: int) -> Callable[[], None]:
        def switch() -> None:
            malloc.TRIM_THRESHOLD = mib << 20
            malloc.bound_retention()
        return switch

    ours.run(random_prompts(16, 128, "top/warm"), 4)
    out = alternating(ours, "top", {"trim_2mib": keep(2), "trim_8mib": keep(8)},
                      ["prefill_1024", "decode_b1", "decode_b16", "decode_b64"], repeats)
    malloc.TRIM_THRESHOLD = today
    malloc.bound_retention()
    return out


def decode_attention(threads: int, repeats: int) -> dict[str, Any]:
    import torch
    from engine_bench import OurEngine, parse_args, random_prompts

    from workers import kernels
    from workers.models import attention

    torch.set_num_threads(threads)
    ours = OurEngine.build(parse_args(["--threads", str(threads)]), 64)
    today = attention.SDPA_MAX_DECODES

    def limit(n: int) -> Callable[[], None]:
        return lambda: setattr(attention, "SDPA_MAX_DECODES", n)

    def torch_path(n: int) -> Callable[[], None]:
        return lambda: (setattr(attention, "CPU_DECODE_KERNEL", False), limit(n)())

    def kernel(bf16_dot: bool) -> Callable[[], None]:
        return lambda: (setattr(attention, "CPU_DECODE_KERNEL", True),
                        setattr(attention, "CPU_DECODE_BF16_DOT", bf16_dot))

    sides = {"kernel": kernel(True), "torch": torch_path(today)}
    module = kernels.cpu()
    if ours.engine.runner.dtype == torch.bfloat16 and module is not None and \
            module.paged_decode_has_bf16_dot():
        sides["kernel_widened"] = kernel(False)  # the kernel without AVX512-BF16's dot products
    ours.run(random_prompts(16, 128, "decode/warm"), 4)
    out = alternating(ours, "decode", sides, ["decode_b8", "decode_b16", "decode_b64"], repeats)
    attention.SDPA_MAX_DECODES, attention.CPU_DECODE_KERNEL = today, True
    attention.CPU_DECODE_BF16_DOT = True
    return out


def decode_calls(threads: int, repeats: int) -> dict[str, Any]:
    """The decode kernel alone, µs per call, on SmolLM2's attention shapes in bfloat16 (9 query
    heads, 3 KV heads of 64): one call per layer over 30 layers' caches of a 768 MiB pool, so
    each call finds its blocks out of cache as in the engine; blocks in random order. Sides:
    AVX512-BF16's dot products (today, where the CPU has them) and rows widened to floats."""
    import torch

    from workers import kernels

    module = kernels.cpu()
    if module is None or not module.paged_decode_has_bf16_dot():
        print("decode_calls: no AVX512-BF16 dot-product path on this CPU, skipped")
        return {"skipped": "no AVX512-BF16 dot-product path on this CPU"}
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    layers, blocks, page, kv_heads, heads, dim = 30, 2912, 16, 3, 9, 64
    caches = [torch.randn(2, blocks, page, kv_heads, dim, generator=gen).bfloat16()
              for _ in range(layers)]
    out: dict[str, Any] = {}
    for batch, context in [(1, 1000), (16, 150), (64, 150)]:
        width = -(-context // page)
        tables = torch.randperm(blocks, generator=gen)[:batch * width].view(batch, width)
        lens = torch.full((batch,), context, dtype=torch.long)
        q = torch.randn(batch, heads, dim, generator=gen).bfloat16()
        times: dict[str, list[float]] = {"bf16_dot": [], "widened": []}
        for _ in range(repeats):
            for side in times:
                dot = side == "bf16_dot"
                module.paged_decode(q, caches[0], tables, lens, 0.125, dot)
                start = time.perf_counter()
                for cache in caches:
                    module.paged_decode(q, cache, tables, lens, 0.125, dot)
                times[side].append(1e6 * (time.perf_counter() - start) / layers)
        median = {s: statistics.median(v) for s, v in times.items()}
        key = f"b{batch}_context{context}"
        out[key] = {"us_per_call": times, "median": median,
                    "ratio": median["bf16_dot"] / median["widened"]}
        print(f"decode_calls {key}: bf16_dot / widened = {out[key]['ratio']:.3f} ({median})",
              flush=True)
    return out


def skipped(part: str, why: str) -> dict[str, Any]:
    print(f"{part}: {why}, skipped")
    return {"skipped": why}


def projection_calls(threads: int, repeats: int, dtype: str) -> dict[str, Any]:
    """SmolLM2's four projections (q/k/v, o, gate/up, down) over 30 layers of distinct
    weights (out of cache, as in the engine), ms per pass at each step size, alternating: in
    bfloat16 our pairs kernel against oneDNN's packed copy; in float32 our panels kernel
    against column slices in one batched matmul and ``F.linear``."""
    import torch
    import torch.nn.functional as F

    from workers import kernels

    bf16 = dtype == "bfloat16"
    module = kernels.pairs() if bf16 else kernels.cpu()
    if module is None:
        return skipped("projections", f"our {'pairs' if bf16 else 'panels'} kernel does not "
                       "serve on this CPU")
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    shapes, layers = [(960, 576), (576, 576), (3072, 576), (576, 1536)], 30
    weights = [[(torch.randn(n, k, generator=gen) * 0.02).to(getattr(torch, dtype))
                for n, k in shapes] for _ in range(layers)]
    if bf16:
        ours = "pairs"
        copies = {"pairs": [[module.pairs_pack(w) for w in layer] for layer in weights],
                  "packed": [[torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in layer]
                             for layer in weights]}
        run = {"pairs": lambda x, w, n: module.pairs_linear(x, w, n, None),
               "packed": lambda x, w, n: torch.ops.mkldnn._linear_pointwise(
                   x, w, None, "none", [], "")}
    else:
        ours, parts = "panels", threads
        copies = {"panels": [[module.panels_pack(w) for w in layer] for layer in weights],
                  "sliced": [[torch.stack([c.t() for c in w.chunk(parts)]).contiguous()
                              for w in layer] for layer in weights],
                  "f_linear": weights}

        def sliced(x: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
            return torch.bmm(x.expand(w.shape[0], *x.shape), w).transpose(0, 1).reshape(
                x.shape[0], n)

        run = {"panels": lambda x, w, n: module.panels_linear(x, w, n, None),
               "sliced": sliced, "f_linear": lambda x, w, n: F.linear(x, w)}
    del weights
    out: dict[str, Any] = {"dtype": dtype}
    for rows in (1, 16, 64, 256, 512, 1024, 2048):
        xs = {k: torch.randn(rows, k, generator=gen).to(getattr(torch, dtype))
              for _, k in shapes}
        times: dict[str, list[float]] = {side: [] for side in copies}
        for rep in range(repeats + 1):
            for side, layers_of in copies.items():
                start = time.perf_counter()
                for layer in layers_of:
                    for (n, k), w in zip(shapes, layer):
                        run[side](xs[k], w, n)
                if rep:  # the first pass of each side warms up
                    times[side].append(1e3 * (time.perf_counter() - start))
        median = {side: statistics.median(v) for side, v in times.items()}
        flops = 2 * rows * layers * sum(n * k for n, k in shapes)
        out[f"rows{rows}"] = {"ms": times, "median_ms": median,
                              "tflops": {s: flops / m / 1e9 for s, m in median.items()},
                              "ratio": {s: median[ours] / m for s, m in median.items()
                                        if s != ours}}
        print(f"projections rows {rows}: {ours} time / " + ", ".join(
            f"{s} {r:.3f}" for s, r in out[f"rows{rows}"]["ratio"].items()) + f" ({median})",
            flush=True)
    return out


def small_batch(threads: int, repeats: int) -> dict[str, Any]:
    import torch
    from engine_bench import OurEngine, parse_args, random_prompts

    from workers import kernels
    from workers.models import llama

    torch.set_num_threads(threads)
    serves = llama.cpu_weight_layout
    llama.cpu_weight_layout = lambda *a: "plain"  # load plain; every copy kept below
    try:
        ours = OurEngine.build(parse_args(["--threads", str(threads)]), 64)
    finally:
        llama.cpu_weight_layout = serves
    model = ours.engine.runner.model
    if serves(model.dtype, "cpu") not in ("pairs", "packed"):
        raise SystemExit("bfloat16 runs F.linear here: neither our kernels nor oneDNN's")
    model.lay_out_weights("packed", keep_plain=True)
    if model.lm_head.small is None:
        raise SystemExit("the CPU kernels are not built here")
    projections = [m for m in model.modules() if isinstance(m, llama.Projection)]
    module = kernels.pairs()
    pairs = [module.pairs_pack(m.weight.detach()) for m in projections] if module else []
    today = llama.SMALL_BATCH_ROWS

    def side(name: str) -> Callable[[], None]:
        def switch() -> None:
            for m, copy in zip(projections, pairs):
                m.pairs = copy if name == "pairs" else None
            llama.SMALL_BATCH_ROWS = today if name == "plain" else 0
        return switch

    sides = {name: side(name) for name in (["pairs"] if pairs else []) + ["plain", "packed"]}
    ours.run(random_prompts(16, 128, "small/warm"), 4)
    out = alternating(ours, "small", sides,
                      ["decode_b1", "decode_b2", "decode_b16", "decode_b64", "prefill_1024"],
                      repeats)
    side("pairs" if pairs else "plain")()
    return out


def kernel_switch(threads: int, repeats: int, flag: str, workloads: list[str],
                  dtype: str = "auto", module: str = "llama") -> dict[str, Any]:
    """The engine with one of our CPU kernels (``workers.models.<module>.<flag>``) on and
    off, alternating."""
    import importlib

    import torch
    from engine_bench import OurEngine, parse_args, random_prompts

    from workers import kernels

    switches = importlib.import_module(f"workers.models.{module}")
    torch.set_num_threads(threads)
    if kernels.cpu() is None:
        raise SystemExit("the CPU kernels are not built here")
    ours = OurEngine.build(parse_args(["--threads", str(threads), "--dtype", dtype]), 64)

    def kernel(on: bool) -> Callable[[], None]:
        return lambda: setattr(switches, flag, on)

    ours.run(random_prompts(16, 128, f"{flag}/warm"), 4)
    out = alternating(ours, flag, {"kernel": kernel(True), "torch": kernel(False)}, workloads,
                      repeats)
    setattr(switches, flag, True)
    ours.close()
    return out


def norm(threads: int, repeats: int) -> dict[str, Any]:
    return kernel_switch(threads, repeats, "CPU_NORM_KERNEL",
                         ["decode_b1", "decode_b16", "prefill_1024"])


def silu_mul(threads: int, repeats: int) -> dict[str, Any]:
    """In the dtype ``auto`` serves here, and in float32 (on CPUs other than Intel's its
    weights are sliced in two, whose slices the kernel reads as they are)."""
    workloads = ["decode_b1", "decode_b16", "decode_b64", "prefill_1024"]
    return {dtype: kernel_switch(threads, repeats, "CPU_SILU_MUL_KERNEL", workloads, dtype)
            for dtype in ("auto", "float32")}


def rope(threads: int, repeats: int) -> dict[str, Any]:
    """In the dtype ``auto`` serves here, and in float32."""
    workloads = ["decode_b1", "decode_b16", "decode_b64", "prefill_1024"]
    return {dtype: kernel_switch(threads, repeats, "CPU_ROPE_KERNEL", workloads, dtype)
            for dtype in ("auto", "float32")}


def prefill(threads: int, repeats: int) -> dict[str, Any]:
    return kernel_switch(threads, repeats, "CPU_PREFILL_KERNEL", ["prefill_1024", "decode_b16"],
                         module="attention")


def prefill_calls(threads: int, repeats: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from workers import kernels

    module = kernels.prefill()
    if module is None:
        return skipped("prefill kernel", "the prefill kernel needs AVX512-BF16")
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, page = 9, 3, 64, 16
    sides = ["amx", "vdpbf16ps", "sdpa"] if module.pairs_linear_amx_available() else \
        ["vdpbf16ps", "sdpa"]
    out: dict[str, Any] = {"sides": sides}
    for new, context in ((1024, 1024), (256, 256), (128, 1024), (16, 1024)):
        blocks = -(-context // page)
        kv = torch.randn(2, blocks, page, kv_heads, dim, generator=gen).bfloat16()
        table = torch.randperm(blocks, generator=gen)
        q = torch.randn(new, heads, dim, generator=gen).bfloat16()
        pos = torch.arange(context)
        rows = (table[pos // page] * page + pos % page)
        keys, values = (kv[i].reshape(-1, kv_heads, dim)[rows].transpose(0, 1).unsqueeze(0)
                        for i in (0, 1))
        mask = pos.view(1, -1) <= (torch.arange(new) + context - new).view(-1, 1)

        def sdpa() -> Any:  # a whole prompt causal, as the engine runs it; else masked
            whole = new == context
            return F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys, values,
                                                  attn_mask=None if whole else mask,
                                                  is_causal=whole, enable_gqa=True)

        run = {"amx": lambda: module.prefill_attention(q, kv, table, context, dim ** -0.5),
               "vdpbf16ps": lambda: module.prefill_attention(q, kv, table, context,
                                                             dim ** -0.5, amx=False),
               "sdpa": sdpa}
        times: dict[str, list[float]] = {side: [] for side in sides}
        for rep in range(repeats + 2):
            for side in sides:
                start = time.perf_counter()
                run[side]()
                if rep >= 2:  # two warm-up passes
                    times[side].append(1e3 * (time.perf_counter() - start))
        median = {side: statistics.median(v) for side, v in times.items()}
        out[f"new{new}_context{context}"] = {"ms": times, "median_ms": median}
        print(f"prefill kernel, {new} new over {context}: ms " +
              ", ".join(f"{side} {m:.3f}" for side, m in median.items()), flush=True)
    return out


def weight_layout(threads: int, repeats: int, dtype: str) -> dict[str, Any]:
    import torch
    from engine_bench import OurEngine, parse_args, random_prompts

    from workers import kernels
    from workers.models import llama

    torch.set_num_threads(threads)
    serves = llama.cpu_weight_layout
    llama.cpu_weight_layout = lambda *a: "plain"  # load plain; every layout kept below
    try:
        ours = OurEngine.build(parse_args(["--threads", str(threads), "--dtype", dtype]), 64)
    finally:
        llama.cpu_weight_layout = serves
    model = ours.engine.runner.model
    projections = [m for m in model.modules() if isinstance(m, llama.Projection)]
    model.lay_out_weights("packed", keep_plain=True)
    model.lay_out_weights("sliced", keep_plain=True)
    sides = ["sliced", "packed", "f_linear"]
    if dtype == "float32" and kernels.cpu() is not None:
        model.lay_out_weights("panels", keep_plain=True)
        sides.insert(0, "panels")
    copies = [(m.packed, m.slices, m.sliced_bias, m.panels, m.small) for m in projections]

    def layout(name: str) -> Callable[[], None]:
        def switch() -> None:
            for m, (packed, slices, sliced_bias, panels, small) in zip(projections, copies):
                m.packed = packed if name == "packed" else None
                m.slices = slices if name == "sliced" else None
                m.sliced_bias = sliced_bias if name == "sliced" else None
                m.panels = panels if name == "panels" else None
                # Our kernels: every step on the panels, or small steps beside a packed copy.
                m.small = small if name in ("panels", "packed") else None
        return switch

    ours.run(random_prompts(16, 128, "layout/warm"), 4)
    out = alternating(ours, "layout", {name: layout(name) for name in sides},
                      ["prefill_1024", "decode_b1", "decode_b16", "decode_b64"], repeats)
    out["dtype"] = dtype
    out["serves"] = serves(getattr(torch, dtype), "cpu")
    layout("f_linear")()
    return out


def weight_dtype(threads: int, repeats: int) -> dict[str, Any]:
    import torch
    from engine_bench import OurEngine, parse_args, random_prompts

    from workers.models.dtype import pick_dtype

    torch.set_num_threads(threads)
    engines = {name: OurEngine.build(parse_args(["--threads", str(threads), "--dtype", name,
                                                 "--kv-mib", "256"]), 64)
               for name in ("bfloat16", "float32")}
    current = [engines["bfloat16"]]

    class Chosen:
        def run(self, prompts: Any, n: int) -> float:
            return current[0].run(prompts, n)

    for name, engine in engines.items():
        engine.run(random_prompts(16, 128, f"dtype/warm/{name}"), 4)
    out = alternating(Chosen(), "dtype",
                      {name: (lambda e=engine: current.__setitem__(0, e))
                       for name, engine in engines.items()},
                      ["prefill_1024", "decode_b1", "decode_b16"], repeats)
    out["auto_serves"] = str(pick_dtype("auto", "cpu")).removeprefix("torch.")
    return out


PARTS = {"shapes": ("prefill_shapes", lambda a: shapes(a.threads)),
         "heap": ("forward_heap", lambda a: heap(a.threads, a.repeats)),
         "top": ("heap_top", lambda a: heap_top(a.threads, a.repeats)),
         "decode": ("decode_attention", lambda a: decode_attention(a.threads, a.repeats)),
         "calls": ("decode_calls", lambda a: decode_calls(a.threads, a.repeats)),
         "projections": ("projection_calls",
                         lambda a: projection_calls(a.threads, a.repeats,
                                                    a.projections_dtype)),
         "small": ("small_batch", lambda a: small_batch(a.threads, a.repeats)),
         "norm": ("norm", lambda a: norm(a.threads, a.repeats)),
         "silu": ("silu_mul", lambda a: silu_mul(a.threads, a.repeats)),
         "rope": ("rope_cache", lambda a: rope(a.threads, a.repeats)),
         "prefill": ("prefill_attention", lambda a: prefill(a.threads, a.repeats)),
         "prefill_calls": ("prefill_calls", lambda a: prefill_calls(a.threads, a.repeats)),
         "layout": ("weight_layout",
                    lambda a: weight_layout(a.threads, a.repeats, a.layout_dtype)),
         "dtype": ("weight_dtype", lambda a: weight_dtype(a.threads, a.repeats))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/cpu_paths.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    p.add_argument("--layout-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the dtype of the weight-layout part")
    p.add_argument("--projections-dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="the dtype of the projections part")
    args = p.parse_args()
    from workers.models.dtype import cpuinfo

    flags = set(cpuinfo("flags").split())
    result: dict[str, Any] = {
        "machine": {"cpu": cpuinfo("model name") or "?", "vendor": cpuinfo("vendor_id") or "?",
                    "amx_bf16": "amx_bf16" in flags,
                    "avx512_bf16": "avx512_bf16" in flags, "threads": args.threads,
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "command": " ".join([sys.executable, *sys.argv])}}
    for part in args.parts:
        key, run = PARTS[part]
        result[key] = run(args)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
