"""The Triton paged-attention kernel equals attention over the gathered context.

Runs on CUDA (``gpu`` marker). With ``TRITON_INTERPRET=1`` set before Python starts (and
Triton installed), the same tests run the kernel in Triton's interpreter on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.support import triton_interpreter
from tests.support.paged_attention import build, reference
from workers.models import triton_attention as ta

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)]
if INTERPRET and ta.available():
    DEVICES.append(pytest.param("cpu", id="cpu-interpreter"))
    triton_interpreter.patch()

pytestmark = pytest.mark.skipif(not ta.available(), reason="Triton is not installed")


def assert_kernel_matches(shape, *, heads, kv_heads, head_dim, device, dtype=torch.float32,
                          block_m=None, num_splits=1, seed=0):
    """The kernel over ``shape`` equals the reference: float32 exactly, else within 2e-2."""
    q, kc, vc, seqs, meta = build(shape, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                  page=16, dtype=dtype, device=device, block_m=block_m,
                                  seed=seed, num_splits=num_splits)
    scale = head_dim ** -0.5
    got = ta.paged_attention(q, kc, vc, meta, scale)
    want = reference(q, kc, vc, seqs, scale)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


CASES = {
    # (num_new, context_len) per sequence
    "decodes": [(1, 1), (1, 17), (1, 64), (1, 200)],
    "prefill_new": [(37, 37)],
    "prefill_over_cached_prefix": [(5, 133), (16, 80)],
    "mixed_batch": [(1, 30), (1, 95), (23, 23), (9, 70), (70, 150)],
    "long_prompt_tiles": [(1, 40), (600, 600), (530, 700)],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (9, 3, 48), (8, 8, 32)])
def test_kernel_equals_attention_over_the_gathered_context(device, case, heads, kv_heads,
                                                           head_dim):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    if device == "cpu" and heads == kv_heads:
        # The interpreter runs every program in numpy: two shapes cover what differs there
        # (2 or 3 query heads per KV head; head dims 16, and 48 padded to 64).
        pytest.skip("the interpreter runs the grouped shapes only")
    assert_kernel_matches(CASES[case], heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                          device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,heads,kv_heads,head_dim,splits", [
    pytest.param(CASES["mixed_batch"], 8, 2, 64, 1, id="mixed"),
    # Llama-3-8B's heads, keys split as for a small batch on a GPU
    pytest.param([(1, 3000), (1, 40), (16, 2000)], 32, 8, 128, 16, id="split-keys"),
])
def test_bfloat16_within_tolerance(device, shape, heads, kv_heads, head_dim, splits):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    if device == "cpu":
        pytest.skip("Triton's interpreter holds data in numpy, which has no bfloat16")
    assert_kernel_matches(shape, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                          device=device, dtype=torch.bfloat16, num_splits=splits)


@pytest.mark.parametrize("device", DEVICES)
def test_a_large_decode_tile_size_leaves_rows_of_other_tokens_alone(device):
    """Prefill-sized tiles over decodes: rows past a sequence's one token are not written."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    assert_kernel_matches(CASES["decodes"], heads=4, kv_heads=2, head_dim=16, device=device,
                          block_m=ta.block_m_for(2, 600))


SPLIT_CASES = {
    "decodes": [(1, 1), (1, 17), (1, 64), (1, 200)],
    "long_decode": [(1, 1000)],
    "chunk_over_long_prefix": [(16, 700)],
    "mixed_batch": [(1, 30), (1, 95), (23, 23), (9, 70), (70, 150)],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
@pytest.mark.parametrize("splits", [2, 3, 32])
def test_keys_split_across_programs_give_the_same_attention(device, case, splits):
    """Flash-decoding: each program takes a share of a tile's keys and a second kernel
    combines the shares. Shares of several BLOCK_N runs (a 1,000-key decode in 2 or 3),
    shares past a short context (32 splits of 1 key: all but one empty), prefill rows that
    see no key of a late share, and every kind of tile in one step."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    assert_kernel_matches(SPLIT_CASES[case], heads=4, kv_heads=2, head_dim=48, device=device,
                          num_splits=splits, seed=splits)


def test_split_count_fills_the_device_only_where_a_step_has_few_tiles():
    assert ta.num_splits(tiles=1, target_tiles=33) == ta.MAX_SPLITS  # capped
    assert ta.num_splits(tiles=8, target_tiles=33) == 4
    assert ta.num_splits(tiles=33, target_tiles=33) == 1
    assert ta.num_splits(tiles=64, target_tiles=33) == 1
    assert ta.num_splits(tiles=0, target_tiles=33) == 1
    # Where the step knows its longest context: at least MIN_SPLIT_KEYS keys per share.
    assert ta.num_splits(tiles=1, target_tiles=33, longest_keys=100) == 1
    assert ta.num_splits(tiles=1, target_tiles=33, longest_keys=3 * ta.MIN_SPLIT_KEYS) == 3
    assert ta.num_splits(tiles=1, target_tiles=33, longest_keys=8192) == ta.MAX_SPLITS
