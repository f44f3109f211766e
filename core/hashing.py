"""Block hashes: the one function that router and workers share.

A full block's hash chains its parent's hash, the block's token ids and an extra key (the
tenant's cache salt and the model id), so equal hashes mean equal prefixes under the same
salt. xxh3-64 over packed little-endian integers is stable across processes and machines;
Python's ``hash()`` is not.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash

# Hashes are unsigned 64-bit integers (protobuf uint64 on the wire).
_NO_PARENT = b"\x00" * 8


def hash_block(parent: int | None, token_ids: Sequence[int], extra_key: bytes = b"") -> int:
    """Hash of one full block given its parent's hash (None for the first block)."""
    h = xxhash.xxh3_64()
    h.update(_NO_PARENT if parent is None else struct.pack("<Q", parent))
    h.update(struct.pack("<I", len(extra_key)))
    h.update(extra_key)
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return h.intdigest()


def extra_key(cache_salt: str = "", model_id: str = "") -> bytes:
    """The extra key mixed into every block hash: model id and tenant salt."""
    return model_id.encode() + b"\x1f" + cache_salt.encode()


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    key: bytes = b"",
    parent: int | None = None,
    start: int = 0,
) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (a partial last block has none).

    ``parent`` and ``start`` continue a chain already computed for the first ``start`` tokens
    (``start`` must be a multiple of ``block_size``).
    """
    if start % block_size:
        raise ValueError("start must be a multiple of block_size")
    out: list[int] = []
    for begin in range(start, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[begin : begin + block_size], key)
        out.append(parent)
    return out
