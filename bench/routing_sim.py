"""Routing simulator: replays a trace onto N simulated workers through the router's own
policies and prefix index, and compares the policies.

    python bench/routing_sim.py --trace data/traces/mooncake/conversation_trace.jsonl \\
        --workers 8 --cache-blocks 5000 --out bench/results/routing_sim.json
    python bench/routing_sim.py --trace ... --workers 8 16 64 --jobs 2 --out ...

Each worker has an LRU KV cache of ``--cache-blocks`` blocks of ``--block-size`` tokens (the
engine's ``BlockPool``) and a continuous-batching step loop whose step times come from a
simulated truth (``--profile``, default ``h100-8b``: see bench/sim/service.py); the router's
``kv_aware`` predicts with a deliberately different profile (``--policy-profile``; default
the truth's curves divided by ``--perturb``, 1.2). KV events reach the router's index
``--event-delay`` after they happen; loads are reported every ``--load-interval`` and seen
``--load-delay`` later. Policies take their settings from the router's config
(``--config router.yaml``, ``--set load_cap=1.5``; the environment is ignored, so a run
repeats).

Per policy (and worker count) the JSON holds ``hit_ratio`` (hit blocks over prompt blocks),
``ideal_hit_ratio`` (one infinite cache), ``ttft_p50`` / ``ttft_p99`` (seconds),
``load_max_over_mean`` (requests per worker, busiest over mean), Jain's fairness and the
balance of prefill work (bench/sim/report.py). One worker count: ``policies`` holds them; all
counts: ``by_workers``. A Markdown table goes beside the JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from bench.sim.cluster import Simulation  # noqa: E402
from bench.sim.report import markdown, summarise  # noqa: E402
from bench.sim.service import make_service, scaled  # noqa: E402
from bench.sim.trace import TraceRequest, ideal_hit_ratio, load_trace  # noqa: E402
from bench.sim.worker import Delays  # noqa: E402
from core.config import RouterConfig, load_config  # noqa: E402
from router.routing.cost_model import CostProfile, resolve_profile  # noqa: E402

POLICIES = ("kv_aware", "cache_aware", "power_of_two", "least_load", "round_robin")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, help="Mooncake-format JSONL trace")
    p.add_argument("--workers", type=int, nargs="+", default=[8])
    p.add_argument("--cache-blocks", type=int, default=5000, help="KV blocks per worker")
    p.add_argument("--block-size", type=int, default=512,
                   help="tokens per block (the trace's: 512 for Mooncake)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--profile", default="h100-8b",
                   help="simulated truth: h100-8b, a built-in router profile, a profile JSON "
                        "or an engine-bench result")
    p.add_argument("--policy-profile", default=None,
                   help="kv_aware's profile (default: the truth's curves / --perturb)")
    p.add_argument("--perturb", type=float, default=1.2,
                   help="truth / router cost ratio when --policy-profile is not given")
    p.add_argument("--noise", type=float, default=0.1, help="lognormal sigma of step times")
    p.add_argument("--attention-context", type=float, default=None,
                   help="context tokens at which attention doubles a prefill token's cost "
                        "(h100-8b: 32768; <= 0 turns it off)")
    p.add_argument("--kv-read-s-per-token", type=float, default=None,
                   help="decode seconds per context token read (h100-8b: 131072 B / 3 TB/s)")
    p.add_argument("--event-delay", type=float, default=0.1, help="KV event delay, s")
    p.add_argument("--load-interval", type=float, default=0.1, help="load report period, s")
    p.add_argument("--load-delay", type=float, default=0.01, help="load report delay, s")
    p.add_argument("--config", help="YAML config; its router section sets the policies")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a router setting, e.g. load_cap=1.5 (repeatable)")
    p.add_argument("--limit", type=int, help="replay only the first N requests")
    p.add_argument("--speed", type=float, default=1.0, help="arrival speed-up factor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/routing_sim.json")
    return p.parse_args(argv)


def router_settings(config: str | None, sets: list[str]) -> RouterConfig:
    overrides: dict[str, Any] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set needs KEY=VALUE, not {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return load_config(config, env={}, overrides={"router": overrides}).router


def policy_profile(args: argparse.Namespace, truth: CostProfile) -> CostProfile:
    if args.policy_profile:
        return resolve_profile(args.policy_profile)
    return scaled(truth, 1 / args.perturb, f"{truth.name} / {args.perturb:g} (router's view)")


# Filled in the parent before the pool forks, so runs share the parsed trace.
_STATE: dict[str, Any] = {}


def run_one(workers: int, policy: str) -> tuple[int, str, dict[str, Any]]:
    args, requests = _STATE["args"], _STATE["requests"]
    started = time.process_time()
    sim = Simulation(requests, policy_name=policy, workers=workers,
                     cache_blocks=args.cache_blocks, block_size=args.block_size,
                     service=_STATE["service"], policy_profile=_STATE["policy_profile"],
                     settings=_STATE["settings"], delays=_STATE["delays"], seed=args.seed)
    result = summarise(sim.run(), _STATE["ideal"])
    result["cpu_s"] = round(time.process_time() - started, 1)
    return workers, policy, result


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    requests: list[TraceRequest] = load_trace(args.trace, limit=args.limit, speed=args.speed)
    service = make_service(args.profile, noise_sigma=args.noise,
                           attention_context_tokens=args.attention_context,
                           kv_read_s_per_token=args.kv_read_s_per_token)
    settings = router_settings(args.config, args.set)
    _STATE.update(args=args, requests=requests, service=service, settings=settings,
                  policy_profile=policy_profile(args, service.profile),
                  delays=Delays(args.event_delay, args.load_interval, args.load_delay),
                  ideal=ideal_hit_ratio(requests))
    runs = [(w, p) for w in args.workers for p in args.policies]
    by_workers: dict[str, dict[str, Any]] = {str(w): {} for w in args.workers}
    started = time.monotonic()

    def done(workers: int, policy: str, result: dict[str, Any]) -> None:
        by_workers[str(workers)][policy] = result
        print(f"workers={workers:3d} {policy:13s} hit={result['hit_ratio']:.3f} "
              f"ttft p50={result['ttft_p50']:.3f}s p99={result['ttft_p99']:.2f}s "
              f"load max/mean={result['load_max_over_mean']:.2f} "
              f"prefill max/mean={result['prefill_max_over_mean']:.2f} "
              f"({result['cpu_s']:.0f} s CPU)", flush=True)

    if args.jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(run_one, w, p) for w, p in runs]:
                done(*future.result())
    else:
        for w, p in runs:
            done(*run_one(w, p))
    for w in by_workers:  # stable order: as asked
        by_workers[w] = {p: by_workers[w][p] for p in args.policies}
    out: dict[str, Any] = {
        "trace": str(args.trace), "requests": len(requests),
        "ideal_hit_ratio": round(_STATE["ideal"], 4),
        "settings": {
            "workers": args.workers, "cache_blocks": args.cache_blocks,
            "block_size": args.block_size, "truth": service.profile.to_json(),
            "noise_sigma": service.noise_sigma,
            "attention_context_tokens": service.attention_context_tokens,
            "kv_read_s_per_token": service.kv_read_s_per_token,
            "policy_profile": _STATE["policy_profile"].to_json(),
            "delays": vars(_STATE["delays"]), "router": settings.model_dump(),
            "speed": args.speed, "seed": args.seed},
        "by_workers": by_workers,
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "load_average": os.getloadavg(), "git_commit": git_commit(),
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": " ".join(sys.argv), "total_wall_s":
                        round(time.monotonic() - started, 1)},
    }
    if len(args.workers) == 1:
        out["policies"] = by_workers[str(args.workers[0])]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    table = markdown(by_workers, _STATE["ideal"])
    args.out.with_suffix(".md").write_text(
        f"# Routing simulation: {Path(args.trace).name}\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
