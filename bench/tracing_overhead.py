"""Tracing overhead: throughput of the same stack with tracing off and at 100 % sampling.

    python bench/tracing_overhead.py [--rounds 5] [--requests 48] [--concurrency 8]
        [--max-tokens 16] [--prompt-tokens 64] [--out bench/results/tracing_overhead.json]

Two stacks run side by side, each a worker process (``AsyncEngine`` + ``serve_worker``, with
its ``/metrics``) and a router process (``create_app`` on uvicorn + uvloop, as
``electron-serve`` runs it): "off" has no ``OTEL_*`` variables (no tracer provider), "on"
exports every span (``parentbased_always_on``) over OTLP/gRPC to a real receiver, a third
process (the collector's TraceService, ``tests/support/otlp_receiver.py``). The model is the
tiny random-weight Llama with SmolLM2's tokenizer: model steps are cheap, so the per-request
work of the router and the worker, where spans cost, is most of the time (a worst case for
the ratio). The client is ``bench/loadgen.py``'s ``run`` (streamed requests, unique prompts,
all sent at once, ``--concurrency`` in flight).

One warm-up round per stack, then ``--rounds`` rounds. ``--mode concurrent`` (default) loads
both stacks at the same time, each with its own ``--concurrency`` streams, so that whatever
else runs on the shared machine hits both alike; they share the CPUs fairly, so the one that
needs more CPU per request completes fewer: throughput is counted over the window while both
were loaded (until the first finished its requests). ``--mode alternate`` measures them back
to back in alternating order instead (noisier here). Per round: the throughput ratio
(on / off) and the router's and worker's CPU milliseconds per request (from /proc, steadier
than throughput); the result is the median over the rounds. Target (issue 7): a throughput
drop of at most 5 %.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from bench import loadgen  # noqa: E402

MODEL = "electron"
_PR_SET_PDEATHSIG = 1


# -- the child processes ----------------------------------------------------------------------------

def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


async def _until_stdin_closes() -> None:
    await asyncio.to_thread(sys.stdin.read)


async def _worker(model_dir: str, dtype: str) -> None:
    from core.config import EngineConfig
    from core.telemetry import tracing_from_env
    from workers.engine.async_engine import AsyncEngine
    from workers.grpc_service import serve_worker
    from workers.metrics import WorkerMetrics

    tracing = tracing_from_env("electron-worker")  # before the server (docs/operations-notes.md)
    engine = AsyncEngine(EngineConfig(model=model_dir, dtype=dtype, device="cpu",
                                      kv_cache_bytes=64 * 2**20, max_model_len=1024,
                                      torch_threads=1), worker_id="w0", model_id=MODEL)
    metrics = WorkerMetrics(engine, "w0")
    engine.step_observer = metrics.observe_step
    server, port = await serve_worker(engine, "127.0.0.1", 0, model_id=MODEL, tracing=tracing,
                                      metrics=metrics)
    print(f"PORT {port} TRACING {int(tracing.enabled)}", flush=True)
    await _until_stdin_closes()
    await server.stop(None)
    engine.shutdown()
    tracing.shutdown()


async def _router(model_dir: str, worker_address: str) -> None:
    import uvicorn

    from core.config import load_config
    from core.endpoints import StaticWorkerSource, WorkerEndpoint
    from core.telemetry import tracing_from_env
    from router.api.app import create_app
    from router.api.server import listen_socket

    tracing = tracing_from_env("electron-router")
    # A real model on a loaded CPU may take long to start a request: no failover here.
    # Auth off explicitly: the two stacks differ in tracing only (the ledger still records).
    state = tempfile.mkdtemp(prefix="tracing-overhead-")
    config = load_config(env={}, overrides={
        "engine": {"model": model_dir}, "router": {"first_token_timeout_s": 600},
        "auth": {"enabled": False},
        "tenancy": {"sqlite_path": f"{state}/electron.db", "spool_path": f"{state}/spool"}})
    app = create_app(config, StaticWorkerSource(
        [WorkerEndpoint("w0", worker_address, MODEL, "default")]), tracing=tracing)
    sock = listen_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning",
                                           access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    print(f"PORT {sock.getsockname()[1]} TRACING {int(tracing.enabled)}", flush=True)
    await _until_stdin_closes()
    server.should_exit = True
    await task
    tracing.shutdown()


def _receiver() -> None:
    from tests.support.otlp_receiver import OtlpReceiver

    receiver = OtlpReceiver()
    print(f"PORT {receiver.start()} TRACING 0", flush=True)
    sys.stdin.read()
    print(f"SPANS {len(receiver.spans)}", flush=True)
    receiver.stop()


def child_main(role: str, args: list[str]) -> None:
    _die_with_parent()
    if role == "receiver":
        _receiver()
        return
    import uvloop

    run = _worker(*args) if role == "worker" else _router(*args)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run)


# -- the parent ---------------------------------------------------------------------------------

class Child:
    def __init__(self, role: str, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", role, *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("PORT"):
            self.proc.kill()
            raise RuntimeError(f"{role} failed to start: {line!r}")
        _, port, _, tracing = line.split()
        self.port, self.tracing = int(port), tracing == "1"

    def cpu_s(self) -> float:
        """User + system CPU seconds this process has used."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> str:
        """Closes stdin (the child stops) and returns what it printed after."""
        try:
            out, _ = self.proc.communicate(input="", timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


def _stack_env(receiver_port: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if receiver_port is not None:
        env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
                    "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                    "OTEL_TRACES_SAMPLER": "parentbased_always_on"})
    return env


async def _load(bases: dict[str, str], stacks: dict[str, tuple[Child, Child]],
                args: argparse.Namespace, seed: int) -> dict[str, dict[str, Any]]:
    """Loads the named stacks at once; each one's summary, CPU per request and its
    throughput over the window while all were loaded."""
    plan = loadgen.unique(count=args.requests, prompt_tokens=args.prompt_tokens, rate=1e6,
                          max_tokens=args.max_tokens, seed=seed)
    cpu_before = {name: [c.cpu_s() for c in stacks[name]] for name in bases}
    runs = await asyncio.gather(*(loadgen.run(plan, base, model=MODEL,
                                              max_concurrency=args.concurrency,
                                              ignore_eos=True) for base in bases.values()))
    window = min(max(r.finished_s or 0.0 for r in results) for results, _ in runs)
    out = {}
    for (name, base), (results, wall) in zip(bases.items(), runs):
        cpu = [c.cpu_s() - before for c, before in zip(stacks[name], cpu_before[name])]
        summary = loadgen.summarise(results, wall)
        if summary["errors"]:
            raise RuntimeError(f"{base}: {summary['error_samples']}")
        m = {k: summary[k] for k in ("duration_s", "output_tokens_per_s", "ttft_s_p50",
                                     "ttft_s_p99", "itl_s_p50", "e2e_s_p50")}
        done = sum(r.completion_tokens for r in results
                   if r.finished_s is not None and r.finished_s <= window)
        m["window_s"] = window
        m["window_output_tokens_per_s"] = done / window if window > 0 else None
        # Exporting included, except what a batch sends after the round ends.
        m["worker_cpu_ms_per_request"] = cpu[0] * 1000 / args.requests
        m["router_cpu_ms_per_request"] = cpu[1] * 1000 / args.requests
        out[name] = m
    return out


def _round(bases: dict[str, str], stacks: dict[str, tuple[Child, Child]],
           args: argparse.Namespace, seed: int, first: str) -> dict[str, Any]:
    if args.mode == "concurrent":
        measured = asyncio.run(_load(bases, stacks, args, seed))
        key = "window_output_tokens_per_s"
    else:
        order = (first, "on" if first == "off" else "off")
        measured = {name: asyncio.run(_load({name: bases[name]}, stacks, args, seed))[name]
                    for name in order}
        key = "output_tokens_per_s"
    return {"order": [first] if args.mode == "alternate" else ["both"], **measured,
            "throughput_key": key, "ratio_on_off": measured["on"][key] / measured["off"][key]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--mode", choices=("concurrent", "alternate"), default="concurrent")
    p.add_argument("--requests", type=int, default=48, help="requests per measurement")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                   help="tiny: random 2-layer Llama (router and span costs dominate); smollm2: "
                   "the embedded SmolLM2-135M-Instruct in float32, one torch thread")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/tracing_overhead.json")
    args = p.parse_args(argv)
    from tests.support.tiny_model import make_tiny_llama_dir

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    load_before = os.getloadavg()
    started = time.time()
    children: list[Child] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = (str(make_tiny_llama_dir(Path(tmp) / "tiny")) if args.model == "tiny"
                     else "smollm2-135m-instruct")
        try:
            receiver = Child("receiver", [], _stack_env(None))
            children.append(receiver)
            bases, stacks = {}, {}
            for name, port in (("off", None), ("on", receiver.port)):
                env = _stack_env(port)
                worker = Child("worker", [model_dir, "float32"], env)
                children.append(worker)
                router = Child("router", [model_dir, f"127.0.0.1:{worker.port}"], env)
                children.append(router)
                assert worker.tracing == router.tracing == (name == "on")
                bases[name] = f"http://127.0.0.1:{router.port}/v1"
                stacks[name] = (worker, router)
            _round(bases, stacks, args, seed=10_000, first="off")  # warm-up
            rounds = []
            for i in range(args.rounds):
                r = _round(bases, stacks, args, seed=i, first="off" if i % 2 == 0 else "on")
                rounds.append(r)
                key = r["throughput_key"]
                print(f"round {i}: off {r['off'][key]:.0f} tok/s "
                      f"{r['off']['router_cpu_ms_per_request']:.1f}+"
                      f"{r['off']['worker_cpu_ms_per_request']:.1f} ms CPU/request, on "
                      f"{r['on'][key]:.0f} tok/s {r['on']['router_cpu_ms_per_request']:.1f}+"
                      f"{r['on']['worker_cpu_ms_per_request']:.1f} ms, ratio "
                      f"{r['ratio_on_off']:.3f}", flush=True)
        finally:
            outputs = [c.stop() for c in reversed(children)]
    spans = next((int(line.split()[1]) for out in outputs for line in out.splitlines()
                  if line.startswith("SPANS")), 0)
    total = {name: sum(r[name][r["throughput_key"]] for r in rounds) for name in ("off", "on")}
    median_ratio = statistics.median(r["ratio_on_off"] for r in rounds)
    cpu = {f"{side}_cpu_ms_per_request_{name}": statistics.median(
        r[name][f"{side}_cpu_ms_per_request"] for r in rounds)
        for side in ("router", "worker") for name in ("off", "on")}
    result = {
        "command": command,
        "started": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "settings": vars(args) | {"out": str(args.out), "model_files": (
                                      "tiny random Llama (2 layers, hidden 64) with SmolLM2's "
                                      "tokenizer" if args.model == "tiny" else model_dir),
                                  "sampler": "parentbased_always_on",
                                  "exporter": "OTLP/gRPC, BatchSpanProcessor"},
        "spans_received": spans,
        "spans_per_request": spans / ((args.rounds + 1) * args.requests),
        "median_ratio_on_off": median_ratio,
        "total_ratio_on_off": total["on"] / total["off"],
        "throughput_drop_pct": round((1 - median_ratio) * 100, 2),
        **cpu,
        "cpu_per_request_ratio_on_off": (
            (cpu["router_cpu_ms_per_request_on"] + cpu["worker_cpu_ms_per_request_on"])
            / (cpu["router_cpu_ms_per_request_off"] + cpu["worker_cpu_ms_per_request_off"])),
        "target_drop_pct": 5.0,
        "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        with contextlib.suppress(KeyboardInterrupt):
            child_main(sys.argv[2], sys.argv[3:])
        sys.exit(0)
    sys.exit(main())
