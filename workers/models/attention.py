"""Paged attention in plain torch: the KV cache layout, the step metadata and the kernel.

The KV cache is one tensor per layer, [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 holds keys, 1 values). A sequence's tokens live in the blocks of its block table:
position p sits in block block_table[p // block_size] at offset p % block_size.

A step's flat batch holds decodes first (one new token each, batched into one computation per
layer) and then prefills (two or more new tokens each, one computation per sequence).
Everything that depends only on the metadata (gather indices, masks) is built once per step in
`PagedAttention` and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from workers import kernels

from .config import ModelConfig
from .triton_attention import TritonMetadata, paged_attention

# Decode batches up to this size gather whole blocks and run SDPA's fused kernel on them in
# place (strided: no transpose copy); larger ones gather rows into [B * kvh, L, head_dim] for
# bmm + softmax. On an Intel Xeon with AMX the first made decode 1.12-1.13x faster at B = 8
# and 16 and was within 8 % either way at 32-64 (bench/README.md, bench/cpu_paths.py).
SDPA_MAX_DECODES = 16

# On a CPU, decodes run the compiled kernel that reads the KV blocks in place
# (workers/kernels/paged_decode.cpp) wherever it could be built; the gathers above serve
# where it could not (and when this is False: tests and benchmarks compare the two).
CPU_DECODE_KERNEL = True

# In bfloat16 with heads of 64 or 128 on a CPU with AVX512-BF16, the kernel sums the products
# with the CPU's bfloat16 dot-product instruction straight from the cache (0.58-0.88x the time
# a call of widening the rows to floats, on an AVX512-BF16 EPYC: bench/cpu_paths.py --parts
# calls); False widens them as other CPUs do (tests and benchmarks compare the two).
CPU_DECODE_BF16_DOT = True


# On a CPU with AVX512-BF16 (kernels.prefill), bfloat16 prefill chunks with heads of a multiple
# of 32 (up to 256) run our kernel (workers/kernels/prefill_attention.cpp): the chunk's context
# read from its blocks in place, scores and weighted values on `vdpbf16ps`, or AMX's tiles.
# torch's SDPA ran a 1,024-token SmolLM2 prefill's attention at 10.9 ms a layer, the kernel at
# 2.9 (an AMD EPYC Zen 5; bench/README.md); on an Intel Xeon with AMX, where SDPA runs on the
# tiles too (and so do ours), 3.34 against 3.13, and 0.29 against 0.18 for 16 tokens over
# 1,024 cached. False selects SDPA (tests and benchmarks compare the two).
CPU_PREFILL_KERNEL = True


def padded_length(n: int) -> int:
    """``n`` rounded up to its bucket: a multiple of 16 up to 255, then 8 buckets per doubling
    (at most 1/8 added).

    Prefill attention pads its query and key lengths to buckets. On a CPU with AMX, SDPA in
    bfloat16 and float16 runs oneDNN brgemm kernels that torch compiles for each new shape and
    keeps for the life of the process: with exact lengths, every new (prompt length, context
    length) pair added ~0.17 MiB of compiled code for good (3,000 varied prefills grew a
    process by 363 MiB and never stopped; 1,024 prompt lengths by 445 MiB), and paid the
    compilation on the step. With buckets the set of shapes is small: the same 3,000 grew it
    by 38 MiB, flat after the first 1,000. The padding costs a little attention work only."""
    step = max(16, (1 << (n.bit_length() - 1)) // 8)
    return -(-n // step) * step


@dataclass(frozen=True)
class PrefillSeq:
    start: int  # index of its first new token in the flat batch
    num_new: int
    # Tokens in the cache once the new ones are written: they sit at positions
    # context_len - num_new .. context_len - 1; earlier positions are already cached.
    context_len: int
    block_table: torch.Tensor  # LongTensor[ceil(context_len / block_size)]


@dataclass(frozen=True)
class AttentionMetadata:
    block_size: int
    slot_mapping: torch.Tensor  # LongTensor[T]: block_id * block_size + offset of each new token
    num_decodes: int  # the first num_decodes tokens are single-token sequences
    decode_block_tables: torch.Tensor | None  # LongTensor[num_decodes, max_blocks], 0-padded
    decode_context_lens: torch.Tensor | None  # LongTensor[num_decodes], incl. the new token
    prefills: list[PrefillSeq]
    # Set on the Triton backend (CUDA): what its kernel reads; the torch fields above are then
    # unused (num_decodes 0, no prefills).
    triton: TritonMetadata | None = None


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block id costs: keys and values of block_size tokens in every layer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int,
                      dtype: torch.dtype, device: torch.device | str) -> list[torch.Tensor]:
    # Zeros, not empty: decode attention reads whole blocks (and padding block 0) and masks the
    # unused slots; masked slots must hold finite numbers, since 0 * NaN is NaN.
    return [torch.zeros(2, num_blocks, block_size, config.num_kv_heads, config.head_dim,
                        dtype=dtype, device=device)
            for _ in range(config.num_layers)]


def write_kv(kv_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """This step's keys and values ([T, kvh, d]) into their cache slots."""
    kvh, d = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, kvh, d).index_copy_(0, slots, k)
    kv_cache[1].view(-1, kvh, d).index_copy_(0, slots, v)


@dataclass(frozen=True)
class _DecodePlan:
    # SDPA (B <= SDPA_MAX_DECODES): the block tables, flat (LongTensor[B * blocks]); else
    # LongTensor[B * kvh * L], rows of the cache viewed as [-1, head_dim].
    index: torch.Tensor
    # In the model dtype, 0 where visible, -inf past the end: SDPA [B, 1, 1, L], else
    # [B * kvh, 1, L].
    bias: torch.Tensor
    span: int  # L: the longest block table's tokens
    # The CPU kernel (index is then the block tables [B, blocks], bias unused) and the context
    # lengths it reads; None on the gather paths.
    kernel: ModuleType | None = None
    lens: torch.Tensor | None = None


@dataclass(frozen=True)
class _PrefillPlan:
    start: int
    num_new: int
    # The CPU kernel's inputs (the other fields are then unused): None on SDPA's path.
    kernel: ModuleType | None
    seq: PrefillSeq
    queries: int  # padded_length(num_new): query rows attention runs (the padding is dropped)
    # None when the whole sequence is new (plain causal attention over the new K/V, padded
    # with zeros to `queries` rows); else the cache rows of positions 0 .. context_len-1 and of
    # padding up to padded_length(context_len) (row 0, masked), viewed as [-1, kvh, head_dim],
    # and the mask.
    rows: torch.Tensor | None
    mask: torch.Tensor | None  # bool [queries, padded context]


class PagedAttention:
    """Attention of one forward step; built once per step, called once per layer."""

    def __init__(self, meta: AttentionMetadata, config: ModelConfig, dtype: torch.dtype):
        self.meta = meta
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.group = config.num_heads // config.num_kv_heads
        self.scale = config.head_dim ** -0.5
        # Gathered keys and values, one buffer per gather, refilled by every layer of the
        # step: a fresh tensor per layer would be a fresh mmap (workers/__init__.py keeps
        # blocks of 1 MiB and more out of the heap), page-faulted in again 2 x layers times.
        self._gathered: dict[tuple[int, int], torch.Tensor] = {}
        self.decode = self._plan_decodes(meta, dtype) if meta.num_decodes else None
        kernel = self._prefill_kernel(meta, dtype) if meta.prefills else None
        self.prefills = [self._plan_prefill(p, meta.block_size, kernel) for p in meta.prefills]
        # The outputs are concatenated in this order, so the batch must be laid out this way.
        expected_start = meta.num_decodes
        for seq in meta.prefills:
            if seq.start != expected_start:
                raise ValueError(f"prefill starts at {seq.start}, expected {expected_start}")
            expected_start += seq.num_new
        if expected_start != meta.slot_mapping.shape[0]:
            raise ValueError(f"metadata covers {expected_start} tokens, slot_mapping "
                             f"{meta.slot_mapping.shape[0]}")

    def _plan_decodes(self, meta: AttentionMetadata, dtype: torch.dtype) -> _DecodePlan:
        tables, lens = meta.decode_block_tables, meta.decode_context_lens
        if tables is None or lens is None:
            raise ValueError("decodes need decode_block_tables and decode_context_lens")
        bs, kvh, batch = meta.block_size, self.num_kv_heads, tables.shape[0]
        span = tables.shape[1] * bs
        kernel = (kernels.cpu() if CPU_DECODE_KERNEL and tables.device.type == "cpu"
                  and kernels.decode_head_dim_ok(self.head_dim) else None)
        if kernel is not None:
            return _DecodePlan(index=tables, bias=tables.new_empty(0), span=span, kernel=kernel,
                               lens=lens)
        pos = torch.arange(span, device=tables.device)
        visible = pos.unsqueeze(0) < lens.unsqueeze(1)  # [B, L]
        bias = torch.zeros(visible.shape, dtype=dtype, device=tables.device)
        bias.masked_fill_(~visible, float("-inf"))
        if batch <= SDPA_MAX_DECODES:
            return _DecodePlan(index=tables.reshape(-1), bias=bias.view(batch, 1, 1, span),
                               span=span)
        slots = tables[:, pos // bs] * bs + pos % bs  # [B, L]
        # Rows ordered (sequence, kv head, position): one gather lands directly in the
        # [B, kvh, L, head_dim] layout the batched matmuls want, with no transpose copy.
        heads = torch.arange(kvh, device=tables.device)
        rows = (slots.unsqueeze(1) * kvh + heads.view(1, kvh, 1)).reshape(-1)
        return _DecodePlan(index=rows, bias=bias.repeat_interleave(kvh, dim=0).unsqueeze(1),
                           span=span)

    def _prefill_kernel(self, meta: AttentionMetadata, dtype: torch.dtype) -> ModuleType | None:
        """The CPU kernels' module where prefill chunks run ours (CPU_PREFILL_KERNEL)."""
        if not (CPU_PREFILL_KERNEL and dtype == torch.bfloat16
                and meta.slot_mapping.device.type == "cpu"
                and self.head_dim % 32 == 0 and self.head_dim <= 256):
            return None
        return kernels.prefill()

    @staticmethod
    def _plan_prefill(seq: PrefillSeq, bs: int, kernel: ModuleType | None) -> _PrefillPlan:
        if seq.num_new < 1 or seq.context_len < seq.num_new:
            raise ValueError(f"bad prefill: {seq.num_new} new tokens, context {seq.context_len}")
        if kernel is not None:
            return _PrefillPlan(seq.start, seq.num_new, kernel, seq, seq.num_new, None, None)
        queries = padded_length(seq.num_new)
        if seq.context_len == seq.num_new:
            return _PrefillPlan(seq.start, seq.num_new, None, seq, queries, rows=None, mask=None)
        device = seq.block_table.device
        pos = torch.arange(seq.context_len, device=device)
        rows = seq.block_table[pos // bs] * bs + pos % bs
        rows = F.pad(rows, (0, padded_length(seq.context_len) - seq.context_len))
        # New token i sits at position context_len - num_new + i and sees keys up to it; the
        # padding keys sit past every new token, so none sees them, and the padding queries
        # past the last one see at least every real key (no row is wholly masked).
        key_pos = torch.arange(rows.shape[0], device=device)
        query_pos = torch.arange(queries, device=device) + (seq.context_len - seq.num_new)
        mask = key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)
        return _PrefillPlan(seq.start, seq.num_new, None, seq, queries, rows=rows, mask=mask)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: torch.Tensor, written: bool = False) -> torch.Tensor:
        """q [T, H, d], k and v [T, kvh, d] (this step's tokens) -> [T, H * d].

        Writes k and v into kv_cache at the metadata's slot_mapping first, unless ``written``
        (the CPU's RoPE kernel wrote them: llama.StepRope).
        """
        num_tokens = q.shape[0]
        if not written:
            write_kv(kv_cache, self.meta.slot_mapping, k, v)

        parts = []
        if self.decode is not None:
            parts.append(self._decode(q[: self.meta.num_decodes], kv_cache, self.decode))
        for plan in self.prefills:
            parts.append(self._prefill(q, k, v, kv_cache, plan))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, plan: _DecodePlan) -> torch.Tensor:
        if plan.kernel is not None:
            return plan.kernel.paged_decode(q, kv_cache, plan.index, plan.lens, self.scale,
                                            CPU_DECODE_BF16_DOT)
        batch, kvh, d, span = q.shape[0], self.num_kv_heads, self.head_dim, plan.span
        # Query heads h*group .. h*group+group-1 share KV head h (HF repeat_kv order), so the
        # group becomes the "query length" of attention per (sequence, KV head): no K/V repeat.
        queries = q.reshape(batch, kvh, self.group, d)
        if batch <= SDPA_MAX_DECODES:
            # Whole blocks [B * blocks, block_size, kvh, d], read as [B, kvh, L, d] in place.
            block = (-1, *kv_cache.shape[2:])
            keys = self._gather(kv_cache, 0, block, plan.index).view(batch, span, kvh, d)
            values = self._gather(kv_cache, 1, block, plan.index).view(batch, span, kvh, d)
            out = F.scaled_dot_product_attention(queries, keys.transpose(1, 2),
                                                 values.transpose(1, 2), scale=self.scale,
                                                 attn_mask=plan.bias)
            return out.view(batch, self.num_heads, d)
        keys = self._gather(kv_cache, 0, (-1, d), plan.index).view(batch, kvh, span, d)
        values = self._gather(kv_cache, 1, (-1, d), plan.index).view(batch, kvh, span, d)
        scores = torch.baddbmm(plan.bias, queries.reshape(batch * kvh, self.group, d),
                               keys.view(batch * kvh, span, d).transpose(1, 2), alpha=self.scale)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs, values.view(batch * kvh, span, d)).view(batch, self.num_heads, d)

    def _gather(self, kv_cache: torch.Tensor, half: int, view: tuple[int, ...],
                rows: torch.Tensor) -> torch.Tensor:
        """``kv_cache[half].view(view).index_select(0, rows)`` into this step's buffer for
        these rows and this half (0 keys, 1 values): the previous layer's use of it is over."""
        source = kv_cache[half].view(view)
        key = (id(rows), half)
        shape = (rows.shape[0], *source.shape[1:])
        out = self._gathered.get(key)
        if out is None or out.shape != shape or out.dtype != source.dtype:
            out = self._gathered[key] = torch.empty(shape, dtype=source.dtype,
                                                    device=source.device)
        return torch.index_select(source, 0, rows, out=out)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: torch.Tensor, plan: _PrefillPlan) -> torch.Tensor:
        if plan.kernel is not None:  # reads the chunk's keys and values from the cache
            return plan.kernel.prefill_attention(q[plan.start:plan.start + plan.num_new],
                                                 kv_cache, plan.seq.block_table,
                                                 plan.seq.context_len, self.scale)
        # Batched 4-D inputs [1, heads, n, d]: on CPU, SDPA takes its flash kernel (GQA
        # included) only for 4-D inputs and falls back to the materializing math path for 3-D.
        end, pad = plan.start + plan.num_new, plan.queries - plan.num_new
        queries = _pad_rows(q[plan.start:end], pad).transpose(0, 1).unsqueeze(0)
        if plan.rows is None:
            keys, values = _pad_rows(k[plan.start:end], pad), _pad_rows(v[plan.start:end], pad)
            mask = None
        else:
            kvh, d = self.num_kv_heads, self.head_dim
            keys = self._gather(kv_cache, 0, (-1, kvh, d), plan.rows)
            values = self._gather(kv_cache, 1, (-1, kvh, d), plan.rows)
            mask = plan.mask
        out = F.scaled_dot_product_attention(
            queries, keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True)
        return out[0, :, :plan.num_new].transpose(0, 1)  # [n, H, d]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [n, heads, d] followed by ``rows`` rows of zeros."""
    return x if rows == 0 else F.pad(x, (0, 0, 0, 0, 0, rows))


class TritonPagedAttention:
    """Attention of one step on the Triton backend: the kernel reads the blocks in place."""

    def __init__(self, meta: AttentionMetadata, config: ModelConfig, dtype: torch.dtype):
        if meta.triton is None:
            raise ValueError("the Triton backend needs AttentionMetadata.triton")
        self.meta = meta
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: torch.Tensor, written: bool = False) -> torch.Tensor:
        """q [T, H, d], k and v [T, kvh, d] -> [T, H * d]; writes k and v into the cache
        first unless ``written``."""
        if not written:
            write_kv(kv_cache, self.meta.slot_mapping, k, v)
        out = paged_attention(q, kv_cache[0], kv_cache[1], self.meta.triton, self.scale)
        return out.view(q.shape[0], self.num_heads * self.head_dim)


def make_attention(meta: AttentionMetadata, config: ModelConfig,
                   dtype: torch.dtype) -> PagedAttention | TritonPagedAttention:
    if meta.triton is not None:
        return TritonPagedAttention(meta, config, dtype)
    return PagedAttention(meta, config, dtype)
