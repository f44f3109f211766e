"""Router overhead: time to first token (TTFT) and requests/s through the router against calling
the worker's gRPC service directly: same worker, same tiny prompt, kept-alive connections.

    python bench/router_overhead.py [--quick] [--out bench/results/router_overhead.json]
        [--concurrency 1 32] [--samples 400] [--rounds 8] [--max-tokens 4] [--model tiny]
        [--router-http auto|h11|httptools] [--router-loop uvloop|asyncio] [--routers 1]

Three processes, so no two sides share a GIL or an event loop: the worker (AsyncEngine +
``serve_worker``; ``tiny`` is a random-weight 2-layer Llama with SmolLM2's tokenizer, so model
steps are cheap and the routing path shows), the router (``create_app`` on uvicorn, TCP_NODELAY
listening socket, ``StaticWorkerSource``) and this one, the client. Both paths send the worker
the same GenerateRequest: the direct one is built by the router's own ``to_generate_request``
from the same body and the ids of ``Tokenizer.encode_chat`` (a preflight checks that both
return the same greedy text and prompt token count).

- direct: one ``grpc.aio`` channel to the worker (like the router's), one Generate per request.
- router: one kept-alive HTTP/1.1 connection per stream (a minimal client on asyncio streams,
  TCP_NODELAY, each request in one send), streaming /v1/chat/completions.
- TTFT: request sent -> first message with text (direct) / first SSE delta with content (router).
  requests/s: finished requests / wall time of closed-loop bursts (C streams, each sending its
  next request when its last one finished; an engine step finishes many at once, so arrivals
  come in bursts and the router serves them one after another on its event loop).
- router added at pX = pX(router) - pX(direct) (unpaired samples: a difference of percentiles).
- CPU ms per request of the router process(es) during each path's bursts (on the direct side:
  their background work, the worker's state stream) and of this client: less noisy than
  latency, and at C streams the median request waits behind about C/2 times the router's.

Warm-up rounds first; then rounds alternate which path goes first, so machine noise hits both.
Target (issue): added <= 2 ms at p50 and <= 5 ms at p99 at 32 streams. The children stop with
this process, also on Ctrl-C or a failure (control pipe EOF, PR_SET_PDEATHSIG, terminate/kill).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import importlib.metadata
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from core.pb.electron.v1 import worker_pb2 as pb  # noqa: E402
from core.pb.electron.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402
from router.chat.wire import to_generate_request  # noqa: E402
from router.fleet.client import CHANNEL_OPTIONS  # noqa: E402
from router.openai.schemas import parse_chat_request  # noqa: E402

MODEL_ID = "electron"
PROMPT = [{"role": "user", "content": "Say hello."}]
TARGET_CONCURRENCY = 32
TARGETS_MS = {"p50": 2.0, "p99": 5.0}  # router-added TTFT at TARGET_CONCURRENCY streams
PERCENTILES = (50, 90, 99)
STARTUP_TIMEOUT_S = 300.0  # the worker imports torch and writes/loads the model
STOP_GRACE_S = 15.0
WORKER_BATCHED_TOKENS = 4096  # a whole burst's prompts prefill in one step: less engine noise
_PR_SET_PDEATHSIG = 1


def percentile(sorted_xs: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_xs) - 1) * p / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def tcp_sockets() -> list[dict[str, Any]]:
    """This process's TCP sockets and their TCP_NODELAY (gRPC core's too: they are plain fds)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # closed meanwhile (the listdir's own fd, for one)
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6) \
                    or sock.type != socket.SOCK_STREAM:
                continue
            try:
                peer: int | None = sock.getpeername()[1]
            except OSError:
                peer = None  # listening
            found.append({"local_port": sock.getsockname()[1], "peer_port": peer, "nodelay":
                          bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))})
    return found


# -- the child processes --------------------------------------------------------------------------

@dataclass(frozen=True)
class ChildSpec:
    parent_pid: int
    model: str            # "tiny", or a model name/path the engine takes
    model_dir: str        # where "tiny" is written
    device: str
    torch_threads: int
    router_http: str
    router_loop: str
    worker_port: int = 0  # the routers' worker
    listen: socket.socket | None = None  # the routers' shared listening socket


# What a child answers on its control pipe; anything else, or EOF, stops it.
QUERIES: dict[str, Callable[[], Any]] = {"sockets": tcp_sockets, "cpu_s": time.process_time}


async def _serve_control(conn: Any) -> None:
    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def on_message() -> None:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            message = "stop"
        if message in QUERIES:
            conn.send((message, QUERIES[message]()))
        else:
            loop.remove_reader(conn.fileno())
            stop.set()

    loop.add_reader(conn.fileno(), on_message)
    await stop.wait()


def _child_main(conn: Any, spec: ChildSpec, serve: Callable[[Any, ChildSpec], Any],
                loop: str = "asyncio") -> None:
    # Ctrl-C reaches the whole process group: the parent alone decides the shutdown order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":  # SIGTERM when the parent dies, even by SIGKILL
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != spec.parent_pid:  # it died before prctl took effect
        sys.exit(1)
    logging.basicConfig(level=logging.WARNING)
    try:
        factory = None
        if loop != "asyncio":
            import uvicorn.config
            factory = uvicorn.config.Config("unused:app", loop=loop).get_loop_factory()
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(conn, spec))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise


async def _serve_worker(conn: Any, spec: ChildSpec) -> None:
    from core.config import EngineConfig
    from workers.engine.async_engine import AsyncEngine
    from workers.grpc_service import serve_worker

    path = spec.model
    if spec.model == "tiny":
        from tests.support.tiny_model import make_tiny_llama_dir
        path = str(make_tiny_llama_dir(Path(spec.model_dir)))
    engine = AsyncEngine(EngineConfig(model=path, device=spec.device,
                                      torch_threads=spec.torch_threads, max_num_seqs=64,
                                      max_num_batched_tokens=WORKER_BATCHED_TOKENS,
                                      max_model_len=1024, kv_cache_bytes=256 * 2**20),
                         worker_id="bench-w0", model_id=MODEL_ID)
    try:
        server, port = await serve_worker(engine, "127.0.0.1", 0, model_id=MODEL_ID)
        try:
            conn.send(("ready", {"port": port, "model_path": path}))
            await _serve_control(conn)
        finally:
            await server.stop(1.0)
    finally:
        engine.shutdown()


async def _serve_router(conn: Any, spec: ChildSpec) -> None:
    import uvicorn

    from core.config import load_config
    from core.endpoints import StaticWorkerSource, WorkerEndpoint
    from router.api.app import create_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]
            yield  # SIGTERM and the pipe are _serve_control's

    # Auth off explicitly: this measures the serving path (the ledger still records).
    config = load_config(env={}, overrides={
        "engine": {"model": spec.model}, "auth": {"enabled": False},
        "tenancy": {"sqlite_path": f"{tempfile.gettempdir()}/router-overhead-{os.getpid()}.db",
                    "spool_path": f"{tempfile.gettempdir()}/router-overhead-{os.getpid()}.spool"}})
    worker = WorkerEndpoint("bench-w0", f"127.0.0.1:{spec.worker_port}", MODEL_ID, "default")
    app = create_app(config, StaticWorkerSource([worker]))
    sock = spec.listen
    assert sock is not None
    server = Server(uvicorn.Config(app, lifespan="on", log_level="warning",
                                   http=spec.router_http))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:  # uvicorn offers no awaitable for "started"
            if task.done():
                task.result()
                raise RuntimeError("uvicorn exited during startup")
            await asyncio.sleep(0.02)
        if not app.state.pool.ready:
            raise RuntimeError("the router did not connect to the worker")
        conn.send(("ready", {
            "http_protocol": server.config.http_protocol_class.__name__,
            "event_loop": type(asyncio.get_running_loop()).__module__}))
        await _serve_control(conn)
    finally:
        server.should_exit = True
        await task


def worker_main(conn: Any, spec: ChildSpec) -> None:
    _child_main(conn, spec, _serve_worker)


def router_main(conn: Any, spec: ChildSpec) -> None:
    # uvicorn picks a loop only in Server.run; the launcher, like this, awaits Server.serve in
    # a loop of its own (asyncio.run), so "asyncio" is what production runs today.
    _child_main(conn, spec, _serve_router, loop=spec.router_loop)


class Child:
    """A spawned process and its control pipe; ``stop`` never leaves the process behind."""

    def __init__(self, name: str, target: Callable[[Any, ChildSpec], None], spec: ChildSpec):
        ctx = mp.get_context("spawn")  # never fork a process that may hold gRPC threads
        self.name = name
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child_conn, spec), name=name, daemon=True)
        self.proc.start()
        child_conn.close()  # only the child holds its end: EOF there means "parent gone"

    def _receive(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.2):
            if not self.proc.is_alive():
                raise RuntimeError(f"the {self.name} exited (code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {self.name} did not answer within {timeout:g} s")
        kind, payload = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"the {self.name} failed:\n{payload}")
        return payload

    def wait_ready(self) -> dict[str, Any]:
        return self._receive(STARTUP_TIMEOUT_S)

    def query(self, name: str) -> Any:
        self.conn.send(name)
        return self._receive(10.0)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send("stop")
        self.proc.join(STOP_GRACE_S)
        for end in (self.proc.terminate, self.proc.kill):
            if self.proc.is_alive():
                end()
                self.proc.join(5.0)
        self.conn.close()


# -- the two clients ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    ttft_s: float
    total_s: float
    text: str
    prompt_tokens: int | None = None  # from the usage chunk, when one was asked for


class HttpStream:
    """One kept-alive HTTP/1.1 connection to the router, streaming chat completions."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reconnects = 0  # uvicorn closes connections idle for its keep-alive timeout (5 s)

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                        socket.TCP_NODELAY, 1)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def _send(self, request: bytes) -> tuple[float, bytes]:
        """(start time, status line), on a live connection: reconnects, untimed, when the
        server closed this one (idle, or just as the request went out)."""
        for _ in range(2):
            if self.reader is None or self.reader.at_eof():
                await self.close()
                await self.connect()
                self.reconnects += 1
            assert self.reader is not None and self.writer is not None
            start = time.perf_counter()
            try:
                self.writer.write(request)
                status = await self.reader.readline()
            except ConnectionError:
                status = b""
            if status:
                return start, status
            await self.close()
        raise RuntimeError("the router closed the connection twice without answering")

    async def chat(self, request: bytes) -> Sample:
        start, status = await self._send(request)
        reader = self.reader
        assert reader is not None
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip().lower()
        if not status.startswith(b"HTTP/1.1 200") \
                or headers.get(b"transfer-encoding") != b"chunked":
            body = await reader.read(int(headers.get(b"content-length", b"0")))
            raise RuntimeError(f"router answered {status!r}: {body[:500]!r}")
        ttft, texts, buffered, done, prompt_tokens = None, [], b"", False, None
        while size := int((await reader.readline()).split(b";")[0], 16):
            buffered += (await reader.readexactly(size + 2))[:-2]
            *events, buffered = buffered.split(b"\n\n")
            for event in events:
                if event == b"data: [DONE]":
                    done = True
                    continue
                chunk = orjson.loads(event.removeprefix(b"data: "))
                if "error" in chunk:
                    raise RuntimeError(f"error event from the router: {chunk['error']}")
                if chunk.get("usage"):
                    prompt_tokens = chunk["usage"]["prompt_tokens"]
                if chunk["choices"] and (content := chunk["choices"][0]["delta"].get("content")):
                    ttft = ttft or time.perf_counter() - start
                    texts.append(content)
        await reader.readline()  # the CRLF after the last chunk
        total = time.perf_counter() - start
        if headers.get(b"connection") == b"close":
            await self.close()
        if not done or ttft is None:
            raise RuntimeError("the stream ended without [DONE] or without content")
        return Sample(ttft, total, "".join(texts), prompt_tokens)


def http_request(body: dict[str, Any], port: int) -> bytes:
    payload = orjson.dumps(body)
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


async def direct_generate(stub: pb_grpc.WorkerStub, base: pb.GenerateRequest) -> Sample:
    request = pb.GenerateRequest()
    request.CopyFrom(base)
    request.request_id = "chatcmpl-" + uuid.uuid4().hex  # the router's id shape
    start = time.perf_counter()
    ttft, texts, finish = None, [], ""
    async for message in stub.Generate(request):
        if message.text:
            ttft = ttft or time.perf_counter() - start
            texts.append(message.text)
        finish = message.finish_reason or finish
    total = time.perf_counter() - start
    if finish not in ("stop", "length") or ttft is None:
        raise RuntimeError(f"direct Generate ended with {finish!r}, text {texts!r}")
    return Sample(ttft, total, "".join(texts))


# -- the measurement ------------------------------------------------------------------------------

@dataclass
class PathRun:
    samples: list[Sample]
    wall_s: float = 0.0
    client_cpu_s: float = 0.0
    router_cpu_s: float = 0.0


async def burst(one: Callable[[int], Any], concurrency: int, per_stream: int, into: PathRun,
                router_cpu_s: Callable[[], float]) -> None:
    """C streams, each sending ``per_stream`` requests back to back."""
    async def stream(i: int) -> list[Sample]:
        return [await one(i) for _ in range(per_stream)]

    router_cpu, client_cpu, start = router_cpu_s(), time.process_time(), time.perf_counter()
    results = await asyncio.gather(*(stream(i) for i in range(concurrency)))
    into.wall_s += time.perf_counter() - start
    into.client_cpu_s += time.process_time() - client_cpu
    into.router_cpu_s += router_cpu_s() - router_cpu
    into.samples.extend(s for r in results for s in r)


def summarize(run: PathRun) -> dict[str, Any]:
    ttft = sorted(s.ttft_s * 1000 for s in run.samples)
    n = len(ttft)
    return {"n": n, **{f"ttft_p{p}_ms": percentile(ttft, p) for p in PERCENTILES},
            "requests_per_s": n / run.wall_s, "client_cpu_ms_per_request":
            run.client_cpu_s * 1000 / n, "router_cpu_ms_per_request": run.router_cpu_s * 1000 / n}


async def compare(concurrency: int, args: argparse.Namespace,
                  paths: dict[str, Callable[[int], Any]],
                  router_cpu_s: Callable[[], float]) -> dict[str, Any]:
    per_stream = max(1, math.ceil(args.samples / (args.rounds * concurrency)))
    for _ in range(args.warmup):
        for one in paths.values():
            await burst(one, concurrency, per_stream, PathRun([]), router_cpu_s)
    runs = {name: PathRun([]) for name in paths}
    added_per_round = []
    for r in range(args.rounds):
        this = {name: PathRun([]) for name in paths}
        for name in (("direct", "router") if r % 2 == 0 else ("router", "direct")):
            await burst(paths[name], concurrency, per_stream, this[name], router_cpu_s)
            run = runs[name]
            run.samples += this[name].samples
            run.wall_s += this[name].wall_s
            run.client_cpu_s += this[name].client_cpu_s
            run.router_cpu_s += this[name].router_cpu_s
        p50 = {name: summarize(run)["ttft_p50_ms"] for name, run in this.items()}
        added_per_round.append(round(p50["router"] - p50["direct"], 3))
    direct, router = summarize(runs["direct"]), summarize(runs["router"])
    return {"concurrency": concurrency, "rounds": args.rounds,
            "requests_per_stream_per_round": per_stream, "direct": direct, "router": router,
            "router_added_ttft_ms": {f"p{p}": router[f"ttft_p{p}_ms"] - direct[f"ttft_p{p}_ms"]
                                     for p in PERCENTILES},
            "router_added_ttft_p50_ms_per_round": added_per_round,
            "requests_per_s_router_over_direct":
                router["requests_per_s"] / direct["requests_per_s"]}


async def measure(args: argparse.Namespace, ports: dict[str, int], prompt_ids: list[int],
                  children: dict[str, Child]) -> dict[str, Any]:
    body = {"model": MODEL_ID, "messages": PROMPT, "stream": True, "temperature": 0,
            "max_tokens": args.max_tokens, "ignore_eos": True}
    base = to_generate_request(parse_chat_request(body, max_messages=200), request_id="unset",
                               prompt_token_ids=prompt_ids, max_tokens=args.max_tokens,
                               model=MODEL_ID)
    request = http_request(body, ports["router"])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports['worker']}", options=CHANNEL_OPTIONS)
    streams = [HttpStream(ports["router"]) for _ in range(max(args.concurrency))]
    try:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = pb_grpc.WorkerStub(channel)
        for s in streams:
            await s.connect()
        # The first request fills the prefix cache; compare two that both find it there
        # (cached and uncached prefill may round differently and flip a greedy pick).
        uncached = await direct_generate(stub, base)
        direct = await direct_generate(stub, base)
        routed = await streams[0].chat(http_request(
            {**body, "stream_options": {"include_usage": True}}, ports["router"]))
        preflight = {"direct_text": direct.text, "router_text": routed.text,
                     "uncached_direct_text": uncached.text,
                     "same_text": direct.text == routed.text,
                     "same_prompt_tokens": routed.prompt_tokens == len(prompt_ids)}
        if not (preflight["same_text"] and preflight["same_prompt_tokens"]):
            raise RuntimeError(f"the two paths do not send the worker the same: {preflight}")
        paths = {"direct": lambda i: direct_generate(stub, base),
                 "router": lambda i: streams[i].chat(request)}
        results = {}
        for c in args.concurrency:
            results[str(c)] = await compare(c, args, paths, lambda: sum(
                child.query("cpu_s") for name, child in children.items() if name != "worker"))
            print(format_result(results[str(c)]), flush=True)
        sockets = {"client": tcp_sockets(), "router": [],  # while every connection is open
                   "worker": children["worker"].query("sockets")}
        accepted = []  # client connections each router process holds
        for name, child in children.items():
            if name != "worker":
                mine = child.query("sockets")
                sockets["router"] += mine
                accepted.append(sum(s["local_port"] == ports["router"] and s["peer_port"]
                                    is not None for s in mine))
    finally:
        for s in streams:
            await s.close()
        await channel.close()
    return {"preflight": preflight, "results": results,
            "http_reconnects": sum(s.reconnects for s in streams),
            "connections_per_router_process": accepted,
            "tcp_nodelay": nodelay_report(sockets, ports)}


def nodelay_report(sockets: dict[str, list[dict[str, Any]]],
                   ports: dict[str, int]) -> dict[str, Any]:
    """TCP_NODELAY on each hop's connected sockets (listening ones send nothing)."""
    router, worker = ports["router"], ports["worker"]
    hops = {
        "client_http_to_router": ("client", lambda s: s["peer_port"] == router),
        "client_grpc_to_worker": ("client", lambda s: s["peer_port"] == worker),
        "router_accepted_http": ("router", lambda s: s["local_port"] == router
                                 and s["peer_port"] is not None),
        "router_grpc_to_worker": ("router", lambda s: s["peer_port"] == worker),
        "worker_accepted_grpc": ("worker", lambda s: s["local_port"] == worker
                                 and s["peer_port"] is not None),
    }
    report: dict[str, Any] = {}
    for hop, (process, match) in hops.items():
        mine = [s for s in sockets[process] if match(s)]
        report[hop] = {"sockets": len(mine), "nodelay": sum(s["nodelay"] for s in mine)}
    report["all_set"] = all(h["sockets"] > 0 and h["nodelay"] == h["sockets"]
                            for h in report.values())
    return report


# -- the report -----------------------------------------------------------------------------------

def format_result(r: dict[str, Any]) -> str:
    lines = [f"concurrency {r['concurrency']}: {r['direct']['n']} requests per path "
             f"({r['rounds']} rounds x {r['concurrency']} streams x "
             f"{r['requests_per_stream_per_round']})",
             f"  {'TTFT ms':<8}{'p50':>8}{'p90':>8}{'p99':>8}{'req/s':>9}"
             f"   CPU ms/request: client, routers"]
    for name in ("direct", "router"):
        s = r[name]
        cpu = f"{s['router_cpu_ms_per_request']:.2f}" if name == "router" else ""
        lines.append(f"  {name:<8}{s['ttft_p50_ms']:>8.2f}{s['ttft_p90_ms']:>8.2f}"
                     f"{s['ttft_p99_ms']:>8.2f}{s['requests_per_s']:>9.1f}"
                     f"   {s['client_cpu_ms_per_request']:.2f} {cpu}")
    a = r["router_added_ttft_ms"]
    lines.append(f"  {'added':<8}{a['p50']:>+8.2f}{a['p90']:>+8.2f}{a['p99']:>+8.2f}"
                 f"{r['requests_per_s_router_over_direct']:>8.2f}x")
    lines.append(f"  added p50 per round: {r['router_added_ttft_p50_ms_per_round']}")
    return "\n".join(lines)


def judge(results: dict[str, Any]) -> tuple[dict[str, Any], bool | None]:
    r = results.get(str(TARGET_CONCURRENCY))
    if r is None:
        return {}, None
    targets = {f"router_added_ttft_{p}_ms": {
        "concurrency": TARGET_CONCURRENCY, "bound": bound,
        "measured": r["router_added_ttft_ms"][p], "pass": r["router_added_ttft_ms"][p] <= bound}
        for p, bound in TARGETS_MS.items()}
    return targets, all(t["pass"] for t in targets.values())


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {}
    for package in ("grpcio", "uvicorn", "fastapi", "starlette", "h11", "httptools", "uvloop",
                    "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "loadavg_at_start": os.getloadavg(), "versions": versions, "git_commit": commit}


# -- the profile ----------------------------------------------------------------------------------

@contextlib.contextmanager
def profiled(pid: int, prefix: Path | None):  # type: ignore[no-untyped-def]
    """py-spy samples process ``pid`` while the block runs (nothing when ``prefix`` is None);
    then the folded stacks and a top-25 table (self and inclusive samples per function) are
    written beside ``prefix``. Warm-up bursts and the direct path are inside the window too:
    the table is read as shares of the router's samples, which idle while the direct path
    runs (py-spy drops idle samples)."""
    if prefix is None:
        yield
        return
    prefix.parent.mkdir(parents=True, exist_ok=True)
    folded = prefix.with_suffix(".collapsed")
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                            str(pid), "--rate", "250", "--format", "raw", "--output",
                            str(folded), "--nonblocking"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=60)
    if not folded.exists():
        raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace')[-2000:]}")
    prefix.with_suffix(".top.txt").write_text(top_table(folded.read_text()))


def top_table(folded: str, rows: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's folded stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1] if " (" in f else f
                  for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    lines = [f"{total} samples (the router process, non-idle)", "",
             f"{'self %':>7}  function (file:line)"]
    lines += [f"{100 * n / total:7.1f}  {f}" for f, n in
              sorted(own.items(), key=lambda kv: -kv[1])[:rows]]
    lines += ["", f"{'incl %':>7}  function (file:line)"]
    lines += [f"{100 * n / total:7.1f}  {f}" for f, n in
              sorted(inclusive.items(), key=lambda kv: -kv[1])[:rows]]
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/router_overhead.json")
    p.add_argument("--quick", action="store_true", help="a small sample for a smoke run")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, TARGET_CONCURRENCY])
    p.add_argument("--samples", type=int, help="requests per path and concurrency, at least "
                   "(default 400; --quick 40)")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 8; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds per path")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--model", default="tiny",
                   help="'tiny' (random weights) or a model name/path the engine takes")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--worker-threads", type=int, default=1, help="the worker's torch threads")
    p.add_argument("--router-http", default="auto", choices=["auto", "h11", "httptools"])
    p.add_argument("--router-loop", default="uvloop", choices=["asyncio", "uvloop"],
                   help="the router process's event loop (electron-serve runs uvloop)")
    p.add_argument("--routers", type=int, default=1, help="router processes sharing the port "
                   "(what more of them buys; production runs one)")
    p.add_argument("--profile", type=Path, metavar="PREFIX",
                   help="sample the first router process with py-spy during the measured "
                   "bursts; writes PREFIX.collapsed (folded stacks) and PREFIX.top.txt")
    args = p.parse_args(argv)
    args.samples = args.samples or (40 if args.quick else 400)
    args.rounds = args.rounds or (2 if args.quick else 8)
    if min([*args.concurrency, args.samples, args.rounds, args.max_tokens, args.routers]) < 1:
        p.error("--concurrency, --samples, --rounds, --max-tokens, --routers must be positive")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from core.model_files import resolve_model_path
    from core.tokenizer import Tokenizer
    from router.api.server import listen_socket

    started, t0, facts = dt.datetime.now(dt.timezone.utc), time.monotonic(), machine()
    children: dict[str, Child] = {}
    # One socket, inherited by every router process: the kernel spreads connections over
    # them as over uvicorn's --workers. TCP_NODELAY on it passes to accepted connections.
    listen = listen_socket("127.0.0.1", 0)
    port = listen.getsockname()[1]
    listen_nodelay = bool(listen.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    with tempfile.TemporaryDirectory(prefix="router-overhead-") as tmp, listen:
        try:
            spec = ChildSpec(os.getpid(), args.model, tmp, args.device, args.worker_threads,
                             args.router_http, args.router_loop)
            children["worker"] = Child("worker", worker_main, spec)
            worker = children["worker"].wait_ready()
            spec = replace(spec, model=worker["model_path"], worker_port=worker["port"],
                           listen=listen)
            for i in range(args.routers):
                children[f"router{i}"] = Child(f"router {i}", router_main, spec)
            router = [children[f"router{i}"].wait_ready() for i in range(args.routers)][0]
            ids = Tokenizer.from_model_path(resolve_model_path(worker["model_path"])) \
                .encode_chat(PROMPT)
            print(f"worker :{worker['port']} (model {args.model}), {args.routers} router "
                  f"process(es) :{port} ({router['http_protocol']}, {router['event_loop']}); "
                  f"prompt {len(ids)} tokens, max_tokens {args.max_tokens}", flush=True)
            with profiled(children["router0"].proc.pid, args.profile):
                measured = asyncio.run(measure(
                    args, {"worker": worker["port"], "router": port}, ids, children))
        finally:  # the routers first: they hold channels to the worker
            for name in sorted(children, key=lambda name: name == "worker"):
                children[name].stop()
    targets, passed = judge(measured["results"])
    facts["loadavg_at_end"] = os.getloadavg()
    return {
        "bench": "router_overhead", "command": shlex.join(["python", *sys.argv]),
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1), "machine": facts,
        "setup": {
            "model": args.model, "prompt": PROMPT, "prompt_tokens": len(ids),
            "max_tokens": args.max_tokens, "sampling": "greedy, ignore_eos",
            "worker": {"device": args.device, "torch_threads": args.worker_threads,
                       "max_num_batched_tokens": WORKER_BATCHED_TOKENS},
            "router": {**router, "processes": args.routers,
                       "listening_socket_nodelay": listen_nodelay},
            "warmup_rounds": args.warmup, "rounds": args.rounds, "samples": args.samples,
            "ttft": "request sent -> first message with text (direct) / first SSE delta with "
                    "content (router)",
            "router_added": "pX(router) - pX(direct), unpaired samples"},
        **measured, "targets": targets, "pass": passed,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("interrupted: the worker and router were stopped", file=sys.stderr)
        return 130
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("TCP_NODELAY set: " + ", ".join(f"{hop} {h['nodelay']}/{h['sockets']}" for hop, h
                                          in report["tcp_nodelay"].items() if hop != "all_set"))
    for key, t in report["targets"].items():
        print(f"target {key} at {t['concurrency']} streams: {t['measured']:+.2f} <= "
              f"{t['bound']}: {'PASS' if t['pass'] else 'FAIL'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
