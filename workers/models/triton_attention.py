"""Paged attention on CUDA: one Triton kernel that reads the KV blocks in place.

The torch path (attention.py) gathers every sequence's whole context out of the paged cache
for each layer of each step; on a GPU that copy costs as much as the attention itself, and a
long cached prefix then makes a step slower, not faster. This kernel instead walks each
sequence's block table and loads keys and values straight from their blocks.

One kernel serves every kind of sequence in a step (decodes, a prefill chunk over a cached
prefix, whole new prompts, all in one launch): the flat batch is cut into tiles of
``BLOCK_Q`` consecutive new tokens of one sequence, and a program computes one tile for one
KV head, i.e. ``BLOCK_Q x group`` query rows (the query heads sharing that KV head, so GQA
reads each key once). New token ``i`` of a sequence with ``num_new`` new tokens and
``context_len`` tokens in the cache sits at position ``context_len - num_new + i`` and sees
keys ``0 ..`` that position: causal attention aligned to the bottom right, which is plain
causal attention for a new prompt and full visibility of the cached prefix for a chunk.
Softmax is computed online in float32 over ``BLOCK_N`` keys at a time (flash attention).

A step with few tiles (a decode at a small batch, a short chunk over a long cached prefix)
would leave most of a GPU idle while a few programs walk long contexts, so such a step splits
each tile's keys across ``num_splits`` programs (flash-decoding): each computes the softmax
over its share of the keys and stores its normalized output and log-sum-exp in float32, and
a second kernel combines the shares of each query row. The share is computed on the device
from the context length, so the split count alone (fixed per padded decode size) decides the
grid, and a CUDA graph captured with it serves any context length.

Everything the kernel reads about the step comes from device tensors (block tables, context
lengths, tile lists), never from Python numbers, so a decode step's launch can be captured in
a CUDA graph and replayed with new contents (model_runner.py).

Triton ships with CUDA builds of torch (docs/engine.md says why this kernel and not
FlashInfer or FlexAttention); ``TRITON_INTERPRET=1`` runs it on the CPU for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton: the torch path serves there
    triton = None
    tl = None

# Query rows per program: decode tiles hold one token, so few rows; prefill tiles more, and
# long prompts the most (fewer programs re-reading the same keys).
DECODE_BLOCK_M = 16
PREFILL_BLOCK_M = 64
LONG_PREFILL_BLOCK_M = 128
LONG_PREFILL_TOKENS = 512  # a chunk this long takes the long tiles
BLOCK_N = 64  # keys per inner iteration
MAX_SPLITS = 32  # programs one tile's keys are split across, at most
MIN_SPLIT_KEYS = 256  # a step that knows its contexts gives each split this many keys at least


def available() -> bool:
    return triton is not None


def tile_tokens(block_m: int, group: int) -> int:
    """New tokens one tile covers: its rows hold ``group`` query heads per token."""
    return max(1, block_m // group)


def block_m_for(group: int, longest: int) -> int:
    """Rows per program for a step whose longest chunk has ``longest`` new tokens: at least
    16 (the smallest dot Triton tiles) and one token's group of query heads."""
    if longest >= LONG_PREFILL_TOKENS:
        rows = LONG_PREFILL_BLOCK_M
    else:
        rows = PREFILL_BLOCK_M if longest > 1 else DECODE_BLOCK_M
    return max(rows, 1 << (group - 1).bit_length())


def num_splits(tiles: int, target_tiles: int, longest_keys: int | None = None) -> int:
    """Programs to split each tile's keys across, for a step of ``tiles`` tiles on a device
    that wants ``target_tiles`` tiles per KV head to be busy. ``longest_keys``: the most keys
    any tile reads, when the split may depend on it (not for graphed decode steps, whose
    contexts grow while their graph stays)."""
    if tiles < 1 or target_tiles <= tiles:
        return 1
    splits = min(MAX_SPLITS, target_tiles // tiles)
    if longest_keys is not None:
        splits = min(splits, -(-longest_keys // MIN_SPLIT_KEYS))
    return max(1, splits)


@dataclass(frozen=True)
class TritonMetadata:
    """What the kernel reads about a step, all int32 tensors on the device.

    ``query_start``: [S + 1] offsets of each sequence's new tokens in the flat batch;
    ``context_lens``: [S] tokens in the cache once this step's are written;
    ``block_tables``: every sequence's block ids, one table after another, and
    ``table_start``: [S] where each sequence's table begins in it;
    ``tile_seq`` / ``tile_start``: [tiles] the sequence of each tile and the index (within
    that sequence's new tokens) of its first token; ``num_splits``: programs per tile and KV
    head, each over its share of the keys (1: no split).
    """

    query_start: torch.Tensor
    context_lens: torch.Tensor
    table_start: torch.Tensor
    block_tables: torch.Tensor
    tile_seq: torch.Tensor
    tile_start: torch.Tensor
    block_m: int
    num_splits: int = 1


if triton is not None:

    @triton.jit
    def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
        query_start_ptr, context_lens_ptr, table_start_ptr, block_tables_ptr, tile_seq_ptr,
        tile_start_ptr, scale,
        stride_qt, stride_qh,  # q [T, H, d]
        stride_ot, stride_oh,  # out [T, H, d]
        stride_cs, stride_ch,  # caches viewed [num_blocks * block_size, kvh, d]
        stride_pt, stride_ph,  # part_out [T, H, SPLITS, HEAD_PAD], part_lse [T, H, SPLITS]
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr, IEEE: tl.constexpr, SPLITS: tl.constexpr,
    ):
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq = tl.load(tile_seq_ptr + tile)
        first = tl.load(tile_start_ptr + tile)
        q_begin = tl.load(query_start_ptr + seq)
        num_new = tl.load(query_start_ptr + seq + 1) - q_begin
        context_len = tl.load(context_lens_ptr + seq)

        rows = tl.arange(0, BLOCK_M)
        token = first + rows // GROUP  # index among the sequence's new tokens
        head = kv_head * GROUP + rows % GROUP
        row_ok = (rows < BLOCK_Q * GROUP) & (token < num_new)
        dims = tl.arange(0, HEAD_PAD)
        dim_ok = dims < HEAD_DIM

        q_rows = (q_begin + token).to(tl.int64) * stride_qt + head * stride_qh
        q = tl.load(q_ptr + q_rows[:, None] + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        query_pos = context_len - num_new + token  # the key positions each row may see: <= it

        # Keys this tile needs: up to its last valid token's position.
        last_token = tl.minimum(first + BLOCK_Q, num_new) - 1
        num_keys = context_len - num_new + last_token + 1
        keys_from = 0
        if SPLITS > 1:  # this program's share: whole BLOCK_N runs, the last share may be short
            share = tl.cdiv(tl.cdiv(num_keys, SPLITS), BLOCK_N) * BLOCK_N
            keys_from = tl.program_id(2) * share
            num_keys = tl.minimum(keys_from + share, num_keys)

        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
        table = block_tables_ptr + tl.load(table_start_ptr + seq)
        for start in range(keys_from, num_keys, BLOCK_N):
            key_pos = start + tl.arange(0, BLOCK_N)
            key_ok = key_pos < num_keys
            block = tl.load(table + key_pos // PAGE, mask=key_ok, other=0)
            slot = block.to(tl.int64) * PAGE + key_pos % PAGE
            kv_rows = slot * stride_cs + kv_head * stride_ch
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_cache_ptr + kv_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            visible = (key_pos[None, :] <= query_pos[:, None]) & key_ok[None, :]
            scores = tl.where(visible, scores * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            # A row that has seen no visible key yet keeps m = -inf: shift by 0 there, so its
            # probabilities are exp(-inf) = 0 rather than exp(NaN).
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - shift[:, None])
            alpha = tl.exp(m - shift)
            denom = denom * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
        if SPLITS > 1:
            # A row that saw no key in this share (all its keys lie in earlier shares) has
            # denom 0: log-sum-exp -inf, weight 0 when the shares are combined.
            lse = tl.where(denom == 0.0, float("-inf"),
                           m + tl.log(tl.where(denom == 0.0, 1.0, denom)))
            p_rows = ((q_begin + token).to(tl.int64) * stride_pt + head * stride_ph
                      + tl.program_id(2))
            tl.store(part_lse_ptr + p_rows, lse, mask=row_ok)
            tl.store(part_out_ptr + p_rows[:, None] * HEAD_PAD + dims[None, :], out,
                     mask=row_ok[:, None])
        else:
            o_rows = (q_begin + token).to(tl.int64) * stride_ot + head * stride_oh
            tl.store(out_ptr + o_rows[:, None] + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])

    @triton.jit
    def _combine_splits_kernel(
        part_out_ptr, part_lse_ptr, out_ptr,
        stride_pt, stride_ph, stride_ot, stride_oh,
        HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, SPLITS: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
    ):
        """One query row (token, head): the softmax-weighted sum of its shares' outputs."""
        row = tl.program_id(0).to(tl.int64) * stride_pt + tl.program_id(1) * stride_ph
        splits = tl.arange(0, SPLITS_PAD)
        split_ok = splits < SPLITS
        dims = tl.arange(0, HEAD_PAD)
        lse = tl.load(part_lse_ptr + row + splits, mask=split_ok, other=float("-inf"))
        weight = tl.exp(lse - tl.max(lse, 0))  # every row has a key: the max is finite
        shares = tl.load(part_out_ptr + (row + splits)[:, None] * HEAD_PAD + dims[None, :],
                         mask=split_ok[:, None], other=0.0)
        out = tl.sum(shares * weight[:, None], 0) / tl.sum(weight, 0)
        o_row = tl.program_id(0).to(tl.int64) * stride_ot + tl.program_id(1) * stride_oh
        tl.store(out_ptr + o_row + dims, out.to(out_ptr.dtype.element_ty),
                 mask=dims < HEAD_DIM)


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    meta: TritonMetadata, scale: float, out: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """q [T, H, d]; key_cache, value_cache [num_blocks, block_size, kvh, d] -> out [T, H, d].

    The step's own keys and values must already be in the cache.
    """
    num_tokens, num_heads, head_dim = q.shape
    page, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    head_pad = triton.next_power_of_2(head_dim)
    splits = meta.num_splits
    if out is None:
        out = torch.empty_like(q)
    keys = key_cache.view(-1, num_kv_heads, head_dim)
    values = value_cache.view(-1, num_kv_heads, head_dim)
    if splits > 1:
        part_out = torch.empty(num_tokens, num_heads, splits, head_pad, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(num_tokens, num_heads, splits, dtype=torch.float32,
                               device=q.device)
    else:
        part_out = part_lse = out  # not read
    grid = (meta.tile_seq.shape[0], num_kv_heads, splits)
    _paged_attention_kernel[grid](
        q, keys, values, out, part_out, part_lse,
        meta.query_start, meta.context_lens, meta.table_start, meta.block_tables,
        meta.tile_seq, meta.tile_start, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        keys.stride(0), keys.stride(1), num_heads * splits, splits,
        GROUP=group, HEAD_DIM=head_dim, HEAD_PAD=head_pad,
        PAGE=page, BLOCK_M=meta.block_m, BLOCK_Q=tile_tokens(meta.block_m, group),
        BLOCK_N=BLOCK_N, IEEE=q.dtype == torch.float32, SPLITS=splits,
        num_warps=8 if meta.block_m >= 128 else 4, num_stages=2,
    )
    if splits > 1:
        _combine_splits_kernel[(num_tokens, num_heads)](
            part_out, part_lse, out, num_heads * splits, splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_PAD=head_pad, SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits), num_warps=1)
    return out
