"""The CPU paged decode attention kernel (workers/kernels/paged_decode.cpp) against the
reference (each sequence's context gathered from its blocks, then SDPA), and its checks of
what it is handed. ``make install`` builds it; a machine with no compiler serves the torch
path instead, but these tests want the kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.support.cpu_kernels import recording, spy_on_kernel
from tests.support.paged_attention import build, reference
from workers import kernels

CONTEXTS = [1, 2, 15, 16, 17, 33, 48, 200]


@pytest.fixture(scope="module")
def kernel():
    module = kernels.cpu()
    assert module is not None, "the CPU kernel did not build (see the warning logged)"
    return module


def decode_case(contexts, heads, kv_heads, dtype, head_dim=64, page=16):
    q, key_cache, value_cache, seqs, _ = build([(1, c) for c in contexts], heads=heads,
                                               kv_heads=kv_heads, head_dim=head_dim, page=page,
                                               dtype=dtype, device="cpu")
    width = max(len(table) for _, _, table in seqs)
    tables = torch.tensor([table + [0] * (width - len(table)) for _, _, table in seqs])
    lens = torch.tensor(contexts)
    kv_cache = torch.stack([key_cache, value_cache]).contiguous()
    return q, kv_cache, tables, lens, reference(q, key_cache, value_cache, seqs,
                                                head_dim ** -0.5)


# In bfloat16 a CPU with AVX512-BF16 runs heads of 64 and 128 on its dot-product instruction
# (bf16_dot, the default) unless told to widen the rows to floats as other CPUs do: both paths
# are tested wherever the first is compiled in.
BF16_PATHS = [True, False] if kernels.cpu() is not None and \
    kernels.cpu().paged_decode_has_bf16_dot() else [False]


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("dtype,atol,bf16_dot", [(torch.float32, 1e-5, False)] +
                         [(torch.bfloat16, 2e-2, dot) for dot in BF16_PATHS])
def test_paged_decode_matches_the_reference(kernel, heads, kv_heads, dtype, atol, bf16_dot):
    q, kv_cache, tables, lens, expected = decode_case(CONTEXTS, heads, kv_heads, dtype)
    out = kernel.paged_decode(q, kv_cache, tables, lens, 64 ** -0.5, bf16_dot)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("head_dim,page", [(128, 16), (96, 16), (64, 8), (64, 32), (256, 16)])
def test_paged_decode_takes_other_head_sizes_and_block_sizes(kernel, head_dim, page):
    # 64 and 128 are compiled for their size, others read it at run time; blocks of other
    # sizes than the 16 keys reduced at a time split or pad that tile.
    q, kv_cache, tables, lens, expected = decode_case(CONTEXTS, 8, 2, torch.float32,
                                                      head_dim=head_dim, page=page)
    out = kernel.paged_decode(q, kv_cache, tables, lens, head_dim ** -0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bf16_dot", BF16_PATHS)
@pytest.mark.parametrize("head_dim,page", [(64, 16), (128, 16), (64, 5), (128, 7), (96, 16),
                                           (64, 32)])
def test_paged_decode_in_bfloat16_takes_head_and_block_sizes(kernel, head_dim, page, bf16_dot):
    # The dot-product path takes values in pairs of tokens, so blocks of an odd size end on a
    # pair with one token; heads of other sizes (96) widen the rows to floats.
    q, kv_cache, tables, lens, expected = decode_case(CONTEXTS, 8, 2, torch.bfloat16,
                                                      head_dim=head_dim, page=page)
    out = kernel.paged_decode(q, kv_cache, tables, lens, head_dim ** -0.5, bf16_dot)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=0)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype,atol,bf16_dot", [(torch.float32, 1e-5, False)] +
                         [(torch.bfloat16, 2e-2, dot) for dot in BF16_PATHS])
@pytest.mark.parametrize("contexts", [[200], [33, 5, 16, 1, 47, 200]],
                         ids=["by head", "by sequence"])
def test_paged_decode_splits_work_by_head_or_by_sequence(kernel, one_thread, dtype, atol,
                                                         bf16_dot, contexts):
    # Four sequences or more a thread: an item is a sequence with all its KV heads; fewer
    # split each sequence by KV head. Both give the reference's result.
    q, kv_cache, tables, lens, expected = decode_case(contexts, 12, 3, dtype)
    out = kernel.paged_decode(q, kv_cache, tables, lens, 0.125, bf16_dot)
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("dtype,bf16_dot", [(torch.float32, False)] +
                         [(torch.bfloat16, dot) for dot in BF16_PATHS])
@pytest.mark.parametrize("page", [16, 5])
def test_paged_decode_reads_nothing_past_a_sequences_end(kernel, dtype, bf16_dot, page):
    # A block's rows past the sequence's last token hold whatever was there before (here NaN):
    # not one of them reaches the result, even where keys and values are taken in pairs.
    contexts = [1, 17, 23, 40]
    q, kv_cache, tables, lens, expected = decode_case(contexts, 9, 3, dtype, page=page)
    used = torch.zeros(kv_cache.shape[1], page, dtype=torch.bool)
    for row, n in zip(tables.tolist(), contexts, strict=True):
        for pos in range(n):
            used[row[pos // page], pos % page] = True
    kv_cache[:, ~used] = float("nan")
    out = kernel.paged_decode(q, kv_cache, tables, lens, 0.125, bf16_dot)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected.float(),
                               atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)


def test_paged_decode_softmax_holds_scores_far_apart(kernel):
    # Scores hundreds apart: the exponentials of all but the top few underflow to 0, none to
    # NaN, and the result is still the reference's.
    q, key_cache, value_cache, seqs, _ = build([(1, 40), (1, 7)], heads=9, kv_heads=3,
                                               head_dim=64, page=16, dtype=torch.float32,
                                               device="cpu")
    q = q * 300
    tables = torch.tensor([table + [0] * (3 - len(table)) for _, _, table in seqs])
    kv_cache = torch.stack([key_cache, value_cache]).contiguous()
    out = kernel.paged_decode(q, kv_cache, tables, torch.tensor([40, 7]), 0.125)
    expected = reference(q, key_cache, value_cache, seqs, 0.125)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_paged_decode_refuses_a_head_size_it_does_not_vectorize(kernel):
    q, kv_cache, tables, lens, _ = decode_case([5], 4, 2, torch.float32, head_dim=72)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernel.paged_decode(q, kv_cache, tables, lens, 0.125)


def test_paged_decode_reads_a_non_contiguous_query(kernel):
    # The model hands it a slice of the fused q/k projection.
    q, kv_cache, tables, lens, expected = decode_case([5, 40], 9, 3, torch.float32)
    wide = torch.cat([q, torch.zeros_like(q)], dim=1)[:, :9]
    assert not wide.is_contiguous()
    torch.testing.assert_close(kernel.paged_decode(wide, kv_cache, tables, lens, 0.125),
                               expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("what", ["block id", "past the table", "empty"])
def test_paged_decode_refuses_what_it_would_read_out_of_bounds(kernel, what):
    q, kv_cache, tables, lens, _ = decode_case([17, 3], 9, 3, torch.float32)
    if what == "block id":
        tables[0, 1] = kv_cache.shape[1]
    elif what == "past the table":
        lens[1] = tables.shape[1] * kv_cache.shape[2] + 1
    else:
        lens[0] = 0
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.paged_decode(q, kv_cache, tables, lens, 0.125)


def test_the_model_decodes_through_the_kernel_on_cpu(monkeypatch):
    from workers.models import attention

    meta = attention.AttentionMetadata(
        block_size=16, slot_mapping=torch.zeros(2, dtype=torch.long), num_decodes=2,
        decode_block_tables=torch.tensor([[1, 2], [3, 0]]),
        decode_context_lens=torch.tensor([20, 7]), prefills=[])
    config = type("C", (), dict(num_heads=9, num_kv_heads=3, head_dim=64))()
    assert attention.PagedAttention(meta, config, torch.float32).decode.kernel is not None
    odd = type("C", (), dict(num_heads=9, num_kv_heads=3, head_dim=72))()
    assert attention.PagedAttention(meta, odd, torch.float32).decode.kernel is None
    monkeypatch.setattr(attention, "CPU_DECODE_KERNEL", False)
    assert attention.PagedAttention(meta, config, torch.float32).decode.kernel is None


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows", [0, 1, 2, 3])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (100, 37), (1536, 16)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_small_linear_matches_f_linear(kernel, dtype, rtol, rows, in_features, out_features,
                                       with_bias):
    # Widths that are not whole vectors (100, 37) take the kernel's scalar tails.
    gen = torch.Generator().manual_seed(rows * 7 + in_features)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    bias = torch.randn(out_features, generator=gen).to(dtype) if with_bias else None
    out = kernel.small_linear(x, weight, bias)
    expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    assert out.dtype == dtype and out.shape == (rows, out_features)
    torch.testing.assert_close(out.float(), expected, rtol=rtol,
                               atol=rtol * max(1.0, float(expected.abs().max()) if rows else 1))


def test_small_linear_reads_a_non_contiguous_row_and_refuses_mismatches(kernel):
    x = torch.randn(2, 64)[:, ::2]
    weight = torch.randn(8, 32)
    torch.testing.assert_close(kernel.small_linear(x, weight, None), x @ weight.t())
    with pytest.raises(RuntimeError, match="x \\[M, K\\]"):
        kernel.small_linear(torch.randn(1, 31), weight, None)
    with pytest.raises(RuntimeError, match="dtype"):
        kernel.small_linear(torch.randn(1, 32).bfloat16(), weight, None)
    with pytest.raises(RuntimeError, match="bias"):
        kernel.small_linear(torch.randn(1, 32), weight, torch.randn(7))


PAIRS = kernels.cpu() is not None and kernels.cpu().pairs_linear_available()


def _laid_out_projection(layout: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A bfloat16 Projection(64 -> 48, bias) laid out as ``layout``, and its plain weight."""
    from workers.models import llama

    proj = llama.Projection(64, 48, True, torch.bfloat16, "cpu")
    with torch.no_grad():
        proj.weight.normal_()
        proj.bias.normal_()
    plain = proj.weight.detach().clone()
    model = torch.nn.Module()
    model.proj = proj
    model.embed_tokens = None
    llama.LlamaForCausalLM.lay_out_weights(model, layout)
    return proj, plain


def _assert_projects(proj: torch.nn.Module, plain: torch.Tensor, x: torch.Tensor) -> None:
    torch.testing.assert_close(proj(x).float(), F.linear(x.float(), plain.float(),
                                                         proj.bias.float()),
                               rtol=2e-2, atol=5e-2)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="weights are packed only where oneDNN computes bfloat16")
def test_packed_projections_run_small_steps_on_our_kernel(monkeypatch):
    # Steps of one or two tokens run our kernel on the plain weight, kept beside the packed
    # copy; larger steps run oneDNN's.
    from workers.models import llama

    proj, plain = _laid_out_projection("packed")
    assert proj.small is not None and proj.packed is not None and proj.pairs is None
    assert torch.equal(proj.weight, plain)
    calls: list[tuple[str, int]] = []
    proj.small = recording(proj.small, {"pairs_linear", "small_linear"}, calls,
                           lambda name, args: (name, args[0].shape[0]))
    for rows in (1, 2, 3, 16, 300):
        _assert_projects(proj, plain, torch.randn(rows, 64).bfloat16())
    assert calls == [("small_linear", 1), ("small_linear", 2)]
    monkeypatch.setattr(llama, "SMALL_BATCH_ROWS", 0)
    calls.clear()
    proj(torch.randn(1, 64).bfloat16())
    assert calls == []


@pytest.mark.skipif(kernels.pairs() is None,
                    reason="the pairs layout serves on AVX512-BF16")
def test_projections_in_pairs_run_every_step_on_our_kernel():
    # One copy, in pairs: the plain weight let go and no packed copy; steps of any size run
    # the pairs kernel.
    proj, plain = _laid_out_projection("pairs")
    assert proj.pairs is not None and proj.packed is None and proj.weight.numel() == 0
    calls: list[tuple[str, int]] = []
    proj.small = recording(proj.small, {"pairs_linear", "small_linear"}, calls,
                           lambda name, args: (name, args[0].shape[0]))
    for rows in (1, 2, 3, 16, 300):
        _assert_projects(proj, plain, torch.randn(rows, 64).bfloat16())
    assert calls == [("pairs_linear", r) for r in (1, 2, 3, 16, 300)]


@pytest.mark.skipif(not PAIRS, reason="the pairs kernel needs AVX512-BF16")
@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("rows", [0, 1, 2, 7, 8, 9, 16, 17, 33, 300])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (38, 100), (1536, 16),
                                                      (2, 33), (96, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_pairs_linear_matches_f_linear(kernel, amx, rows, in_features, out_features, with_bias):
    # On AMX (where the CPU has it, unless amx is False): whole and zero-padded 16-row tiles,
    # one or two per pass, and inputs past the last whole 32 (38, 2) on vdpbf16ps.
    gen = torch.Generator().manual_seed(rows * 7 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    bias = torch.randn(out_features, generator=gen).bfloat16() if with_bias else None
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    packed = kernel.pairs_pack(weight)
    assert packed.shape == (-(-out_features // 32), in_features // 2, 64)
    out = kernel.pairs_linear(x, packed, out_features, bias, amx=amx)
    exact = x.double() @ weight.double().t() + (0 if bias is None else bias.double())
    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
    # Products exact, sums in float32: within the rounding of the output to bfloat16.
    torch.testing.assert_close(out.double(), exact, rtol=2 ** -8, atol=1e-3)


@pytest.mark.skipif(not PAIRS, reason="the pairs kernel needs AVX512-BF16")
@pytest.mark.parametrize("threads", [1, 3, 16])
@pytest.mark.parametrize("rows", [1, 9, 300])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (64, 33)])
def test_pairs_linear_splits_rows_over_threads_when_tiles_are_few(kernel, threads, rows,
                                                                 in_features, out_features):
    # Two 32-column tiles on 16 threads: the rows are cut into blocks, every row computed once.
    gen = torch.Generator().manual_seed(rows + threads)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernel.pairs_linear(x, kernel.pairs_pack(weight), out_features, None)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out.double(), x.double() @ weight.double().t(),
                               rtol=2 ** -8, atol=1e-3)


@pytest.mark.skipif(not PAIRS or "amx_bf16" not in kernels._flags_line().split(),
                    reason="a CPU with AMX")
def test_pairs_linear_runs_on_amx_where_the_cpu_has_it(kernel):
    # Linux grants the tile state on request: a CPU with AMX never falls back silently.
    assert kernel.pairs_linear_amx_available()


@pytest.mark.skipif(not PAIRS, reason="the pairs kernel needs AVX512-BF16")
def test_pairs_linear_refuses_what_it_would_read_wrongly(kernel):
    weight = torch.randn(40, 32).bfloat16()
    packed = kernel.pairs_pack(weight)
    x = torch.randn(3, 32).bfloat16()
    torch.testing.assert_close(kernel.pairs_linear(x[:, :], packed, 40, None).float(),
                               (x.float() @ weight.float().t()), rtol=1e-2, atol=5e-2)
    strided = torch.randn(3, 64).bfloat16()[:, ::2]  # read from a contiguous copy
    torch.testing.assert_close(kernel.pairs_linear(strided, packed, 40, None).float(),
                               strided.float() @ weight.float().t(), rtol=1e-2, atol=5e-2)
    with pytest.raises(RuntimeError, match="even"):
        kernel.pairs_pack(torch.randn(8, 31).bfloat16())
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel.pairs_pack(torch.randn(8, 32))
    for n in (0, 8, 32, 65):  # out_features the packed copy cannot hold
        with pytest.raises(RuntimeError, match="pairs_pack"):
            kernel.pairs_linear(x, packed, n, None)
    with pytest.raises(RuntimeError, match="pairs_pack"):
        kernel.pairs_linear(torch.randn(3, 30).bfloat16(), packed, 40, None)
    with pytest.raises(RuntimeError, match="bias"):
        kernel.pairs_linear(x, packed, 40, torch.randn(39).bfloat16())
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel.pairs_linear(x.float(), packed, 40, None)


def _panels_projection(out_features: int = 48, bias: bool = True
                       ) -> tuple[torch.nn.Module, torch.Tensor]:
    """A float32 Projection(64 -> out_features) laid out in panels, and its plain weight."""
    from workers.models import llama

    proj = llama.Projection(64, out_features, bias, torch.float32, "cpu")
    with torch.no_grad():
        proj.weight.normal_()
        if bias:
            proj.bias.normal_()
    plain = proj.weight.detach().clone()
    model = torch.nn.Module()
    model.proj = proj
    model.embed_tokens = None
    llama.LlamaForCausalLM.lay_out_weights(model, "panels")
    return proj, plain


def test_projections_in_panels_run_every_step_on_our_kernel():
    # One copy, in panels: the plain weight let go and no other copy; steps of any size run
    # the panels kernel.
    proj, plain = _panels_projection()
    assert proj.panels is not None and proj.weight.numel() == 0
    assert proj.packed is None and proj.slices is None and proj.pairs is None
    calls: list[tuple[str, int]] = []
    proj.small = recording(proj.small, {"panels_linear", "small_linear"}, calls,
                           lambda name, args: (name, args[0].shape[0]))
    for rows in (1, 2, 3, 16, 300):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(proj(x), F.linear(x, plain, proj.bias))
    assert calls == [("panels_linear", r) for r in (1, 2, 3, 16, 300)]


@pytest.mark.parametrize("rows", [0, 1, 2, 5, 6, 7, 12, 13, 64, 65, 300])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (17, 33), (1536, 16),
                                                      (300, 100), (1, 7)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_panels_linear_matches_f_linear(kernel, rows, in_features, out_features, with_bias):
    # Whole and partial panels of columns, rows in whole and partial register blocks, and
    # past 64 rows in blocks of inputs whose sums are carried in the output.
    gen = torch.Generator().manual_seed(rows * 7 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    x = torch.randn(rows, in_features, generator=gen)
    packed = kernel.panels_pack(weight)
    width = kernel.panels_width()
    assert width in (16, 32) and packed.shape == (-(-out_features // width), in_features, width)
    out = kernel.panels_linear(x, packed, out_features, bias)
    exact = x.double() @ weight.double().t() + (0 if bias is None else bias.double())
    assert out.dtype == torch.float32 and out.shape == (rows, out_features)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 3, 16])
def test_panels_linear_gives_a_row_the_same_bits_in_any_step(kernel, threads):
    # Each row's sums run in input order whatever the step's other rows (how many, and so
    # which blocks of rows and inputs), and however the threads share the work: a request's
    # logits do not depend on which requests share its step.
    gen = torch.Generator().manual_seed(threads)
    weight = torch.randn(40, 600, generator=gen)
    bias = torch.randn(40, generator=gen)
    x = torch.randn(300, 600, generator=gen)
    packed = kernel.panels_pack(weight)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        full = kernel.panels_linear(x, packed, 40, bias)
        for start, rows in ((0, 1), (17, 1), (5, 7), (100, 64), (30, 65), (299, 1)):
            part = kernel.panels_linear(x[start:start + rows], packed, 40, bias)
            assert torch.equal(part, full[start:start + rows]), (start, rows)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(full.double(), x.double() @ weight.double().t() + bias.double(),
                               rtol=1e-5, atol=1e-4)


def test_panels_linear_holds_non_finite_inputs_to_their_rows(kernel):
    # A NaN or infinity in one row's inputs reaches that row's outputs only.
    weight = torch.randn(20, 32)
    packed = kernel.panels_pack(weight)
    x = torch.randn(9, 32)
    x[2, 5], x[7, 0] = float("nan"), float("inf")
    out = kernel.panels_linear(x, packed, 20, None)
    assert out[2].isnan().all() and not out[7].isfinite().any()
    finite = [r for r in range(9) if r not in (2, 7)]
    torch.testing.assert_close(out[finite], x[finite] @ weight.t())


def test_panels_linear_refuses_what_it_would_read_wrongly(kernel):
    weight = torch.randn(40, 32)
    packed = kernel.panels_pack(weight)
    strided = torch.randn(3, 64)[:, ::2]  # read from a contiguous copy
    torch.testing.assert_close(kernel.panels_linear(strided, packed, 40, None),
                               strided @ weight.t())
    with pytest.raises(RuntimeError, match="float32"):
        kernel.panels_pack(torch.randn(8, 32).bfloat16())
    with pytest.raises(RuntimeError, match="positive"):
        kernel.panels_pack(torch.randn(8, 0))
    x = torch.randn(3, 32)
    width = kernel.panels_width()
    for n in (0, 8 if width == 16 else 16, 64 if width == 16 else 72):
        with pytest.raises(RuntimeError, match="panels_pack"):
            kernel.panels_linear(x, packed, n, None)
    with pytest.raises(RuntimeError, match="panels_pack"):
        kernel.panels_linear(torch.randn(3, 30), packed, 40, None)
    with pytest.raises(RuntimeError, match="panels_pack"):
        kernel.panels_linear(x, packed.transpose(1, 2), 40, None)
    with pytest.raises(RuntimeError, match="bias"):
        kernel.panels_linear(x, packed, 40, torch.randn(39))
    with pytest.raises(RuntimeError, match="float32"):
        kernel.panels_linear(x.bfloat16(), packed, 40, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 576), (3, 100), (64, 576)])
def test_add_rms_norm_matches_torch(kernel, dtype, rows, hidden):
    gen = torch.Generator().manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    out, total = kernel.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(total, x + residual)  # rounded to the dtype as torch's add rounds it
    expected = F.rms_norm(x + residual, (hidden,), weight, 1e-5)
    # One rounding at the end, as F.rms_norm: bfloat16 results equal but for the order of the
    # sum of squares (an ulp, rarely).
    torch.testing.assert_close(out, expected, rtol=1e-5 if dtype == torch.float32 else 8e-3,
                               atol=1e-5 if dtype == torch.float32 else 8e-3)
    if dtype == torch.bfloat16:
        assert (out != expected).float().mean() < 0.01
    alone, same = kernel.add_rms_norm(x, None, weight, 1e-5)
    assert same.data_ptr() == x.data_ptr()
    torch.testing.assert_close(alone.float(), F.rms_norm(x, (hidden,), weight, 1e-5).float(),
                               rtol=1e-5, atol=8e-3)


def test_add_rms_norm_refuses_mismatches(kernel):
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="weight"):
        kernel.add_rms_norm(x, None, torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="residual"):
        kernel.add_rms_norm(x, torch.randn(3, 8), torch.ones(8), 1e-5)


def test_the_model_norms_through_the_kernel_on_cpu(monkeypatch):
    from workers.models import llama

    calls = spy_on_kernel(monkeypatch, "add_rms_norm")
    x, residual, weight = torch.randn(2, 16), torch.randn(2, 16), torch.ones(16)
    out, total = llama.add_rms_norm(x, residual, weight, 1e-6)
    assert calls == [(2, 16)]
    monkeypatch.setattr(llama, "CPU_NORM_KERNEL", False)
    torch_out, torch_total = llama.add_rms_norm(x, residual, weight, 1e-6)
    assert calls == [(2, 16)]
    torch.testing.assert_close(out, torch_out)
    assert torch.equal(total, torch_total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,dim", [(0, 64), (1, 1536), (3, 37), (16, 1536)])
def test_silu_mul_matches_torch(kernel, dtype, rows, dim):
    # Read in place from the halves of one [T, 2I] output (strided rows), as the model does.
    gen = torch.Generator().manual_seed(rows + dim)
    both = (torch.randn(rows, 2 * dim, generator=gen) * 4).to(dtype)
    gate, up = both[:, :dim], both[:, dim:]
    out = kernel.silu_mul(gate, up)
    expected = F.silu(gate) * up
    assert out.dtype == dtype and out.shape == (rows, dim) and out.is_contiguous()
    # Rounded as torch rounds: silu to the dtype, then the product (bfloat16 equal but for an
    # ulp where the exponentials differ in their last bits).
    torch.testing.assert_close(out, expected, rtol=1e-5 if dtype == torch.float32 else 8e-3,
                               atol=1e-5)
    if dtype == torch.bfloat16 and rows:
        assert (out != expected).float().mean() < 0.01


def test_silu_mul_holds_extreme_inputs_and_refuses_mismatches(kernel):
    gate = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, float("inf"),
                          float("nan")] * 2])
    up = torch.full_like(gate, 3.0)
    out = kernel.silu_mul(gate, up)
    expected = F.silu(gate) * up
    torch.testing.assert_close(out[:, :8], expected[:, :8])
    assert out[0, 8].isnan() and out[0, 17].isnan()
    low = kernel.silu_mul(gate.bfloat16(), up.bfloat16())  # rounded in vectors, NaN kept
    torch.testing.assert_close(low, F.silu(gate.bfloat16()) * up.bfloat16(), equal_nan=True)
    torch.testing.assert_close(kernel.silu_mul(gate[:, ::2], up[:, ::2]), expected[:, ::2],
                               equal_nan=True)  # columns not contiguous: read from a copy
    with pytest.raises(RuntimeError, match="one shape"):
        kernel.silu_mul(torch.randn(2, 8), torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="dtype"):
        kernel.silu_mul(torch.randn(2, 8), torch.randn(2, 8).bfloat16())


@pytest.mark.parametrize("layout,dtype", [("plain", torch.float32), ("sliced", torch.float32),
                                          ("panels", torch.float32), ("packed", torch.bfloat16)])
def test_the_mlp_runs_its_activation_through_the_kernel_on_cpu(monkeypatch, layout, dtype):
    # The gate/up halves come from every weight layout (a weight sliced in two hands over its
    # two slices as they are), and the layer's output equals torch's activation's.
    from workers.models import llama

    if layout == "packed" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("weights are packed only where oneDNN computes bfloat16")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # two slices
    proj = llama.Projection(64, 2 * 48, False, dtype, "cpu")
    with torch.no_grad():
        proj.weight.normal_()
    plain = proj.weight.detach().float().clone()
    model = torch.nn.Module()
    model.proj = proj
    model.embed_tokens = None
    llama.LlamaForCausalLM.lay_out_weights(model, layout)
    calls = spy_on_kernel(monkeypatch, "silu_mul")
    for rows in (1, 5):
        x = torch.randn(rows, 64).to(dtype)
        gate, up = proj.halves(x)
        if layout == "sliced":
            assert gate.is_contiguous() and up.is_contiguous()  # the slices, not a reordering
        full = x.float() @ plain.t()
        tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(gate.float(), full[:, :48], **tol)
        torch.testing.assert_close(up.float(), full[:, 48:], **tol)
        out = llama.mlp_activation(proj, x)
        monkeypatch.setattr(llama, "CPU_SILU_MUL_KERNEL", False)
        torch.testing.assert_close(out, llama.mlp_activation(proj, x), rtol=8e-3, atol=1e-5)
        monkeypatch.setattr(llama, "CPU_SILU_MUL_KERNEL", True)
    assert calls == [(1, 48), (5, 48)]


def rope_case(tokens, heads, kv_heads, head_dim, dtype, seed=0, blocks=8, page=16):
    """A step's q/k/v rows (every other row of a wider tensor: strided, as a projection's
    output may be), RoPE tables for 64 positions, the positions and distinct cache slots."""
    gen = torch.Generator().manual_seed(seed)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = (torch.randn(tokens, 2 * width, generator=gen) * 3).to(dtype)[:, :width]
    config = type("C", (), dict(head_dim=head_dim, rope_theta=10000.0, rope_scaling=None,
                                max_position_embeddings=64))()
    from workers.models.llama import rope_tables

    cos, signed_sin = rope_tables(config, dtype, "cpu")
    positions = torch.randint(0, 64, (tokens,), generator=gen)
    slots = torch.randperm(blocks * page, generator=gen)[:tokens]
    kv_cache = torch.randn(2, blocks, page, kv_heads, head_dim, generator=gen).to(dtype)
    return qkv, cos, signed_sin, positions, kv_cache, slots


def torch_rope_write_kv(qkv, cos, signed_sin, positions, kv_cache, slots, heads, kv_heads):
    """What the model runs without the kernel: apply_rope on queries and keys, write_kv."""
    from workers.models.attention import write_kv
    from workers.models.llama import apply_rope

    t, d = qkv.shape[0], kv_cache.shape[-1]
    qk = apply_rope(qkv[:, : (heads + kv_heads) * d].reshape(t, heads + kv_heads, d),
                    cos[positions].unsqueeze(1), signed_sin[positions].unsqueeze(1))
    v = qkv[:, (heads + kv_heads) * d:].reshape(t, kv_heads, d)
    write_kv(kv_cache, slots, qk[:, heads:], v)
    return torch.cat([qk.reshape(t, (heads + kv_heads) * d), v.reshape(t, kv_heads * d)], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [0, 1, 5, 100])  # 100: split over threads
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 2, 16), (2, 1, 80),
                                                     (3, 3, 6)])
def test_rope_write_kv_matches_the_torch_path(kernel, dtype, tokens, heads, kv_heads, head_dim):
    qkv, cos, ssin, positions, kv_cache, slots = rope_case(tokens, heads, kv_heads, head_dim,
                                                           dtype, seed=tokens + head_dim)
    expected_cache = kv_cache.clone()
    expected = torch_rope_write_kv(qkv.clone(), cos, ssin, positions, expected_cache, slots,
                                   heads, kv_heads)
    kernel.rope_write_kv(qkv, cos, ssin, positions, kv_cache, slots, heads, kv_heads)
    if dtype == torch.float32:  # the compiler may fuse the multiply-add: an ulp apart
        torch.testing.assert_close(qkv, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kv_cache, expected_cache, rtol=1e-6, atol=1e-6)
    else:  # the product is exact in a float: rounded as torch rounds, equal
        assert torch.equal(qkv, expected)
        assert torch.equal(kv_cache, expected_cache)  # the slots written, nothing else


def test_rope_write_kv_rotates_pairs_half_a_head_apart(kernel):
    # One head of 4 at position 1: angles 1 and 0.01 for the pairs (0, 2) and (1, 3); values
    # at hand, so a mistaken pairing cannot hide in a mistake shared with the torch path.
    config = type("C", (), dict(head_dim=4, rope_theta=10000.0, rope_scaling=None,
                                max_position_embeddings=2))()
    from workers.models.llama import rope_tables

    cos, ssin = rope_tables(config, torch.float32, "cpu")
    qkv = torch.tensor([[1.0, 2.0, 3.0, 4.0, 1.0, 0.0, 0.0, 0.0, 5.0, 6.0, 7.0, 8.0]])
    kv_cache = torch.zeros(2, 1, 4, 1, 4)
    kernel.rope_write_kv(qkv, cos, ssin, torch.tensor([1]), kv_cache, torch.tensor([2]), 1, 1)
    c, s = torch.cos(torch.tensor(1.0)).item(), torch.sin(torch.tensor(1.0)).item()
    c2, s2 = torch.cos(torch.tensor(0.01)).item(), torch.sin(torch.tensor(0.01)).item()
    expected_q = [1 * c - 3 * s, 2 * c2 - 4 * s2, 3 * c + 1 * s, 4 * c2 + 2 * s2]
    torch.testing.assert_close(qkv[0, :4], torch.tensor(expected_q))
    torch.testing.assert_close(kv_cache[0, 0, 2, 0], torch.tensor([c, 0.0, s, 0.0]))
    assert kv_cache[1, 0, 2, 0].tolist() == [5.0, 6.0, 7.0, 8.0]
    assert not kv_cache[:, 0, [0, 1, 3]].any()


def test_rope_write_kv_refuses_what_it_would_read_or_write_out_of_bounds(kernel):
    qkv, cos, ssin, positions, kv_cache, slots = rope_case(3, 4, 2, 16, torch.float32)
    before = (qkv.clone(), kv_cache.clone())
    for bad_positions, bad_slots, match in (
            (torch.tensor([0, 64, 1]), slots, "position 64 outside"),
            (torch.tensor([0, -1, 1]), slots, "position -1 outside"),
            (positions, torch.tensor([0, 1, 128]), "slot 128 outside"),
            (positions, torch.tensor([-3, 1, 2]), "slot -3 outside"),
            (positions[:2], slots, "int64")):
        with pytest.raises(RuntimeError, match=match):
            kernel.rope_write_kv(qkv, cos, ssin, bad_positions, kv_cache, bad_slots, 4, 2)
    with pytest.raises(RuntimeError, match="dtype"):
        kernel.rope_write_kv(qkv, cos.bfloat16(), ssin.bfloat16(), positions, kv_cache, slots,
                             4, 2)
    with pytest.raises(RuntimeError, match="qkv"):
        kernel.rope_write_kv(qkv, cos, ssin, positions, kv_cache, slots, 5, 2)
    with pytest.raises(RuntimeError, match="kv_cache"):
        kernel.rope_write_kv(qkv, cos, ssin, positions, kv_cache, slots, 4, 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel.rope_write_kv(qkv, cos, ssin, positions, kv_cache.transpose(1, 2), slots, 4, 2)
    # Checked before anything was touched.
    assert torch.equal(qkv, before[0]) and torch.equal(kv_cache, before[1])


PREFILL = kernels.cpu() is not None and kernels.cpu().prefill_attention_available()


def prefill_case(new, context, heads, kv_heads, head_dim, page, seed=0, blocks=None):
    """A chunk's queries (strided rows, as views of the q/k/v projection are), a cache whose
    blocks for this sequence are shuffled, filled with noise elsewhere, and the expected
    output from float64 attention over the gathered context."""
    gen = torch.Generator().manual_seed(seed)
    used = -(-context // page)
    blocks = blocks or used + 5
    kv_cache = torch.randn(2, blocks, page, kv_heads, head_dim, generator=gen).bfloat16()
    table = torch.randperm(blocks, generator=gen)[:used]
    width = (heads + 2 * kv_heads) * head_dim
    q = torch.randn(new, width, generator=gen).bfloat16()[:, :heads * head_dim]
    q = q.view(new, heads, head_dim)
    pos = torch.arange(context)
    slots = table[pos // page] * page + pos % page
    keys = kv_cache[0].reshape(-1, kv_heads, head_dim)[slots].double()
    values = kv_cache[1].reshape(-1, kv_heads, head_dim)[slots].double()
    group = heads // kv_heads
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.einsum("nhd,khd->hnk", q.double(), keys) * head_dim ** -0.5
    query_pos = torch.arange(new) + context - new
    scores.masked_fill_(pos.view(1, 1, -1) > query_pos.view(1, -1, 1), float("-inf"))
    expected = torch.einsum("hnk,khd->nhd", scores.softmax(-1), values)
    return q, kv_cache, table, expected


@pytest.mark.skipif(not PREFILL, reason="the prefill kernel needs AVX512-BF16")
@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("new,context", [(2, 2), (16, 16), (17, 17), (100, 100), (5, 40),
                                         (16, 1024), (33, 64), (300, 333)])
@pytest.mark.parametrize("heads,kv_heads,head_dim,page", [(9, 3, 64, 16), (4, 4, 128, 16),
                                                          (8, 1, 64, 5), (2, 2, 32, 32)])
def test_prefill_attention_matches_the_reference(kernel, amx, new, context, heads, kv_heads,
                                                 head_dim, page):
    # Products on AMX where the CPU has it (rows of an item: 16 tokens x the group, 1 to 8
    # tiles of 16; a last item's partial tile), or on vdpbf16ps.
    q, kv_cache, table, expected = prefill_case(new, context, heads, kv_heads, head_dim, page,
                                                seed=new * 31 + context)
    out = kernel.prefill_attention(q, kv_cache, table, context, head_dim ** -0.5, amx=amx)
    assert out.dtype == torch.bfloat16 and out.shape == (new, heads, head_dim)
    # bfloat16 inputs, float32 sums, probabilities rounded to bfloat16 as SDPA rounds them.
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
    assert (out.double() - expected).abs().mean() < 4e-3


@pytest.mark.skipif(not PREFILL, reason="the prefill kernel needs AVX512-BF16")
@pytest.mark.parametrize("amx", [True, False])
def test_prefill_attention_reads_nothing_past_the_context(kernel, amx):
    # Rows past the context in its last block (and other blocks) hold NaN: no weight of 0
    # may touch them, since 0 * NaN is NaN.
    q, kv_cache, table, expected = prefill_case(20, 37, 4, 2, 64, 16)
    for half in (0, 1):
        last = kv_cache[half, table[-1]]
        last[37 % 16:] = float("nan")
    spare = [b for b in range(kv_cache.shape[1]) if b not in table.tolist()]
    kv_cache[:, spare] = float("nan")
    out = kernel.prefill_attention(q, kv_cache, table, 37, 0.125, amx=amx)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not PREFILL, reason="the prefill kernel needs AVX512-BF16")
def test_prefill_attention_refuses_what_it_would_read_out_of_bounds(kernel):
    q, kv_cache, table, _ = prefill_case(4, 40, 4, 2, 64, 16)
    with pytest.raises(RuntimeError, match="shorter"):
        kernel.prefill_attention(q, kv_cache, table[:2], 40, 0.125)
    bad = table.clone()
    bad[1] = kv_cache.shape[1]
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.prefill_attention(q, kv_cache, bad, 40, 0.125)
    with pytest.raises(RuntimeError, match="new tokens"):
        kernel.prefill_attention(q, kv_cache, table, 3, 0.125)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel.prefill_attention(q.float(), kv_cache, table, 40, 0.125)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernel.prefill_attention(q[..., :48], kv_cache[..., :48].contiguous(), table, 40,
                                 0.125)
    with pytest.raises(RuntimeError, match="heads"):
        kernel.prefill_attention(q[:, :3], kv_cache, table, 40, 0.125)


def test_prefill_chunks_short_and_long_run_our_kernel_in_bfloat16():
    # On AVX512-BF16, with or without AMX (whose tiles then run the kernel's products): a
    # prompt's tail over its cached prefix and a long prompt alike; float32 runs SDPA.
    from workers.models import attention

    meta = attention.AttentionMetadata(
        block_size=16, slot_mapping=torch.arange(300), num_decodes=0,
        decode_block_tables=None, decode_context_lens=None,
        prefills=[attention.PrefillSeq(start=0, num_new=16, context_len=100,
                                       block_table=torch.arange(8)),
                  attention.PrefillSeq(start=16, num_new=284, context_len=284,
                                       block_table=torch.arange(8, 26))])
    config = type("C", (), dict(num_heads=4, num_kv_heads=2, head_dim=64))()
    ours = kernels.cpu() if PREFILL else None
    plans = attention.PagedAttention(meta, config, torch.bfloat16).prefills
    assert [p.kernel for p in plans] == [ours, ours]
    assert attention.PagedAttention(meta, config, torch.float32).prefills[0].kernel is None
