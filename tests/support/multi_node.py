"""A real multi-node Ray on one machine: a head and worker nodes, each its own raylet with its
own resources (``ray.cluster_utils.Cluster``), under a temporary directory of its own; and a
node lost as a machine is lost (its raylet and every process under it SIGKILLed at once).

Ray's own node-death detector is tuned down (a health check every second, dead after 4
missed): the product's fleet replaces a lost node's workers once Ray reports their actors
dead, and Ray's defaults (5 missed checks of 3 s) would make each test wait ~15 s for that.
Tighter (0.3 s x 3) declared live nodes dead on this busy two-core machine.

With ``fault_tolerant`` the GCS keeps its tables in Redis (GCS fault tolerance: the local
Redis of tests/support/tenancy.py, under a key namespace of its own, deleted afterwards) on a
fixed port, and ``restart_head`` replaces the head node (its GCS, its raylet and what runs
there) with a new one, as a restarted head pod does. Each worker node has a temporary
directory of its own, as a machine has, so the test's process can join the cluster through
a worker node (``driver_on``) and outlive the head.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import ray
from ray.cluster_utils import Cluster

from cluster.launcher import prepare_ray_environment
from core.endpoints import HEAD_RESOURCE
from tests.support.environ import SavedEnviron
from tests.support.tenancy import REDIS_URL

T = TypeVar("T")
START_ATTEMPTS = 2  # a node (head or worker) whose raylet missed registration: once more
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                   "health_check_timeout_ms": 1000, "health_check_failure_threshold": 4}


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first, then theirs)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class MultiNode:
    """The head (no CPU, the ``electron_head`` resource: the registry lives there, and this
    process, the router's, unless it joins through a worker node) and worker nodes added by
    name."""

    def __init__(self, temp_dir: Path, *, fault_tolerant: bool = False):
        self._temp_dir = temp_dir
        prepare_ray_environment()  # PYTHONPATH for every node's worker processes
        self._head_args: dict[str, Any] = dict(
            num_cpus=0, resources={HEAD_RESOURCE: 1}, include_dashboard=False,
            temp_dir=str(temp_dir / "head"), _system_config=FAST_NODE_DEATH)
        self._fault_tolerant = fault_tolerant
        self.cluster = self._start_cluster()
        self.nodes: dict[str, Any] = {}

    def _start_cluster(self) -> Cluster:
        """The cluster and its head (``started_once_more``: a fault-tolerant head's GCS on
        Redis is the slow one; a retry starts it on a new port, from empty tables)."""
        def start() -> Cluster:
            if self._fault_tolerant:
                self._head_args["gcs_server_port"] = free_port()
            return Cluster(initialize_head=True, connect=False, head_node_args=self._head_args)

        def before_retry() -> None:
            if self._fault_tolerant:
                _drop_storage(os.environ["RAY_external_storage_namespace"])

        return started_once_more(start, self._temp_dir, before_retry)

    @property
    def address(self) -> str:
        return self.cluster.address

    def temp_dir(self, name: str) -> str:
        return str(self._temp_dir / name)

    def add_node(self, name: str, num_cpus: float, **resources: float) -> str:
        """Starts a worker node (its own raylet; ``started_once_more``); returns its Ray node
        id."""
        node = started_once_more(
            lambda: self.cluster.add_node(num_cpus=num_cpus, resources=resources or None,
                                          temp_dir=self.temp_dir(name)),
            Path(self.temp_dir(name)))
        self.nodes[name] = node
        return node.node_id

    def restart_head(self) -> str:
        """SIGKILLs the head node's processes (GCS, raylet, the actors there), then starts a
        new head on the same GCS port (fault tolerant: it reads the cluster back from
        Redis); returns the new head's node id."""
        self.cluster.remove_node(self.cluster.head_node, allow_graceful=False)
        self.start_head()
        return self.cluster.head_node.node_id

    def start_head(self) -> None:
        """Starts the head again (after ``remove_node`` of the old one). It may run in a
        thread (the test's event loop keeps serving meanwhile): the new node installs no
        signal handler (``multi_node`` tears it down)."""
        self.cluster._shutdown_at_exit = False  # Node() would install signal handlers
        try:
            self.cluster.add_node(**self._head_args)
        finally:
            self.cluster._shutdown_at_exit = True

    def node_name(self, node_id: str) -> str:
        return next(name for name, node in self.nodes.items() if node.node_id == node_id)

    def lose(self, name: str) -> list[int]:
        """SIGKILLs the node's raylet and every process below it (its worker actors) at
        once, as a machine that vanished; returns the pids killed."""
        node = self.nodes.pop(name)
        raylet = node.all_processes["raylet"][0].process.pid
        pids = [raylet, *_descendants(raylet)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Ray's bookkeeping of the node (its processes are already dead).
        self.cluster.remove_node(node, allow_graceful=False)
        return pids

    def node_alive(self, node_id: str) -> bool:
        return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())

    def shutdown(self) -> None:
        self.cluster.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_host_port() -> str:
    """host:port of the tests' Redis (GCS fault tolerance takes no URL, nor a database)."""
    url = urlparse(REDIS_URL)
    return f"{url.hostname or '127.0.0.1'}:{url.port or 6379}"


@contextmanager
def multi_node(temp_dir: Path, namespace: str, *, fault_tolerant: bool = False,
               nodes_first: dict[str, float] | None = None,
               driver_on: str | None = None) -> Iterator[MultiNode]:
    """A MultiNode (with the worker nodes of ``nodes_first``, name -> CPUs, started before
    this process joins), this process connected through the head or ``driver_on``'s node;
    torn down afterwards: no Ray process of it is left, nor (fault tolerant) a key of its in
    Redis."""
    env = ("RAY_AUTH_MODE", "PYTHONPATH", "RAY_REDIS_ADDRESS",
           "RAY_external_storage_namespace", "RAY_gcs_server_port_wait_time_s")
    saved = SavedEnviron(*env)
    storage = f"electron-test-{uuid.uuid4().hex[:12]}"
    if fault_tolerant:  # read by the head's GCS when it starts (and starts again)
        os.environ["RAY_REDIS_ADDRESS"] = redis_host_port()
        os.environ["RAY_external_storage_namespace"] = storage
        # A GCS reading its tables from Redis may take longer than Ray's ~20 s connect
        # window to answer on a loaded machine (seen in CI): give it a minute.
        os.environ["RAY_gcs_server_port_wait_time_s"] = "60"
    cluster: MultiNode | None = None
    try:
        # Inside the try: a head that fails to start must still restore the environment
        # (a RAY_REDIS_ADDRESS left behind made every later local Ray of the test process
        # start its GCS against Redis, and time out).
        cluster = MultiNode(temp_dir, fault_tolerant=fault_tolerant)
        for name, num_cpus in (nodes_first or {}).items():
            cluster.add_node(name, num_cpus=num_cpus, **{f"node_{name}": 1})
        through = {} if driver_on is None else {"_temp_dir": cluster.temp_dir(driver_on)}
        ray.init(address=cluster.address, namespace=namespace, logging_level="warning",
                 **through)
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        saved.restore()
        if fault_tolerant:
            _drop_storage(storage)
        deadline = time.monotonic() + 10
        while (left := _session_processes(temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"Ray processes left behind: {left}"


def _session_processes(temp_dir: Path) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(temp_dir).encode() in f.read():
                    found.append(int(pid))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def _failed_to_start(exc: Exception) -> bool:
    """Whether ``exc`` is a Ray node's start failing on the machine rather than on what the test
    asked: its raylet missed the registration window, or the head's GCS exited before it
    answered (Ray then reads the GCS's error log, which the GCS had not written yet, and raises
    FileNotFoundError for ``gcs_server.err``: seen once in a CI run, with the GCS on Redis)."""
    return ("timed out during startup" in str(exc)
            or (isinstance(exc, FileNotFoundError) and "gcs_server" in str(exc)))


def started_once_more(start: Callable[[], T], temp_dir: Path,
                      before_retry: Callable[[], None] = lambda: None) -> T:
    """``start()``, a Ray node starting under ``temp_dir``. Ray gives a new node's raylet 30 s
    to register with its GCS (not configurable); on a starved machine it may take longer
    (seen for a head with its GCS on Redis beside a busy process, and for a worker node
    joining one, in a CI run of the suite); a head's GCS may also exit at startup. Such a
    node is killed whole (its raylet would outlive the test) and started once more
    (``_failed_to_start``); any other failure is raised at once."""
    for attempt in range(START_ATTEMPTS):
        try:
            return start()
        except Exception as exc:
            kill_session_processes(temp_dir)
            if not _failed_to_start(exc) or attempt == START_ATTEMPTS - 1:
                raise
            before_retry()
    raise AssertionError("unreachable")


def kill_session_processes(temp_dir: Path, wait_s: float = 10.0) -> None:
    """SIGKILLs every process of the Ray sessions under ``temp_dir`` and waits until they
    are gone."""
    for pid in _session_processes(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while _session_processes(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.1)


def _drop_storage(storage: str) -> None:
    """Deletes the GCS tables a fault-tolerant test cluster left in Redis."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"RAY{storage}@*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
