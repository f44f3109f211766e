"""Router overhead: time to first token (TTFT), requests/s and router CPU per request through the
router against calling the worker's gRPC service directly: same worker, same tiny prompt,
kept-alive connections. Optionally the code of an older commit beside today's, in one run.

    python bench/router_overhead.py [--quick] [--out bench/results/router_overhead.json]
        [--concurrency 1 32] [--max-tokens 4 64] [--samples 200] [--rounds 8]
        [--processes 1 2] [--baseline-commit 87ea574] [--floor] [--model tiny]
        [--profile PREFIX]

Separate processes, so no two sides share a GIL or an event loop: the worker (AsyncEngine +
``serve_worker``; ``tiny`` is a random-weight 2-layer Llama with SmolLM2's tokenizer, so model
steps are cheap and the routing path shows), the routers and this one, the client. Both paths
send the worker the same GenerateRequest: the direct one is built by the router's own
``to_generate_request`` from the same body and the ids of ``Tokenizer.encode_chat`` (a preflight
checks that both return the same greedy text and prompt token count).

The paths, each measured in the same rounds:
- ``direct``: one ``grpc.aio`` channel to the worker (like the router's), one Generate per
  request.
- ``router_xN`` for each ``--processes`` N: ``electron-serve router --processes N``'s own
  supervisor (cluster/router_processes.py ``supervise``, with a static worker list instead of
  Ray's registry): N router processes, each listening on its own SO_REUSEPORT socket on one
  port, the kernel spreading the connections over them. Limits in Redis (``--redis-url``;
  auth is off, so no request makes a round trip to it). One kept-alive HTTP/1.1 connection
  per stream (a minimal client on asyncio streams, TCP_NODELAY, each request in one send),
  streaming /v1/chat/completions.
- ``baseline_xN`` with ``--baseline-commit C``: the code as of commit C, from a git worktree
  in .bench-baseline/ (same virtualenv), started by C's own bench/router_overhead.py harness
  (its worker and router children, run with C's tree first on PYTHONPATH): its own worker
  (the wire protocol may have changed since), its N router processes sharing one inherited
  listening socket (C has no --processes). No direct path: only its router CPU, TTFT and
  requests/s are compared.
- ``floor`` with ``--floor``: the router's HTTP server (uvicorn, uvloop, the router's
  connection settings) and its gRPC ``Session`` with a bare app that parses the body, sends
  the direct path's wire request and writes the router's SSE events (``_serve_floor``):
  what no router on this stack can skip. Its CPU per request over the baseline's is the
  least ratio a router built on this stack can reach.

- TTFT: request sent -> first message with text (direct) / first SSE delta with content
  (router). requests/s: finished requests / wall time of closed-loop bursts (C streams, each
  sending its next request when its last one finished).
- router added at pX = pX(router_x1) - pX(direct) (unpaired samples: a difference of
  percentiles).
- CPU of every process during each path's bursts: the client (this process), each router
  process, each worker (the sum of its threads' run time, /proc/PID/task/*/schedstat), so the
  router's CPU per request, requests per router CPU-second (at the highest concurrency: the
  router at saturation) and the worker's share are told apart, and the machine's load during
  the run is on record. The supervisor, which only polls its children, is not counted.
- The worker is kept from being the bottleneck by the tiny random model, small max_tokens and
  a whole burst prefilled in one step (max_num_batched_tokens 4096, 64 sequences); its CPU
  cores used per path are reported beside the routers'.

Warm-up rounds first; then rounds rotate which path goes first, so machine noise hits all.
Targets (issues 14 and 16): see ``judge``. The children stop with this process, also on Ctrl-C
or a failure (control pipe EOF, PR_SET_PDEATHSIG, terminate/kill).
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
from dataclasses import dataclass, field, replace
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
from tests.support.sockets import established  # noqa: E402

MODEL_ID = "electron"
PROMPT = [{"role": "user", "content": "Say hello."}]
TARGET_CONCURRENCY = 32
TARGETS_MS = {"p50": 2.0, "p99": 5.0}  # router-added TTFT at TARGET_CONCURRENCY streams
PERCENTILES = (50, 90, 99)
STARTUP_TIMEOUT_S = 300.0  # the worker imports torch and writes/loads the model
STOP_GRACE_S = 15.0
WORKER_BOUND_CORES = 0.8  # a worker using this much of a core limits requests/s itself
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
    worker_ports: tuple[int, ...] = ()  # the routers' workers
    processes: int = 1    # router processes (``router --processes``)
    redis_url: str = ""
    redis_prefix: str = ""


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
    from core.heap import settle_heap
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
        settle_heap()  # as the worker actor does once it serves (workers/actor.py)
        try:
            conn.send(("ready", {"port": port, "model_path": path}))
            await _serve_control(conn)
        finally:
            await server.stop(1.0)
    finally:
        engine.shutdown()


async def _serve_routers(conn: Any, spec: ChildSpec) -> None:
    """``electron-serve router --processes N``'s supervisor, with the worker given."""
    from cluster.router_processes import supervise
    from core.config import load_config
    from core.endpoints import StaticWorkerSource, WorkerEndpoint

    n = spec.processes
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the supervisor's banner, not ours
    # Auth off explicitly: this measures the serving path (the ledger still records).
    config = load_config(env={}, overrides={
        "engine": {"model": spec.model}, "auth": {"enabled": False},
        "router": {"host": "127.0.0.1", "port": 0, "processes": n},
        "tenancy": {"sqlite_path": f"{spec.model_dir}/router-x{n}.db",
                    "spool_path": f"{spec.model_dir}/router-x{n}.spool",
                    "redis_url": spec.redis_url, "redis_prefix": spec.redis_prefix}})
    workers = [WorkerEndpoint(f"bench-w{i}", f"127.0.0.1:{port}", MODEL_ID, "default")
               for i, port in enumerate(spec.worker_ports)]

    def on_ready(port: int, pids: list[int]) -> None:
        conn.send(("ready", {"port": port, "pids": pids}))

    routers = asyncio.create_task(supervise(config, "warning", StaticWorkerSource(workers),
                                            on_ready))
    control = asyncio.create_task(_serve_control(conn))
    await asyncio.wait({routers, control}, return_when=asyncio.FIRST_COMPLETED)
    control.cancel()
    if routers.done():
        routers.result()  # its error, else it stopped on its own
        raise RuntimeError("the router supervisor stopped")
    routers.cancel()  # stops its children (SIGTERM, then waits for them)
    await asyncio.gather(routers, return_exceptions=True)


async def _serve_floor(conn: Any, spec: ChildSpec) -> None:
    """The ``--floor`` path: the least a router on this stack does per request, to tell the
    cost of the stack itself from the router's own work. The router's HTTP server (uvicorn on
    uvloop, the router's connection settings) with a bare ASGI app and nothing else: per
    request it reads and parses the JSON body, sends the prebuilt wire request (the direct
    path's) on the router's own gRPC ``Session``, and writes each ready delta as one SSE
    chunk, the finish chunk, the usage chunk when asked and ``[DONE]`` (the router's writes).
    No validation, chat template, tokenizer, routing, limits, ledger, metrics, middleware or
    error handling: what no real router can skip is what is left."""
    import uvicorn

    from core.config import RouterConfig
    from core.model_files import resolve_model_path
    from core.tokenizer import Tokenizer
    from router.api.connections import uvicorn_settings
    from router.api.server import listen_socket
    from router.fleet.client import Session

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{spec.worker_ports[0]}",
                                        options=CHANNEL_OPTIONS)
    session = Session(pb_grpc.WorkerStub(channel), "bench-w0")
    ids = Tokenizer.from_model_path(resolve_model_path(spec.model)).encode_chat(PROMPT)
    bases: dict[int, pb.GenerateRequest] = {}
    head = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

    def event(payload: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw, more = b"", True
        while more:
            message = await receive()
            raw, more = raw + message.get("body", b""), message.get("more_body", False)
        body = orjson.loads(raw)
        max_tokens = body["max_tokens"]
        if max_tokens not in bases:
            bases[max_tokens] = to_generate_request(
                parse_chat_request(body, max_messages=200), request_id="unset",
                prompt_token_ids=ids, max_tokens=max_tokens, model=MODEL_ID)
        request = pb.GenerateRequest()
        request.CopyFrom(bases[max_tokens])
        request.request_id = "chatcmpl-" + uuid.uuid4().hex
        stream = session.open(request)
        chunk = {"id": request.request_id, "object": "chat.completion.chunk",
                 "created": int(time.time()), "model": MODEL_ID}
        out, started, completion = b"", False, 0
        async for message in stream:
            if message.HasField("progress"):
                continue
            delta = {"content": message.text}
            if completion == 0:
                delta = {"role": "assistant", **delta}
            completion += len(message.token_ids)
            out += event({**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                               "finish_reason": None}]})
            if message.finish_reason:
                out += event({**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                   "finish_reason": message.finish_reason}]})
            elif not stream.ready:  # one write for what is here together, as the router
                if not started:
                    await send({"type": "http.response.start", "status": 200,
                                "headers": head})
                    started = True
                await send({"type": "http.response.body", "body": out, "more_body": True})
                out = b""
        if (body.get("stream_options") or {}).get("include_usage"):
            out += event({**chunk, "choices": [], "usage": {
                "prompt_tokens": len(ids), "completion_tokens": completion,
                "total_tokens": len(ids) + completion}})
        if not started:
            await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": out + b"data: [DONE]\n\n",
                    "more_body": False})

    sock = listen_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning",
                                           **uvicorn_settings(RouterConfig())))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        conn.send(("ready", {"port": sock.getsockname()[1]}))
        await _serve_control(conn)
    finally:
        server.should_exit = True
        await task
        await session.close()
        await channel.close()


def floor_main(conn: Any, spec: ChildSpec) -> None:
    _child_main(conn, spec, _serve_floor, loop="uvloop")


def worker_main(conn: Any, spec: ChildSpec) -> None:
    _child_main(conn, spec, _serve_worker)


def routers_main(conn: Any, spec: ChildSpec) -> None:
    _child_main(conn, spec, _serve_routers)


class Child:
    """A spawned process and its control pipe; ``stop`` never leaves the process behind."""

    def __init__(self, name: str, target: Callable[[Any, ChildSpec], None], spec: ChildSpec,
                 daemon: bool = True):
        """``daemon``: False for the routers' supervisor, which has children of its own (they
        and it still stop with this process: PR_SET_PDEATHSIG)."""
        ctx = mp.get_context("spawn")  # never fork a process that may hold gRPC threads
        self.name = name
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child_conn, spec), name=name, daemon=daemon)
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


# -- the baseline: an older commit's worker and routers, from a git worktree --------------------

# Run with the old commit's tree first on PYTHONPATH (and as the working directory): it uses that
# commit's own bench harness (ChildSpec, Child, worker_main, router_main as they were at
# 87ea574), so every module its children import is the old one. Prints one JSON line when its
# processes serve; stops them when its stdin closes (this benchmark ended or died).
BASELINE_DRIVER = r"""
import json, os, sys, tempfile
from dataclasses import replace
import bench.router_overhead as b
try:
    from router.api.server import listen_socket
except ImportError:
    from router.middleware import listen_socket
want = json.loads(sys.argv[1])
children, sockets = [], []
with tempfile.TemporaryDirectory(prefix="router-overhead-baseline-") as tmp:
    try:
        spec = b.ChildSpec(os.getpid(), want["model"], tmp, want["device"],
                           want["worker_threads"], "auto", "uvloop")
        worker = b.Child("worker", b.worker_main, spec)
        children.append(worker)
        ready = worker.wait_ready()
        out = {"worker": {"port": ready["port"], "pid": worker.proc.pid}, "routers": {}}
        for n in want["processes"]:
            sock = listen_socket("127.0.0.1", 0)
            sockets.append(sock)
            rspec = replace(spec, model=ready["model_path"], worker_port=ready["port"],
                            listen=sock)
            mine = [b.Child(f"router {n}.{i}", b.router_main, rspec) for i in range(n)]
            children += mine
            for child in mine:
                child.wait_ready()
            out["routers"][str(n)] = {"port": sock.getsockname()[1],
                                      "pids": [c.proc.pid for c in mine]}
        print("BASELINE " + json.dumps(out), flush=True)
        sys.stdin.read()
    finally:
        for child in reversed(children):
            child.stop()
        for sock in sockets:
            sock.close()
"""


def baseline_tree(commit: str) -> tuple[Path, str]:
    """A git worktree of ``commit`` in .bench-baseline/ (made once, then reused)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    tree = ROOT / ".bench-baseline" / sha[:12]
    if not (tree / ".git").exists():
        tree.parent.mkdir(exist_ok=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), sha],
                       check=True, capture_output=True)
    return tree, sha


class Baseline:
    """The driver above in a process of its own; ``stop`` never leaves its children behind."""

    def __init__(self, commit: str, args: argparse.Namespace):
        self.tree, self.commit = baseline_tree(commit)
        want = {"model": args.model, "device": args.device,
                "worker_threads": args.worker_threads, "processes": args.processes}
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        self.proc = subprocess.Popen([sys.executable, "-c", BASELINE_DRIVER, json.dumps(want)],
                                     cwd=self.tree, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def wait_ready(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("BASELINE "):
                return json.loads(line.removeprefix("BASELINE "))
        raise RuntimeError(f"the baseline at {self.commit[:12]} exited (code "
                           f"{self.proc.wait()}) before serving")

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(STOP_GRACE_S * 2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- CPU of any process -----------------------------------------------------------

def cpu_s(pid: int) -> float:
    """CPU seconds of process ``pid``: its threads' run time (schedstat, in ns; a thread that
    has exited no longer counts, so read it over spans its threads outlive)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0.0
    for tid in tasks:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total / 1e9


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
        server closed this one (idle, or just as the request went out; a connection that
        sent nothing for ``router.request_read_timeout_s`` gets a 408 before it closes)."""
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
            if status and not status.startswith(b"HTTP/1.1 408"):
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

@dataclass(frozen=True)
class Route:
    """One path: how to send a request (stream i), and the processes that serve it."""
    name: str
    send: Callable[[int], Any]
    routers: tuple[str, ...]  # process names (keys of the pid table); none on the direct path
    workers: tuple[str, ...]


@dataclass
class PathRun:
    samples: list[Sample]
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)  # process name -> CPU s ("client")

    def add(self, other: PathRun) -> None:
        self.samples += other.samples
        self.wall_s += other.wall_s
        for name, seconds in other.cpu_s.items():
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + seconds


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {"client": time.process_time(), **{name: cpu_s(pid) for name, pid in pids.items()}}


async def burst(one: Callable[[int], Any], concurrency: int, per_stream: int, into: PathRun,
                pids: dict[str, int]) -> None:
    """C streams, each sending ``per_stream`` requests back to back."""
    async def stream(i: int) -> list[Sample]:
        return [await one(i) for _ in range(per_stream)]

    before, start = cpu_snapshot(pids), time.perf_counter()
    results = await asyncio.gather(*(stream(i) for i in range(concurrency)))
    into.wall_s += time.perf_counter() - start
    after = cpu_snapshot(pids)
    for name, seconds in after.items():
        into.cpu_s[name] = into.cpu_s.get(name, 0.0) + seconds - before[name]
    into.samples.extend(s for r in results for s in r)


def p50_ms(run: PathRun) -> float:
    return percentile(sorted(s.ttft_s * 1000 for s in run.samples), 50)


def summarize(run: PathRun, route: Route) -> dict[str, Any]:
    ttft = sorted(s.ttft_s * 1000 for s in run.samples)
    n = len(ttft)
    router_cpu = sum(run.cpu_s[name] for name in route.routers)
    worker_cpu = sum(run.cpu_s[name] for name in route.workers)
    return {
        "n": n, **{f"ttft_p{p}_ms": percentile(ttft, p) for p in PERCENTILES},
        "requests_per_s": n / run.wall_s,
        "router_cpu_ms_per_request": router_cpu * 1000 / n if route.routers else None,
        "requests_per_router_cpu_s": n / router_cpu if route.routers and router_cpu > 0
        else None,
        "worker_cpu_ms_per_request": worker_cpu * 1000 / n,
        "client_cpu_ms_per_request": run.cpu_s["client"] * 1000 / n,
        # CPU cores each process used while this path ran: the machine's load, process by
        # process (idle routers' background work included).
        "cores_used": {name: round(seconds / run.wall_s, 3)
                       for name, seconds in sorted(run.cpu_s.items())}}


async def compare(concurrency: int, args: argparse.Namespace, routes: list[Route],
                  pids: dict[str, int]) -> dict[str, Any]:
    per_stream = max(1, math.ceil(args.samples / (args.rounds * concurrency)))
    for _ in range(args.warmup):
        for route in routes:
            await burst(route.send, concurrency, per_stream, PathRun([]), pids)
    runs = {route.name: PathRun([]) for route in routes}
    added_per_round = []
    for r in range(args.rounds):
        shift = r % len(routes)  # each path goes first in turn
        this = {}
        for route in routes[shift:] + routes[:shift]:
            this[route.name] = PathRun([])
            await burst(route.send, concurrency, per_stream, this[route.name], pids)
            runs[route.name].add(this[route.name])
        added_per_round.append(round(p50_ms(this["router_x1"]) - p50_ms(this["direct"]), 3))
    paths = {route.name: summarize(runs[route.name], route) for route in routes}
    direct, router = paths["direct"], paths["router_x1"]
    return {"concurrency": concurrency, "rounds": args.rounds,
            "requests_per_stream_per_round": per_stream, "paths": paths,
            "router_added_ttft_ms": {f"p{p}": router[f"ttft_p{p}_ms"] - direct[f"ttft_p{p}_ms"]
                                     for p in PERCENTILES},
            "router_added_ttft_p50_ms_per_round": added_per_round}


async def measure(args: argparse.Namespace, layout: dict[str, dict[str, Any]],
                  worker_ports: list[int], prompt_ids: list[int], pids: dict[str, int],
                  worker: Child) -> dict[str, Any]:
    """``layout``: each router path's port, router process names and worker process names.
    The direct path sends stream i's requests to worker i mod N, one channel each."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
                for port in worker_ports]
    streams = {name: [HttpStream(spec["port"]) for _ in range(max(args.concurrency))]
               for name, spec in layout.items()}
    results: dict[str, Any] = {}
    preflight: dict[str, Any] = {}
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 30)
        stubs = [pb_grpc.WorkerStub(channel) for channel in channels]
        stub = stubs[0]
        for mine in streams.values():
            for s in mine:
                await s.connect()
        for max_tokens in args.max_tokens:
            body = {"model": MODEL_ID, "messages": PROMPT, "stream": True, "temperature": 0,
                    "max_tokens": max_tokens, "ignore_eos": True}
            base = to_generate_request(parse_chat_request(body, max_messages=200),
                                       request_id="unset", prompt_token_ids=prompt_ids,
                                       max_tokens=max_tokens, model=MODEL_ID)
            # The first request fills the prefix cache; compare two that both find it there
            # (cached and uncached prefill may round differently and flip a greedy pick).
            uncached = await direct_generate(stub, base)
            for other in stubs[1:]:  # every worker's prefix cache holds the prompt
                await direct_generate(other, base)
            direct = await direct_generate(stub, base)
            check = {"direct_text": direct.text, "uncached_direct_text": uncached.text}
            for name, spec in layout.items():
                routed = await streams[name][0].chat(http_request(
                    {**body, "stream_options": {"include_usage": True}}, spec["port"]))
                check[f"{name}_text"] = routed.text
                same = routed.text == direct.text and routed.prompt_tokens == len(prompt_ids)
                if not name.startswith("baseline") and not same:  # the baseline: its own worker
                    raise RuntimeError(f"{name} and direct do not send the worker the same: "
                                       f"{check}")
            preflight[str(max_tokens)] = check
            workers = tuple(f"worker.{i}" for i in range(len(stubs)))
            routes = [Route("direct", lambda i, base=base: direct_generate(
                stubs[i % len(stubs)], base), (), workers)]
            for name, spec in layout.items():
                request = http_request(body, spec["port"])
                routes.append(Route(name, lambda i, mine=streams[name], request=request:
                                    mine[i].chat(request), tuple(spec["routers"]),
                                    tuple(spec["workers"])))
            results[str(max_tokens)] = {}
            for c in args.concurrency:
                results[str(max_tokens)][str(c)] = r = await compare(c, args, routes, pids)
                print(format_result(max_tokens, r), flush=True)
        # while every connection is open
        connections = {name: [established(pids[p], spec["port"]) for p in spec["routers"]]
                       for name, spec in layout.items()}
        sockets = {"client": tcp_sockets(), "worker": worker.query("sockets")}
    finally:
        for mine in streams.values():
            for s in mine:
                await s.close()
        for channel in channels:
            await channel.close()
    return {"preflight": preflight, "results": results,
            "http_reconnects": sum(s.reconnects for mine in streams.values() for s in mine),
            "connections_per_router_process": connections,
            "tcp_nodelay": nodelay_report(sockets, worker_ports[0],
                                          {spec["port"] for spec in layout.values()})}


def nodelay_report(sockets: dict[str, list[dict[str, Any]]], worker: int,
                   routers: set[int]) -> dict[str, Any]:
    """TCP_NODELAY on the client's and the worker's connected sockets (listening ones send
    nothing). The router processes' own sockets are checked by
    tests/integration/test_router_worker.py (they are the supervisor's children here)."""
    hops = {
        "client_http_to_router": ("client", lambda s: s["peer_port"] in routers),
        "client_grpc_to_worker": ("client", lambda s: s["peer_port"] == worker),
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

def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_result(max_tokens: int, r: dict[str, Any]) -> str:
    n = next(iter(r["paths"].values()))["n"]
    lines = [f"max_tokens {max_tokens}, concurrency {r['concurrency']}: {n} requests per path "
             f"({r['rounds']} rounds x {r['concurrency']} streams x "
             f"{r['requests_per_stream_per_round']})",
             f"  {'TTFT ms':<14}{'p50':>8}{'p90':>8}{'p99':>8}{'req/s':>9}{'router':>9}"
             f"{'req/rCPUs':>10}{'worker':>8}{'client':>8}   (CPU ms/request; req per router "
             "CPU-second)"]
    for name, s in r["paths"].items():
        lines.append(f"  {name:<14}{s['ttft_p50_ms']:>8.2f}{s['ttft_p90_ms']:>8.2f}"
                     f"{s['ttft_p99_ms']:>8.2f}{s['requests_per_s']:>9.1f}"
                     f"{_num(s['router_cpu_ms_per_request'], '.2f'):>9}"
                     f"{_num(s['requests_per_router_cpu_s'], '.0f'):>10}"
                     f"{s['worker_cpu_ms_per_request']:>8.2f}"
                     f"{s['client_cpu_ms_per_request']:>8.2f}")
    a = r["router_added_ttft_ms"]
    lines.append(f"  {'added (x1)':<14}{a['p50']:>+8.2f}{a['p90']:>+8.2f}{a['p99']:>+8.2f}")
    lines.append(f"  added p50 per round: {r['router_added_ttft_p50_ms_per_round']}")
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def headline(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per max_tokens and concurrency: router CPU per request of each path, current over
    baseline, requests/s with 2 processes over 1, the added TTFT, requests per router
    CPU-second at the highest concurrency (the routers at saturation)."""
    out: dict[str, Any] = {}
    for max_tokens, by_c in results.items():
        rows: dict[str, Any] = {}
        for c, r in by_c.items():
            paths = r["paths"]
            row: dict[str, Any] = {
                "router_cpu_ms_per_request": {name: p["router_cpu_ms_per_request"]
                                              for name, p in paths.items() if name != "direct"},
                "requests_per_s": {name: p["requests_per_s"] for name, p in paths.items()},
                "requests_per_router_cpu_s": {name: p["requests_per_router_cpu_s"]
                                              for name, p in paths.items() if name != "direct"},
                "router_added_ttft_ms": {k: r["router_added_ttft_ms"][k] for k in ("p50", "p99")},
                # the busiest worker process of each path: a worker's engine loop saturates
                # at about one core
                "worker_cores": {name: max(v for k, v in p["cores_used"].items()
                                           if k.startswith(worker_of(name)))
                                 for name, p in paths.items()}}
            for n in args.processes:
                cur, base = paths.get(f"router_x{n}"), paths.get(f"baseline_x{n}")
                if cur and base:
                    row[f"router_cpu_current_over_baseline_x{n}"] = _ratio(
                        cur["router_cpu_ms_per_request"], base["router_cpu_ms_per_request"])
            floor, base = paths.get("floor"), paths.get("baseline_x1")
            if floor and base:  # the least this stack allows, against the baseline
                row["floor_cpu_over_baseline_x1"] = _ratio(
                    floor["router_cpu_ms_per_request"], base["router_cpu_ms_per_request"])
            for side in ("router", "baseline"):
                one, two = paths.get(f"{side}_x1"), paths.get(f"{side}_x2")
                if one and two:
                    row[f"{side}_requests_per_s_x2_over_x1"] = _ratio(
                        two["requests_per_s"], one["requests_per_s"])
            rows[c] = row
        out[max_tokens] = rows
    return out


def worker_of(path: str) -> str:
    """The name of the worker process behind a path."""
    return "baseline_worker" if path.startswith("baseline") else "worker."


def judge(summary: dict[str, Any]) -> tuple[dict[str, Any], bool | None]:
    """The issues' targets that this run measured (issue 14: added TTFT at 32 streams; issue
    16: router CPU against the baseline, added TTFT at 1 stream, 2 processes over 1)."""
    def at(max_tokens: int, c: int) -> dict[str, Any] | None:
        return summary.get(str(max_tokens), {}).get(str(c))

    checks = []  # (name, max_tokens, concurrency, measured, bound, at most?)
    for max_tokens, bound in ((4, 0.3), (64, 0.4)):
        row = at(max_tokens, TARGET_CONCURRENCY)
        if row and "router_cpu_current_over_baseline_x1" in row:
            checks.append((f"router_cpu_vs_baseline_{max_tokens}_tokens", max_tokens,
                           TARGET_CONCURRENCY, row["router_cpu_current_over_baseline_x1"],
                           bound, True))
    if row := at(4, 1):
        checks.append(("router_added_ttft_p50_ms_1_stream", 4, 1,
                       row["router_added_ttft_ms"]["p50"], 1.0, True))
    if row := at(4, TARGET_CONCURRENCY):
        for p, bound in TARGETS_MS.items():
            checks.append((f"router_added_ttft_{p}_ms", 4, TARGET_CONCURRENCY,
                           row["router_added_ttft_ms"][p], bound, True))
        if "router_requests_per_s_x2_over_x1" in row:
            checks.append(("requests_per_s_2_processes_over_1", 4, TARGET_CONCURRENCY,
                           row["router_requests_per_s_x2_over_x1"], 1.6, False))
            worker_cores = row["worker_cores"]["router_x2"]
    targets = {name: {"max_tokens": mt, "concurrency": c, "bound": bound,
                      "measured": measured, "kind": "at most" if at_most else "at least",
                      "pass": measured <= bound if at_most else measured >= bound}
               for name, mt, c, measured, bound, at_most in checks}
    if "requests_per_s_2_processes_over_1" in targets:
        # Meaningful only where the worker has room: its engine loop saturates at ~1 core.
        targets["requests_per_s_2_processes_over_1"].update(
            busiest_worker_cores=worker_cores,
            worker_bound=worker_cores >= WORKER_BOUND_CORES)
    return targets, all(t["pass"] for t in targets.values()) if targets else None


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
                   "(default 200; --quick 32)")
    p.add_argument("--rounds", type=int, help="rotating rounds (default 8; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds per path")
    p.add_argument("--max-tokens", type=int, nargs="+", default=[4, 64])
    p.add_argument("--model", default="tiny",
                   help="'tiny' (random weights) or a model name/path the engine takes")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--worker-threads", type=int, default=1, help="the worker's torch threads")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes behind today's routers (the baseline's harness runs "
                   "one): more keep the worker from being the bottleneck on a machine with "
                   "cores to spare")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                   help="router process counts to measure (`router --processes N`); 1 is "
                   "always among them")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                   help="the Redis that router processes share (more than one needs it)")
    p.add_argument("--baseline-commit", metavar="COMMIT",
                   help="also measure the code as of COMMIT (a git worktree in .bench-baseline/; "
                   "the issue's baseline is 87ea574)")
    p.add_argument("--floor", action="store_true",
                   help="also measure the floor path: the router's HTTP server and gRPC "
                   "session with a bare app (what no router on this stack can skip)")
    p.add_argument("--profile", type=Path, metavar="PREFIX",
                   help="sample the first router process with py-spy during the measured "
                   "bursts; writes PREFIX.collapsed (folded stacks) and PREFIX.top.txt")
    args = p.parse_args(argv)
    args.samples = args.samples or (32 if args.quick else 200)
    args.rounds = args.rounds or (2 if args.quick else 8)
    args.processes = sorted({1, *args.processes})
    if min([*args.concurrency, args.samples, args.rounds, *args.max_tokens,
            *args.processes, args.workers]) < 1:
        p.error("--concurrency, --samples, --rounds, --max-tokens, --processes, --workers "
                "must be positive")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from core.model_files import resolve_model_path
    from core.tokenizer import Tokenizer

    started, t0, facts = dt.datetime.now(dt.timezone.utc), time.monotonic(), machine()
    children: dict[str, Child] = {}
    baseline: Baseline | None = None
    pids: dict[str, int] = {}    # every process measured, by name
    layout: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="router-overhead-") as tmp:
        try:
            if args.baseline_commit:  # starts beside ours
                baseline = Baseline(args.baseline_commit, args)
            spec = ChildSpec(os.getpid(), args.model, tmp, args.device, args.worker_threads,
                             redis_url=args.redis_url,
                             redis_prefix=f"router-overhead-{uuid.uuid4().hex[:8]}")
            children["worker.0"] = Child("worker 0", worker_main, spec)
            worker = children["worker.0"].wait_ready()
            # The others load the model the first one wrote.
            spec = replace(spec, model=worker["model_path"])
            for i in range(1, args.workers):
                children[f"worker.{i}"] = Child(f"worker {i}", worker_main, spec)
            ports = [worker["port"]] + [children[f"worker.{i}"].wait_ready()["port"]
                                        for i in range(1, args.workers)]
            for i in range(args.workers):
                pids[f"worker.{i}"] = children[f"worker.{i}"].proc.pid  # type: ignore[assignment]
            spec = replace(spec, worker_ports=tuple(ports))
            for n in args.processes:
                children[f"router_x{n}"] = Child(f"router x{n}", routers_main,
                                                 replace(spec, processes=n), daemon=False)
            if args.floor:
                children["floor"] = Child("floor", floor_main, spec)
            for n in args.processes:
                ready = children[f"router_x{n}"].wait_ready()
                names = [f"router_x{n}.{i}" for i in range(n)]
                pids.update(zip(names, ready["pids"], strict=True))
                layout[f"router_x{n}"] = {"port": ready["port"], "routers": names,
                                          "workers": [f"worker.{i}"
                                                      for i in range(args.workers)]}
            if args.floor:
                ready = children["floor"].wait_ready()
                pids["floor"] = children["floor"].proc.pid  # type: ignore[assignment]
                layout["floor"] = {"port": ready["port"], "routers": ["floor"],
                                   "workers": ["worker.0"]}
            if baseline is not None:
                ready = baseline.wait_ready()
                pids["baseline_worker"] = ready["worker"]["pid"]
                for n in args.processes:
                    mine = ready["routers"][str(n)]
                    names = [f"baseline_x{n}.{i}" for i in range(n)]
                    pids.update(zip(names, mine["pids"], strict=True))
                    layout[f"baseline_x{n}"] = {"port": mine["port"], "routers": names,
                                                "workers": ["baseline_worker"]}
            ids = Tokenizer.from_model_path(resolve_model_path(worker["model_path"])) \
                .encode_chat(PROMPT)
            print(f"workers {ports} (model {args.model}); paths: direct, " + ", ".join(
                f"{name} :{spec['port']}" for name, spec in layout.items())
                + f"; prompt {len(ids)} tokens, max_tokens {args.max_tokens}", flush=True)
            with profiled(pids["router_x1.0"], args.profile):
                measured = asyncio.run(measure(args, layout, ports, ids, pids,
                                               children["worker.0"]))
        finally:  # the routers first: they hold channels to the worker
            if baseline is not None:
                baseline.stop()
            for name in sorted(children, key=lambda name: name.startswith("worker")):
                children[name].stop()
    summary = headline(measured["results"], args)
    targets, passed = judge(summary)
    facts["loadavg_at_end"] = os.getloadavg()
    return {
        "bench": "router_overhead", "command": shlex.join(["python", *sys.argv]),
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1), "machine": facts,
        "setup": {
            "model": args.model, "prompt": PROMPT, "prompt_tokens": len(ids),
            "max_tokens": args.max_tokens, "sampling": "greedy, ignore_eos",
            "worker": {"processes": args.workers, "baseline_processes": 1,
                       "device": args.device, "torch_threads": args.worker_threads,
                       "max_num_batched_tokens": WORKER_BATCHED_TOKENS, "max_num_seqs": 64},
            "router": {"processes": args.processes, "how": "cluster.router_processes."
                       "supervise (router --processes N): SO_REUSEPORT, a socket per process"},
            "baseline": None if baseline is None else {
                "commit": baseline.commit, "tree": str(baseline.tree),
                "how": "its own bench harness: its own worker, N router processes sharing one "
                       "inherited listening socket"},
            "pids": pids,
            "warmup_rounds": args.warmup, "rounds": args.rounds, "samples": args.samples,
            "ttft": "request sent -> first message with text (direct) / first SSE delta with "
                    "content (router)",
            "router_added": "pX(router_x1) - pX(direct), unpaired samples",
            "cpu": "each process's threads' run time (/proc/PID/task/*/schedstat) over the "
                   "path's bursts; this process's by time.process_time"},
        "summary": summary, "targets": targets, "pass": passed, **measured,
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
    print(f"connections per router process: {report['connections_per_router_process']}")
    for key, t in report["targets"].items():
        print(f"target {key} (max_tokens {t['max_tokens']}, {t['concurrency']} streams): "
              f"{t['measured']:.3f}, {t['kind']} {t['bound']}: "
              f"{'PASS' if t['pass'] else 'FAIL'}"
              + (f" (a worker used {t['busiest_worker_cores']:.2f} cores: worker-bound, try "
                 "--workers 2)" if t.get("worker_bound") else ""))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
