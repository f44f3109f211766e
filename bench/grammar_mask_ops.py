"""Grammar masks of a step applied row by row against all at once: tensor operations (each
a kernel launch on a GPU) and time per sampler call.

    python bench/grammar_mask_ops.py --out bench/results/grammar_mask_ops.json
    python bench/grammar_mask_ops.py --device cuda --tokenizer DIR --out ...

SmolLM2's tokenizer and a JSON schema; for B grammar rows (1, 16, 64, 128), every row part
way into a document, the sampler picks greedy tokens from random logits. Three ways, in the
same run on the same matchers (each step's mask is filled once and the matchers' decisions
are cached per step, so only the applying differs):

- ``per_row``: every mask applied by its own ``apply`` (the sampler's way before masks were
  handed over together; forced here by hiding each matcher's bitmask);
- ``sampler``: the sampler as it is (``apply_bitmasks``: on a GPU all rows at once, on the
  CPU row by row);
- ``at_once``: the sampler with the GPU's way forced (``apply_bitmasks_at_once``), which
  also runs on the CPU: its operation count is the GPU's.

Reported: aten operations dispatched per sampler call (torch's dispatch mode: on a GPU each
is a kernel launch or a copy), median wall time per call over ``--repeats``, and the ratios
against ``per_row``. The three must pick the same tokens.
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
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.model_files import resolve_model_path  # noqa: E402
from core.tokenizer import Tokenizer  # noqa: E402
from tests.support.sampling import make_request  # noqa: E402
from tests.support.schemas import schema_spec  # noqa: E402
from workers.engine import sampler as sampler_module  # noqa: E402
from workers.engine.grammar import GrammarCompiler, apply_bitmasks_at_once  # noqa: E402
from workers.engine.sampler import Sampler  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "qty": {"type": "integer"}},
          "required": ["name", "qty"]}
PREFIXES = ['{"name": "ap', '{"', "", '{"name": "apple", "qty": 1', '{"name": ']


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class PerRow:
    """A matcher whose bitmask is hidden: the sampler applies it by its own ``apply``."""

    def __init__(self, matcher):
        self.matcher = matcher

    def bitmask(self):
        return None

    def apply(self, logits):
        self.matcher.apply(logits)

    def accept(self, token_id):
        self.matcher.accept(token_id)


def measure(batch: int, device: torch.device, repeats: int, tok: Tokenizer,
            compiler: GrammarCompiler) -> dict:
    spec = schema_spec(SCHEMA)
    matchers = []
    for i in range(batch):
        m = compiler.matcher(spec)
        for token in tok.encode(PREFIXES[i % len(PREFIXES)]):
            m.apply(torch.zeros(tok.vocab_size))
            m.accept(token)
        m.bitmask()  # fills this step's mask and takes its decisions once
        matchers.append(m)
    gen = torch.Generator().manual_seed(batch)
    logits = (torch.randn(batch, tok.vocab_size, generator=gen) * 3).to(device)
    sampler = Sampler(tok.vocab_size, tok.eos_token_ids)
    out = {}
    tokens = {}
    real = sampler_module.apply_bitmasks
    for mode in ("per_row", "sampler", "at_once"):
        requests = [make_request(temperature=0.0) for _ in range(batch)]
        for req, m in zip(requests, matchers):
            req.logits_mask = PerRow(m) if mode == "per_row" else m
        sampler_module.apply_bitmasks = apply_bitmasks_at_once if mode == "at_once" else real
        try:
            for _ in range(3):
                sampler(logits.clone(), requests)
            with CountOps() as ops:
                tokens[mode] = sampler(logits.clone(), requests).token_ids
            times = []
            for _ in range(repeats):
                x = logits.clone()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                sampler(x, requests)  # ends with the tokens on the host: waits for the device
                times.append(time.perf_counter() - start)
        finally:
            sampler_module.apply_bitmasks = real
        out[mode] = {"ops": ops.count, "ms": round(statistics.median(times) * 1e3, 3)}
    assert tokens["per_row"] == tokens["sampler"] == tokens["at_once"], "tokens differ"
    for mode in ("sampler", "at_once"):
        out[f"{mode}_ops_ratio"] = round(out["per_row"]["ops"] / out[mode]["ops"], 2)
        out[f"{mode}_speedup"] = round(out["per_row"]["ms"] / out[mode]["ms"], 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", default="1,16,64,128")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokenizer", type=Path,
                   help="a Hugging Face tokenizer directory (default: the embedded SmolLM2)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tok = Tokenizer.from_model_path(args.tokenizer or
                                    resolve_model_path("smollm2-135m-instruct"))
    compiler = GrammarCompiler(tok, tok.vocab_size, tok.eos_token_ids, overlap=False)
    rows = {}
    for batch in (int(b) for b in args.batches.split(",")):
        rows[f"batch_{batch}"] = measure(batch, device, args.repeats, tok, compiler)
        print(batch, json.dumps(rows[f"batch_{batch}"]), flush=True)
    compiler.close()
    result = {"command": "python bench/grammar_mask_ops.py " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                         else platform.processor() or "cpu"),
              "cpu_model": _cpu_model(), "torch_threads": args.threads,
              "vocab": tok.vocab_size, "results": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
