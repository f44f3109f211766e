"""Routing on a real cluster: the policies side by side, each behind its own fresh
``electron-serve up`` (N SmolLM2 workers, the router), under the same two workloads.

    python bench/routing_real.py                                  # ~12 min on 2 cores
    python bench/routing_real.py --policies kv_aware round_robin least_load
    python bench/routing_real.py --quick --out /tmp/routing-real.json   # smoke run

For each policy: start the cluster (``--policy P``, its log captured), wait until every
worker is connected to the router, then run with ``bench/loadgen.py``:

1. ``shared-prefix``: ``--groups`` system prompts of ~``--system-tokens`` tokens, each with
   ``--questions`` short questions, Poisson at ``--shared-rate``. The KV cache per worker
   (``--kv-cache-mb``) holds a few groups' prefixes, not all of them: a policy that scatters
   a group over every worker recomputes it; one that keeps each group on one worker does not.
2. ``unique``: prompts sharing nothing, arriving faster than the cluster serves them
   (``--unique-rate``, at most ``--unique-concurrency`` in flight): throughput when nothing
   can be cached.

(Before them, 2 short unique requests per worker warm the workers up, unmeasured.) Then
stop the cluster (SIGINT: the launcher stops workers and Ray). The routing decisions in
the router's log give each request's worker. Both workloads are seeded, so every policy gets
the same requests. The ideal cached-token ratio of the shared-prefix workload (one infinite
cache, in arrival order) comes from tokenizing its requests with the model's chat template,
as the router does.

Targets (the issue): kv_aware's shared-prefix TTFT p50 <= 0.5 x round_robin's, its cached-token
ratio >= 0.9 x the ideal, and its unique-prompt output tokens/s >= 0.95 x least_load's.
Writes the JSON, a Markdown summary (``.md``) and PNGs (latency CDFs per policy, per-worker
requests in flight) beside ``--out``. Run it on a quiet machine: ``machine.load_average``
records how busy it was.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from bench import loadgen  # noqa: E402
from tests.support.serving import stop_process_group  # noqa: E402

POLICIES = ("kv_aware", "round_robin", "least_load", "power_of_two", "cache_aware")
CONNECTED = "connected (max_model_len"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--kv-cache-mb", type=int, default=40,
                   help="per worker (SmolLM2 bf16: 0.35 MiB per 16-token block)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=512)
    p.add_argument("--questions", type=int, default=8, help="per group")
    p.add_argument("--question-tokens", type=int, default=12)
    p.add_argument("--shared-rate", type=float, default=1.0, help="requests/s")
    p.add_argument("--unique-requests", type=int, default=40)
    p.add_argument("--unique-tokens", type=int, default=256)
    p.add_argument("--unique-rate", type=float, default=4.0, help="requests/s")
    p.add_argument("--unique-concurrency", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--router-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a router setting for every cluster, e.g. work_weight=6 "
                        "(passed as ELECTRON_ROUTER__KEY)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=240.0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 workers, 3 policies, small workloads")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/routing_real.json")
    args = p.parse_args(argv)
    if args.quick:
        args.workers, args.groups, args.questions = 2, 4, 3
        args.unique_requests, args.system_tokens = 8, 256
        args.policies = [p for p in args.policies if p in ("kv_aware", "round_robin",
                                                            "least_load")]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One ``electron-serve up`` in its own process group, its output in ``log_path``."""

    def __init__(self, args: argparse.Namespace, policy: str, log_path: Path):
        self.policy = policy
        self.log_path = log_path
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._args = args
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Cluster:
        a = self._args
        cli = Path(sys.executable).parent / "electron-serve"
        cmd = [str(cli), "up", "--workers", str(a.workers), "--policy", self.policy,
               "--model", a.model, "--kv-cache-mb", str(a.kv_cache_mb),
               "--torch-threads", str(a.torch_threads), "--port", str(self.port),
               "--log-level", "info"]
        # Auth off explicitly: this compares routing; limits would cut the workload short.
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "ELECTRON_AUTH__ENABLED": "false",
               "ELECTRON_ENGINE__MAX_MODEL_LEN": str(a.max_model_len)}
        for item in a.router_set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--router-set needs KEY=VALUE, not {item!r}")
            env[f"ELECTRON_ROUTER__{key.strip().upper()}"] = value
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          cwd=ROOT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._args.startup_timeout
        while self.log().count(CONNECTED) < self._args.workers:
            if self._proc.poll() is not None:
                raise RuntimeError(f"electron-serve exited ({self._proc.returncode}):\n"
                                   + self.log()[-3000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all {self._args.workers} workers connected within "
                                   f"{self._args.startup_timeout:g} s:\n" + self.log()[-3000:])
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGINT (a graceful stop of router, workers and Ray); its process group is killed
        if it has not exited after a minute."""
        if self._proc is not None:
            stop_process_group(self._proc)


def workloads(args: argparse.Namespace) -> dict[str, list[loadgen.Planned]]:
    return {
        "shared_prefix": loadgen.shared_prefix(
            groups=args.groups, system_tokens=args.system_tokens, questions=args.questions,
            question_tokens=args.question_tokens, rate=args.shared_rate,
            max_tokens=args.max_tokens, seed=args.seed),
        "unique": loadgen.unique(count=args.unique_requests, prompt_tokens=args.unique_tokens,
                                 rate=args.unique_rate, max_tokens=args.max_tokens,
                                 seed=args.seed),
    }


def run_policy(args: argparse.Namespace, policy: str, plans: dict[str, list[loadgen.Planned]],
               out_dir: Path) -> tuple[dict[str, Any], dict[str, list[loadgen.Result]]]:
    log_path = out_dir / f"{args.out.stem}.{policy}.log"
    started = time.monotonic()
    summaries: dict[str, Any] = {}
    results: dict[str, list[loadgen.Result]] = {}
    with Cluster(args, policy, log_path) as cluster:
        summaries["startup_s"] = round(time.monotonic() - started, 1)
        # Not measured: each worker's first forward passes (allocator, kernels) are slow.
        warmup = loadgen.unique(count=2 * args.workers, prompt_tokens=64, rate=0,
                                max_tokens=4, seed=args.seed + 1_000_003)
        res, _ = asyncio.run(loadgen.run(warmup, cluster.base_url,
                                         max_concurrency=args.workers, ignore_eos=True))
        failed = [r.error for r in res if r.error is not None]
        if failed:
            raise RuntimeError(f"warm-up requests failed: {failed[:3]}")
        for name, plan in plans.items():
            cap = args.unique_concurrency if name == "unique" else 0
            res, wall = asyncio.run(loadgen.run(plan, cluster.base_url, max_concurrency=cap,
                                                ignore_eos=True))
            results[name] = res
            summaries[name] = loadgen.summarise(res, wall)
            print(f"  {policy} {name}: {_line(summaries[name])}", flush=True)
        log = cluster.log()
    for name, res in results.items():
        known = loadgen.attribute_workers(res, log)
        per_worker: dict[str, int] = {}
        for r in res:
            if r.worker is not None:
                per_worker[r.worker] = per_worker.get(r.worker, 0) + 1
        summaries[name]["requests_per_worker"] = dict(sorted(per_worker.items()))
        summaries[name]["requests_with_known_worker"] = known
    return summaries, results


def _line(s: dict[str, Any]) -> str:
    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)
    return (f"ttft p50={f(s['ttft_s_p50'], '.3f')}s p99={f(s['ttft_s_p99'], '.3f')}s "
            f"out={f(s['output_tokens_per_s'], '.1f')} tok/s "
            f"cached={f(s['cached_token_ratio'], '.3f')} errors={s['errors']}")


def targets(policies: dict[str, Any], ideal: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kv = policies.get("kv_aware")
    if kv is None:
        return out
    rr, ll = policies.get("round_robin"), policies.get("least_load")
    if rr is not None and rr["shared_prefix"]["ttft_s_p50"]:
        ratio = kv["shared_prefix"]["ttft_s_p50"] / rr["shared_prefix"]["ttft_s_p50"]
        out["kv_ttft_p50_over_round_robin"] = {"value": ratio, "target": "<= 0.5",
                                               "pass": ratio <= 0.5}
    cached = kv["shared_prefix"]["cached_token_ratio"] or 0.0
    out["kv_cached_ratio_over_ideal"] = {"value": cached / ideal if ideal else None,
                                         "target": ">= 0.9",
                                         "pass": bool(ideal) and cached / ideal >= 0.9}
    if ll is not None and ll["unique"]["output_tokens_per_s"]:
        ratio = kv["unique"]["output_tokens_per_s"] / ll["unique"]["output_tokens_per_s"]
        out["kv_unique_throughput_over_least_load"] = {"value": ratio, "target": ">= 0.95",
                                                       "pass": ratio >= 0.95}
    return out


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"# Routing on a real cluster: {s['workers']} x {s['model']}", "",
             f"{report['machine']['date']}, load average before "
             f"{report['machine']['load_average_before']}, after "
             f"{report['machine']['load_average_after']}. Ideal cached-token ratio of the "
             f"shared-prefix workload: {report['ideal_cached_token_ratio']:.3f}.", ""]
    cols = (("ttft_s_p50", "TTFT p50 s", ".3f"), ("ttft_s_p90", "TTFT p90 s", ".3f"),
            ("ttft_s_p99", "TTFT p99 s", ".3f"), ("itl_s_p50", "ITL p50 s", ".3f"),
            ("e2e_s_p50", "E2E p50 s", ".3f"), ("e2e_s_p99", "E2E p99 s", ".3f"),
            ("requests_per_s", "req/s", ".2f"), ("output_tokens_per_s", "out tok/s", ".1f"),
            ("cached_token_ratio", "cached ratio", ".3f"), ("errors", "errors", "d"))
    for workload in ("shared_prefix", "unique"):
        lines += [f"## {workload}", "", "| policy | " + " | ".join(c[1] for c in cols)
                  + " | requests per worker |", "|" + "---|" * (len(cols) + 2)]
        for policy, result in report["policies"].items():
            w = result[workload]
            cells = ["-" if w.get(k) is None else format(w[k], spec) for k, _, spec in cols]
            per = " ".join(str(v) for v in w.get("requests_per_worker", {}).values())
            lines.append(f"| {policy} | " + " | ".join(cells) + f" | {per} |")
        lines.append("")
    lines += ["## Targets", "", "| target | value | bound | pass |", "|---|---|---|---|"]
    for name, t in report["targets"].items():
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"| {name} | {value} | {t['target']} | {'yes' if t['pass'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = workloads(args)
    encode = loadgen.chat_encoder(args.model)
    ideal = loadgen.ideal_cached_ratio(plans["shared_prefix"], encode, block_size=16)
    load_before = os.getloadavg()
    started = time.monotonic()
    policies: dict[str, Any] = {}
    all_results: dict[str, dict[str, list[loadgen.Result]]] = {}
    for policy in args.policies:
        print(f"{policy}: starting {args.workers} workers ...", flush=True)
        policies[policy], all_results[policy] = run_policy(args, policy, plans, out_dir)
    report: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "ideal_cached_token_ratio": ideal,
        "policies": policies,
        "targets": targets(policies, ideal),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "total_s": round(time.monotonic() - started, 1),
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": " ".join(sys.argv)},
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    stem = args.out.with_suffix("")
    for workload in ("shared_prefix", "unique"):
        loadgen.plot_latency_cdfs({p: r[workload] for p, r in all_results.items()},
                                  Path(f"{stem}.{workload}.cdf.png"),
                                  f"{workload}: {args.workers} workers, per policy")
    for policy, results in all_results.items():
        loadgen.plot_worker_load(results["shared_prefix"], Path(f"{stem}.{policy}.load.png"),
                                 f"shared_prefix, {policy}: requests in flight per worker")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
