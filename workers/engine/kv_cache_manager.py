"""Which blocks hold which request's K/V: prefix-cache lookup, slot allocation, freeing.

A request's blocks are ``request.block_ids``: block ``i`` holds the K/V of its tokens
``i * block_size .. (i + 1) * block_size - 1``. Between steps they cover exactly its computed
tokens; once the scheduler has allocated slots, they also cover the tokens scheduled for
the step. A full block whose tokens are all computed is registered in the prefix cache under
``request.block_hashes[i]`` (chained over the prefix and the request's ``cache_key``, so equal
hashes mean equal prefixes for the same tenant salt and model).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from .block_pool import BlockPool, KVBlock
from .kv_events import DEFAULT_CAPACITY, HASHES_PER_BLOCK, KVEventLog
from .request import Request


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


class KVCacheManager:
    """Maps requests to pool blocks. Owns the block pool and its KV event log."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 event_capacity: int = DEFAULT_CAPACITY):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._event_log = KVEventLog(event_capacity,
                                     max_hashes=max(1, HASHES_PER_BLOCK * num_blocks))
        self.pool = BlockPool(num_blocks, block_size, enable_caching, self._event_log)
        # request_id -> how many of its leading blocks are registered in the prefix cache.
        # (Progress belongs on Request, whose fields are fixed; it lives here meanwhile.)
        self._num_registered: dict[str, int] = {}

    @property
    def event_log(self) -> KVEventLog:
        return self._event_log

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by requests (free cached blocks are not counted: evictable)."""
        return self.pool.num_blocks - self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached run of the request's leading blocks, and the tokens they hold.

        For a request holding no blocks (new, or preempted). The run stops short of the last
        token: a prompt whose blocks are all cached still recomputes its last token, whose
        logits are needed, so at most ``(num_tokens - 1) // block_size`` blocks are returned.
        Nothing is referenced yet: pass the blocks to ``allocate_slots`` in the same step.
        """
        if request.block_ids or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id} already holds blocks")
        if request.block_size != self.block_size:
            raise ValueError(f"request block_size {request.block_size} != {self.block_size}")
        if not self.enable_caching:
            return [], 0
        limit = (request.num_tokens - 1) // self.block_size
        blocks: list[KVBlock] = []
        for block_hash in request.block_hashes[:limit]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: Sequence[KVBlock] = ()) -> bool:
        """Make ``request.block_ids`` cover ``num_computed_tokens + len(computed_blocks) *
        block_size + num_new_tokens`` tokens: reference the computed (cache-hit) blocks, then
        append fresh blocks. False, changing nothing, if the pool has too few free blocks
        (a free cached block that is referenced here leaves the free pool too).

        ``computed_blocks`` come from ``get_computed_blocks`` for a request holding none; the
        caller then advances ``num_computed_tokens`` by the tokens they hold.
        """
        if num_new_tokens < 1:
            raise ValueError("num_new_tokens must be >= 1")
        if computed_blocks and (request.block_ids or request.num_computed_tokens):
            raise ValueError(f"request {request.request_id} already holds blocks")
        num_tokens = (request.num_computed_tokens + len(computed_blocks) * self.block_size
                      + num_new_tokens)
        if num_tokens > request.num_tokens:
            raise ValueError(
                f"{num_tokens} slots asked for a request of {request.num_tokens} tokens")
        num_new_blocks = max(
            0, cdiv(num_tokens, self.block_size) - len(request.block_ids) - len(computed_blocks))
        num_revived = sum(1 for block in computed_blocks if block.ref_count == 0)
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            return False
        if computed_blocks:
            # Referenced before allocate() runs, so that it cannot evict them.
            self.pool.touch(computed_blocks)
            request.block_ids.extend(block.block_id for block in computed_blocks)
            self._num_registered[request.request_id] = len(computed_blocks)
        if num_new_blocks:
            request.block_ids.extend(b.block_id for b in self.pool.allocate(num_new_blocks))
        return True

    def cache_blocks(self, request: Request) -> None:
        """Register the request's full, computed blocks that are not registered yet."""
        if not self.enable_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        done = self._num_registered.get(request.request_id, 0)
        if num_full <= done:
            return
        blocks = [self.pool.blocks[i] for i in request.block_ids[done:num_full]]
        self.pool.cache_full_blocks(blocks, request.block_hashes[done:num_full])
        self._num_registered[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first (its prefix is evicted last); they keep
        their hashes in the prefix cache. Clears ``request.block_ids``."""
        self.pool.free([self.pool.blocks[i] for i in reversed(request.block_ids)])
        request.block_ids.clear()
        self._num_registered.pop(request.request_id, None)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash (AllCleared); False while any block is referenced."""
        return self.pool.reset_prefix_cache()

    def check_integrity(self, requests: Iterable[Request]) -> None:
        """Assert the pool's invariants and that ``requests`` -- ALL live requests -- account
        for every reference: each block's ref_count equals the number of requests holding it,
        so a leaked block fails here."""
        self.pool.check_integrity()
        holders: Counter[int] = Counter()
        live: set[str] = set()
        for request in requests:
            ids = request.block_ids
            live.add(request.request_id)
            assert len(set(ids)) == len(ids), f"{request.request_id}: a block twice in its table"
            low = cdiv(request.num_computed_tokens, self.block_size)
            high = max(low, cdiv(request.num_tokens, self.block_size))
            assert low <= len(ids) <= high, \
                f"{request.request_id}: {len(ids)} blocks for {request.num_computed_tokens} " \
                f"computed of {request.num_tokens} tokens"
            assert self._num_registered.get(request.request_id, 0) <= len(ids)
            for i, block_id in enumerate(ids):
                block_hash = self.pool.blocks[block_id].block_hash
                # A cached block in a request's table holds exactly that request's tokens.
                assert block_hash is None or (i < len(request.block_hashes)
                                              and request.block_hashes[i] == block_hash), \
                    f"{request.request_id}: block {block_id} caches another prefix"
            holders.update(ids)
        for block in self.pool.blocks:
            assert block.ref_count == holders[block.block_id], \
                f"block {block.block_id}: ref_count {block.ref_count}, " \
                f"held by {holders[block.block_id]} requests"
        assert self._num_registered.keys() <= live, "registration state of a gone request"
