"""A real multi-node Ray on one machine: a head and worker nodes, each its own raylet with its
own resources (``ray.cluster_utils.Cluster``), under a temporary directory of its own; and a
node lost as a machine is lost (its raylet and every process under it SIGKILLed at once).

Ray's own node-death detector is tuned down (a health check every second, dead after 4
missed): the product's fleet replaces a lost node's workers once Ray reports their actors
dead, and Ray's defaults (5 missed checks of 3 s) would make each test wait ~15 s for that.
Tighter (0.3 s x 3) declared live nodes dead on this busy two-core machine.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

from cluster.launcher import prepare_ray_environment
from core.endpoints import HEAD_RESOURCE

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
    """The head (no CPU, the ``electron_head`` resource: the registry and this process, the
    router's, live there) and worker nodes added by name."""

    def __init__(self, temp_dir: Path):
        self._temp_dir = str(temp_dir)
        prepare_ray_environment()  # PYTHONPATH for every node's worker processes
        self.cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(
            num_cpus=0, resources={HEAD_RESOURCE: 1}, include_dashboard=False,
            temp_dir=self._temp_dir, _system_config=FAST_NODE_DEATH))
        self.nodes: dict[str, Any] = {}

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self, name: str, num_cpus: float, **resources: float) -> str:
        """Starts a worker node (its own raylet); returns its Ray node id."""
        node = self.cluster.add_node(num_cpus=num_cpus, resources=resources or None,
                                     temp_dir=self._temp_dir)
        self.nodes[name] = node
        return node.node_id

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


@contextmanager
def multi_node(temp_dir: Path, namespace: str) -> Iterator[MultiNode]:
    """A MultiNode with this process connected to its head, torn down afterwards (no Ray
    process of it is left)."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "PYTHONPATH")}
    nodes = MultiNode(temp_dir)
    try:
        ray.init(address=nodes.address, namespace=namespace, logging_level="warning")
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
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
