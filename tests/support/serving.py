"""A router app served by uvicorn on a real TCP_NODELAY socket, in the test's event loop;
and the graceful stop of an ``electron-serve`` process started in a session of its own."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from typing import Any

import uvicorn

from router.api.server import listen_socket


@dataclass
class Router:
    app: Any
    server: uvicorn.Server
    task: asyncio.Task
    base: str

    @property
    def pool(self):
        return self.app.state.pool

    def worker_ids(self) -> list[str]:
        return [w.worker_id for w in self.pool.workers()]


async def serve_router(app, *, send_buffer: int | None = None, **settings: Any) -> Router:
    """``send_buffer``: the SO_SNDBUF of every connection (None: the system's, which grows
    to megabytes), so a client that stops reading holds the router's writes soon;
    ``settings``: more ``uvicorn.Config`` arguments (``router.api.connections``' limits)."""
    sock = listen_socket("127.0.0.1", 0)
    if send_buffer is not None:  # accepted connections inherit the listener's
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning",
                                           **settings))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # uvicorn offers no awaitable for "started"
        assert not task.done(), "uvicorn exited during startup"
        await asyncio.sleep(0.01)
    return Router(app, server, task, f"http://127.0.0.1:{sock.getsockname()[1]}")


async def stop_router(router: Router, timeout_s: float = 60.0) -> None:
    """uvicorn's shutdown and the app's lifespan stop; past ``timeout_s`` the test fails with
    what every asyncio task was waiting on (a stop that hangs shows where at once)."""
    router.server.should_exit = True
    done, _ = await asyncio.wait([router.task], timeout=timeout_s)
    if not done:
        raise AssertionError(f"the router did not stop within {timeout_s:g} s; its tasks:\n"
                             + describe_tasks())
    await router.task


def describe_tasks() -> str:
    """Every task of the running loop and the frames it is suspended in."""
    lines = []
    for task in asyncio.all_tasks():
        lines.append(repr(task))
        lines.extend(f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}"
                     for frame in task.get_stack())
    return "\n".join(lines)


def stop_process_group(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGINT (``electron-serve``'s graceful stop of router, workers and Ray); the process
    group (started with ``start_new_session``) is killed if it has not exited in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
