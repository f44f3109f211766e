"""The approximate prefix tree of the cache_aware baseline: a character radix tree shared by
all workers ("tenants"), built from the router's own routing history, never from the workers'
caches.

Every node holds an edge label (a string) and, per tenant that was sent text through it, the
last time it did. Invariants: a tenant on a node is also on every ancestor (inserting marks
the whole path; eviction removes leaves first), so its timestamps never decrease towards the
root; ``size(tenant)`` is the number of characters on the nodes that carry it.

This mirrors the tree of the popular Rust router (sglang's router, ``tree.rs``); the
differences are deliberate: matching considers only the tenants the caller can route to (the
deepest node carrying one of them), and the most recently used of them wins a node instead of
an arbitrary one.

Plain Python: no torch.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection, Sequence


class _Node:
    __slots__ = ("key", "children", "parent", "tenants")

    def __init__(self, key: str, parent: _Node | None):
        self.key = key
        self.children: dict[str, _Node] = {}
        self.parent = parent
        self.tenants: dict[str, float] = {}  # tenant -> last access time


def _shared_length(key: str, text: str, start: int) -> int:
    """Length of the common prefix of ``key`` and ``text[start:]``, knowing their first
    characters agree and ``key`` is not a prefix of it (binary search on C-level compares)."""
    lo, hi = 1, min(len(key), len(text) - start)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(key[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


class ApproxTree:
    def __init__(self) -> None:
        self._root = _Node("", None)
        self._sizes: dict[str, int] = {}

    def size(self, tenant: str) -> int:
        """Characters of text held for ``tenant``."""
        return self._sizes.get(tenant, 0)

    def tenants(self) -> list[str]:
        return sorted(self._sizes)

    # -- the verbs

    def insert(self, text: str, tenant: str, now: float) -> None:
        """Records that ``text`` was sent to ``tenant`` at ``now``."""
        node = self._root
        node.tenants[tenant] = now
        size = self._sizes.get(tenant, 0)
        i, n = 0, len(text)
        while i < n:
            child = node.children.get(text[i])
            if child is None:
                leaf = _Node(text[i:], node)
                leaf.tenants[tenant] = now
                node.children[text[i]] = leaf
                size += n - i
                break
            key = child.key
            if text.startswith(key, i):
                shared = len(key)
            else:
                shared = _shared_length(key, text, i)
                # Split: node -> middle (the shared part, same tenants) -> child (the rest).
                middle = _Node(key[:shared], node)
                middle.tenants = dict(child.tenants)
                child.key = key[shared:]
                child.parent = middle
                middle.children[child.key[0]] = child
                node.children[text[i]] = middle
                child = middle
            if tenant not in child.tenants:
                size += len(child.key)
            child.tenants[tenant] = now
            node = child
            i += shared
        self._sizes[tenant] = size

    def prefix_match(self, text: str, tenants: Collection[str]) -> tuple[int, str | None]:
        """(characters matched, tenant): the longest prefix of ``text`` in the tree on a node
        carrying one of ``tenants``, and the most recently used of them there; (0, None) when
        none matches."""
        node, i, n = self._root, 0, len(text)
        best: tuple[int, _Node | None] = (0, None)
        while i < n:
            child = node.children.get(text[i])
            if child is None or child.tenants.keys().isdisjoint(tenants):
                break  # deeper nodes carry a subset of these tenants
            key = child.key
            if text.startswith(key, i):
                i += len(key)
                best = (i, child)
                node = child
                continue
            best = (i + _shared_length(key, text, i), child)
            break
        depth, found = best
        if found is None:
            return 0, None
        _, tenant = max((t, name) for name, t in found.tenants.items() if name in tenants)
        return depth, tenant

    def smallest(self, tenants: Sequence[str]) -> str:
        """The tenant holding the least text (the first of them on ties)."""
        sizes = self._sizes
        return min(tenants, key=lambda t: sizes.get(t, 0))

    def remove_tenant(self, tenant: str) -> None:
        """Forgets ``tenant`` everywhere (its worker left)."""
        if self._sizes.pop(tenant, None) is None:
            return
        self._root.tenants.pop(tenant, None)
        stack = [self._root]
        while stack:
            node = stack.pop()
            for first, child in list(node.children.items()):
                if child.tenants.pop(tenant, None) is None:
                    continue  # nor does its subtree carry it
                if not child.tenants:
                    del node.children[first]
                else:
                    stack.append(child)

    def evict(self, max_size: int) -> None:
        """For every tenant above ``max_size`` characters, drops its least recently used leaves
        until it fits."""
        for tenant, size in list(self._sizes.items()):
            if size > max_size:
                self._evict_tenant(tenant, max_size)

    def _evict_tenant(self, tenant: str, max_size: int) -> None:
        order = itertools.count()  # ties on time: no comparison of nodes
        heap: list[tuple[float, int, _Node]] = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            carriers = [c for c in node.children.values() if tenant in c.tenants]
            if carriers:
                stack.extend(carriers)
            elif node is not self._root:
                heap.append((node.tenants[tenant], next(order), node))
        heapq.heapify(heap)
        size = self._sizes[tenant]
        while size > max_size and heap:
            _, _, node = heapq.heappop(heap)
            del node.tenants[tenant]
            size -= len(node.key)
            parent = node.parent
            assert parent is not None
            if not node.tenants:
                del parent.children[node.key[0]]
            if parent is not self._root and not any(
                    tenant in c.tenants for c in parent.children.values()):
                heapq.heappush(heap, (parent.tenants[tenant], next(order), parent))
        self._sizes[tenant] = size

    # -- checks

    def num_nodes(self) -> int:
        count, stack = 0, [self._root]
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(node.children.values())
        return count

    def check_integrity(self) -> None:
        """Assert the invariants of the module docstring."""
        sizes: dict[str, int] = {}
        stack = [self._root]
        while stack:
            node = stack.pop()
            for first, child in node.children.items():
                assert child.key and child.key[0] == first and child.parent is node
                assert child.tenants, "a node without tenants was kept"
                for tenant, t in child.tenants.items():
                    assert node.tenants.get(tenant, -1.0) >= t, (tenant, child.key)
                    sizes[tenant] = sizes.get(tenant, 0) + len(child.key)
                stack.append(child)
        assert {t: s for t, s in sizes.items() if s} == {
            t: s for t, s in self._sizes.items() if s}, (sizes, self._sizes)
