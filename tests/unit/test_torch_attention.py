"""The torch attention path's prefill: padded to a small set of shapes, exact on the real rows.

On a CPU with AMX, SDPA in bfloat16 compiles oneDNN kernels per shape and keeps them for the
life of the process, so a shape per prompt length grows a worker without bound
(workers/models/attention.py, `padded_length`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tests.support.paged_attention import build, reference
from workers.models.attention import (
    AttentionMetadata,
    PagedAttention,
    PrefillSeq,
    padded_length,
)
from workers.models.config import ModelConfig

HEADS, KV_HEADS, HEAD_DIM, PAGE = 6, 2, 16, 16
CONFIG = ModelConfig(vocab_size=64, hidden_size=HEADS * HEAD_DIM, intermediate_size=8,
                     num_layers=1, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                     rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                     max_position_embeddings=65536, tie_word_embeddings=True,
                     attention_bias=False, bos_token_id=None, eos_token_ids=(0,))


def prefill(seqs_shape: list[tuple[int, int]]
            ) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """Our prefill attention of sequences (num_new, context_len) over random paged caches,
    and the reference's, to compute."""
    q, key_cache, value_cache, seqs, _ = build(seqs_shape, heads=HEADS, kv_heads=KV_HEADS,
                                               head_dim=HEAD_DIM, page=PAGE,
                                               dtype=torch.float32, device="cpu")
    kv_cache = torch.stack([key_cache, value_cache])
    slots, prefills, start = [], [], 0
    for num_new, context_len, table in seqs:
        slots += [table[p // PAGE] * PAGE + p % PAGE
                  for p in range(context_len - num_new, context_len)]
        prefills.append(PrefillSeq(start=start, num_new=num_new, context_len=context_len,
                                   block_table=torch.tensor(table)))
        start += num_new
    slot_mapping = torch.tensor(slots)
    # The new tokens' keys and values are what the cache holds at their slots (the step
    # writes them there first).
    k = key_cache.view(-1, KV_HEADS, HEAD_DIM)[slot_mapping].clone()
    v = value_cache.view(-1, KV_HEADS, HEAD_DIM)[slot_mapping].clone()
    meta = AttentionMetadata(block_size=PAGE, slot_mapping=slot_mapping, num_decodes=0,
                             decode_block_tables=None, decode_context_lens=None,
                             prefills=prefills)
    out = PagedAttention(meta, CONFIG, torch.float32)(q, k, v, kv_cache)
    return (out.view(-1, HEADS, HEAD_DIM),
            lambda: reference(q, key_cache, value_cache, seqs, HEAD_DIM ** -0.5))


def test_padded_length_buckets_grow_by_an_eighth_at_most():
    lengths = range(1, 70_000)
    padded = [padded_length(n) for n in lengths]
    assert all(p >= n for n, p in zip(lengths, padded, strict=True))
    assert all(p <= max(n * 9 / 8, n + 15) for n, p in zip(lengths, padded, strict=True))
    assert padded == sorted(padded)
    assert all(padded_length(p) == p for p in padded)  # a bucket is its own bucket
    assert len(set(padded)) < 110  # 16 per 256 tokens, then 8 per doubling


def test_prefills_of_every_length_run_on_a_few_shapes(monkeypatch):
    shapes: set[tuple[int, int]] = set()
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(q, k, v, **kwargs):
        shapes.add((q.shape[-2], k.shape[-2]))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    for n in range(2, 1025):  # fresh prompts of every length
        prefill([(n, n)])
    fresh = len(shapes)
    for n in range(2, 200, 3):  # chunks over cached prefixes of many lengths
        for cached in range(1, 600, 37):
            prefill([(n, n + cached)])
    # 1,023 prompt lengths and 1,088 (chunk, context) pairs
    assert fresh <= 32
    assert len(shapes) - fresh <= 13 * 21


def test_padded_prefills_equal_the_reference_on_their_rows():
    cases = [[(2, 2)], [(17, 17)], [(255, 255)], [(257, 257)],  # fresh, padded
             [(16, 16)], [(256, 256)],  # fresh, already a bucket
             [(3, 40)], [(16, 1024)], [(100, 700)], [(257, 1000)],  # over a cached prefix
             [(5, 5), (7, 30), (33, 33), (16, 300)]]  # several in one step
    for seqs_shape in cases:
        out, reference_of = prefill(seqs_shape)
        expected = reference_of()
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4, msg=str(seqs_shape))
