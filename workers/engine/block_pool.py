"""The pool of KV-cache blocks and the prefix cache that lives in its free blocks.

Every block is either referenced (``ref_count > 0``, held by one or more requests) or free
(``ref_count == 0``, in the free queue exactly once). A free block may still carry the hash of
the full block of tokens whose K/V it holds: that is the prefix cache. Such a block stays
reusable by hash until ``allocate`` takes it for new tokens, which evicts (uncaches) it.

Every change to the set of cached hashes is recorded in the ``KVEventLog``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .kv_events import KVEventLog


@dataclass(eq=False, slots=True)
class KVBlock:
    block_id: int
    ref_count: int = 0
    # Hash of the full block of tokens whose K/V this block holds; None: not cached.
    block_hash: int | None = None


class BlockPool:
    """A fixed set of ``num_blocks`` blocks of ``block_size`` token slots each.

    The free queue is an ``OrderedDict`` (O(1) pop from the front, removal from the middle,
    append at either end). Eviction order: blocks that carry no hash go to the front when
    freed (reusing them loses nothing); cached blocks go to the back, so among cached blocks
    the least recently freed is evicted first. Callers free a request's blocks tail first, so
    its last blocks are evicted before its prefix, which other requests are likelier to share.

    Invariants (``check_integrity``): each block is referenced or free, never both; a block
    carries hash ``h`` exactly when the hash map sends ``h`` to it; the event log's cached
    set equals the hash map's keys (this pool is the log's only writer).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool,
                 event_log: KVEventLog):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.event_log = event_log
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks that ``allocate`` can hand out (free, cached or not)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def get_cached_block(self, block_hash: int) -> KVBlock | None:
        """The block holding this hash's K/V, referenced or free; None if not cached."""
        return self._cached.get(block_hash)

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference to each block (a cache hit); free ones leave the queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def allocate(self, n: int) -> list[KVBlock]:
        """Pop ``n`` blocks from the front of the free queue, with one reference each.

        Cached ones are evicted: their hashes are dropped and reported in one BlocksRemoved.
        Raises ValueError when fewer than ``n`` blocks are free (callers check first).
        """
        if n > len(self._free):
            raise ValueError(f"{n} blocks requested, {len(self._free)} free")
        out: list[KVBlock] = []
        evicted: list[int] = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                evicted.append(block.block_hash)
                block.block_hash = None
            block.ref_count = 1
            out.append(block)
        if evicted:
            self.event_log.record_removed(evicted)
        return out

    def cache_full_blocks(self, blocks: Sequence[KVBlock], block_hashes: Sequence[int]) -> None:
        """Register newly full, computed, referenced blocks under their hashes.

        A block that already carries its hash is skipped; a hash already cached by another
        block is not registered twice (this block stays uncached). Emits one BlocksStored
        with the hashes that became cached, if any.
        """
        if not self.enable_caching:
            return
        if len(blocks) != len(block_hashes):
            raise ValueError("one hash per block")
        stored: list[int] = []
        for block, block_hash in zip(blocks, block_hashes):
            if block.ref_count == 0:
                raise ValueError(f"block {block.block_id} is free: only held blocks are cached")
            if block.block_hash is not None:
                if block.block_hash != block_hash:
                    raise ValueError(f"block {block.block_id} already holds another hash")
                continue
            if block_hash in self._cached:
                continue
            block.block_hash = block_hash
            self._cached[block_hash] = block
            stored.append(block_hash)
        if stored:
            self.event_log.record_stored(stored)

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block, in the given order (pass a request's blocks
        tail first). Blocks reaching zero join the free queue and keep their hash."""
        for block in blocks:
            if block.ref_count <= 0:
                raise ValueError(f"block {block.block_id} freed more often than referenced")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash and emit AllCleared. Refused (False) while any block is
        referenced: a running request's blocks would be re-registered under stale state."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        if self.enable_caching:
            self.event_log.record_cleared()
        return True

    def check_integrity(self) -> None:
        """Assert the pool's invariants (see the class docstring)."""
        referenced = 0
        for block in self.blocks:
            assert block.ref_count >= 0, f"block {block.block_id}: negative ref_count"
            if block.ref_count > 0:
                referenced += 1
                assert block.block_id not in self._free, f"held block {block.block_id} is free"
            else:
                assert self._free.get(block.block_id) is block, \
                    f"unreferenced block {block.block_id} is not in the free queue"
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) is block, \
                    f"block {block.block_id} carries a hash the map does not send to it"
        for block_hash, block in self._cached.items():
            assert block.block_hash == block_hash, f"hash map entry for block {block.block_id}"
        assert len(self._free) + referenced == self.num_blocks, "free + referenced != total"
        if self.enable_caching:
            _, logged = self.event_log.snapshot()
            assert logged == set(self._cached), "KV events disagree with the cached set"
        else:
            assert not self._cached, "caching is off but blocks are cached"
