"""The Triton paged-attention kernel alone: keys split across programs against one program
per tile and KV head, on Llama-3-8B's attention shapes.

    python bench/attention_kernel.py --device cuda --out bench/results/attention_kernel_<card>.json
    TRITON_INTERPRET=1 python bench/attention_kernel.py --device cpu   # the script's own check

For each case (decodes at batch 1 to 128 over 1k to 32k tokens, a 16-token chunk over an
8k-token cached prefix) it times the kernel with no split and with the split count the runner
picks (``triton_attention.num_splits``: two programs per multiprocessor), and for two cases
every split count from 1 to 32. It reports microseconds per call (CUDA events around 50 calls
after 5 warm-up calls), the ratio unsplit / split, and the KV bytes read per second against
the card's bandwidth. Every output is first checked against attention over the gathered
context. On the CPU (Triton's interpreter) it runs small shapes for the check alone: its
timings say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.paged_attention import build, reference  # noqa: E402
from workers.models import triton_attention as ta  # noqa: E402

PAGE = 16
# Llama-3-8B: 32 query heads, 8 KV heads of 128.
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
CASES = {
    "decode_b1_1k": [(1, 1024)],
    "decode_b1_8k": [(1, 8192)],
    "decode_b1_32k": [(1, 32768)],
    "decode_b8_8k": [(1, 8192)] * 8,
    "decode_b32_2k": [(1, 2048)] * 32,
    "decode_b128_1k": [(1, 1024)] * 128,
    "chunk16_over_8k": [(16, 8192)],
}
SWEEP = ("decode_b1_8k", "chunk16_over_8k")
# The interpreter's check: small shapes, float32.
CPU_CASES = {"decode_b1_600": [(1, 600)], "decode_b3_200": [(1, 200)] * 3,
             "chunk16_over_500": [(16, 500)]}


def time_calls(fn, device: torch.device, calls: int = 50) -> float:
    """Microseconds per call."""
    for _ in range(5):
        fn()
    if device.type != "cuda":
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e6
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) * 1e3 / calls


def run_case(name, shape, *, heads, kv_heads, head_dim, dtype, device, target_tiles, sweep):
    scale = head_dim ** -0.5
    dims = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, page=PAGE, dtype=dtype)
    q, key_cache, value_cache, seqs, meta = build(shape, device=device, **dims)
    tiles = meta.tile_seq.shape[0]
    decode = all(n == 1 for n, _ in shape)
    # The runner's rule: a (graphed) decode step by its size alone, any other also by its
    # longest context.
    chosen = ta.num_splits(tiles, target_tiles,
                           None if decode else max(c for _, c in shape))
    counts = sorted({1, chosen, *((2, 4, 8, 16, 32) if sweep else ())})
    want = reference(q, key_cache, value_cache, seqs, scale).float()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    timings = {}
    for splits in counts:
        split_meta = replace(meta, num_splits=splits)
        got = ta.paged_attention(q, key_cache, value_cache, split_meta, scale)
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
        out = torch.empty_like(q)
        timings[splits] = time_calls(
            lambda m=split_meta: ta.paged_attention(q, key_cache, value_cache, m, scale, out=out),
            torch.device(device))
    kv_bytes = sum(c for _, c in shape) * kv_heads * head_dim * 2 * key_cache.element_size()
    row = {"case": name, "seqs": len(shape), "new_tokens": shape[0][0],
           "context": shape[0][1], "tiles": tiles, "splits": chosen,
           "us_unsplit": round(timings[1], 2), "us_split": round(timings[chosen], 2),
           "speedup": round(timings[1] / timings[chosen], 3),
           "kv_gb_per_s_split": round(kv_bytes / timings[chosen] / 1e3, 1)}
    if sweep:
        row["sweep_us"] = {str(k): round(v, 2) for k, v in timings.items()}
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not ta.available():
        raise SystemExit("Triton is not installed")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("on the CPU, set TRITON_INTERPRET=1 (Triton's interpreter)")
    if args.device == "cpu":
        from tests.support import triton_interpreter

        triton_interpreter.patch()
    device = torch.device(args.device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        sms, card = props.multi_processor_count, torch.cuda.get_device_name(device)
        shapes, dtype, cases = (HEADS, KV_HEADS, HEAD_DIM), torch.bfloat16, CASES
    else:
        sms, card = 4, "Triton interpreter (check only: timings say nothing)"
        shapes, dtype, cases = (4, 2, 32), torch.float32, CPU_CASES
    heads, kv_heads, head_dim = shapes
    target_tiles = 2 * sms // kv_heads
    rows = []
    for name, shape in cases.items():
        row = run_case(name, shape, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       dtype=dtype, device=args.device, target_tiles=target_tiles,
                       sweep=name in SWEEP or device.type == "cpu")
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": card, "multiprocessors": sms, "cpu": platform.processor() or None,
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
              "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "page": PAGE,
              "command": "python bench/attention_kernel.py " + " ".join(argv or sys.argv[1:]),
              "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
