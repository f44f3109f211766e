"""Paged-attention cases for the Triton kernel's tests and its benchmark: random caches,
queries and non-contiguous block tables for sequences given as (new tokens, context length),
and the reference (each sequence's context gathered from its blocks, then SDPA)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from workers.models import triton_attention as ta


def reference(q, key_cache, value_cache, seqs, scale):
    """Per sequence: gather its context from the blocks, SDPA with the bottom-right mask."""
    page = key_cache.shape[1]
    out = torch.empty_like(q)
    start = 0
    for num_new, context_len, table in seqs:
        pos = torch.arange(context_len, device=q.device)
        slots = torch.tensor(table, device=q.device)[pos // page] * page + pos % page
        keys = key_cache.reshape(-1, *key_cache.shape[2:])[slots]
        values = value_cache.reshape(-1, *value_cache.shape[2:])[slots]
        query_pos = pos[context_len - num_new:].unsqueeze(1)
        mask = pos.unsqueeze(0) <= query_pos
        qs = q[start:start + num_new].transpose(0, 1).unsqueeze(0).float()
        o = F.scaled_dot_product_attention(
            qs, keys.transpose(0, 1).unsqueeze(0).float(),
            values.transpose(0, 1).unsqueeze(0).float(), attn_mask=mask, scale=scale,
            enable_gqa=True)
        out[start:start + num_new] = o[0].transpose(0, 1).to(q.dtype)
        start += num_new
    return out


def build(seqs_shape, *, heads, kv_heads, head_dim, page, dtype, device, block_m=None, seed=0,
          num_splits=1):
    """Random caches and queries for sequences given as (num_new, context_len); ``block_m``
    by default as the runner picks it. Returns q, key cache, value cache, the sequences as
    (num_new, context_len, block table) and the kernel's metadata, all on ``device``."""
    if block_m is None:
        block_m = ta.block_m_for(heads // kv_heads, max(n for n, _ in seqs_shape))
    gen = torch.Generator().manual_seed(seed)
    total_blocks = sum(-(-c // page) for _, c in seqs_shape) + 3
    key_cache = torch.randn(total_blocks, page, kv_heads, head_dim, generator=gen).to(dtype)
    value_cache = torch.randn(total_blocks, page, kv_heads, head_dim, generator=gen).to(dtype)
    free = list(range(1, total_blocks))
    random.Random(seed).shuffle(free)  # block tables are not contiguous
    seqs, tables = [], []
    for num_new, context_len in seqs_shape:
        table = [free.pop() for _ in range(-(-context_len // page))]
        seqs.append((num_new, context_len, table))
        tables.append(table)
    num_tokens = sum(n for n, _ in seqs_shape)
    q = torch.randn(num_tokens, heads, head_dim, generator=gen).to(dtype)
    table_start = [sum(len(t) for t in tables[:i]) for i in range(len(tables))]
    block_tables = torch.tensor([b for t in tables for b in t], dtype=torch.int32)
    query_start = [0]
    tile_seq, tile_start = [], []
    per_tile = ta.tile_tokens(block_m, heads // kv_heads)
    for i, (num_new, _) in enumerate(seqs_shape):
        query_start.append(query_start[-1] + num_new)
        for first in range(0, num_new, per_tile):
            tile_seq.append(i)
            tile_start.append(first)
    meta = ta.TritonMetadata(
        query_start=torch.tensor(query_start, dtype=torch.int32, device=device),
        context_lens=torch.tensor([c for _, c in seqs_shape], dtype=torch.int32, device=device),
        table_start=torch.tensor(table_start, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        tile_seq=torch.tensor(tile_seq, dtype=torch.int32, device=device),
        tile_start=torch.tensor(tile_start, dtype=torch.int32, device=device),
        block_m=block_m, num_splits=num_splits)
    return q.to(device), key_cache.to(device), value_cache.to(device), seqs, meta
