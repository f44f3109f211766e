"""Our paged Llama matches transformers' LlamaForCausalLM on the same weights.

The reference is built from the very tensors our GGUF loader produces (not through
transformers' own GGUF path, which needs accelerate), so any difference is the model's: RoPE,
attention over the paged cache, GQA, fused projections.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import gguf
import pytest
import torch
import torch.nn.functional as F
import transformers

from core.model_files import resolve_model_path
from tests.support.cpu_kernels import spy_on_kernel
from tests.support.tiny_model import make_tiny_llama_dir
from workers import kernels
from workers.models.attention import (
    SDPA_MAX_DECODES,
    AttentionMetadata,
    PrefillSeq,
    allocate_kv_cache,
)
from workers.models.config import ModelConfig
from workers.models.llama import LlamaForCausalLM, Projection, cpu_weight_layout
from workers.models.loader import (
    iter_gguf_weights,
    iter_safetensors_weights,
    load_model,
    safetensors_files,
)

# "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg
# combined movable metal type, oil-based inks and a wooden screw press into a system that could
# produce books quickly and cheaply. Within fifty years, presses were running in more than two
# hundred cities across Europe, and the price of a book had fallen" in SmolLM2's vocabulary.
PROMPT = [504, 1463, 282, 260, 7510, 1757, 5634, 281, 260, 35561, 2070, 28, 645, 28322, 45382,
          5276, 39245, 4718, 1502, 28, 2664, 29, 2542, 43252, 284, 253, 10091, 21665, 1757, 618,
          253, 817, 338, 856, 2690, 2905, 3112, 284, 44838, 30, 10043, 13869, 929, 28, 32422, 592,
          4108, 281, 540, 670, 827, 3822, 4199, 1699, 1910, 28, 284, 260, 4319, 282, 253, 1863,
          761, 12551]
CAPITAL_OF_FRANCE_IS = [504, 3575, 282, 4649, 314]
PARIS = 7042  # " Paris"
BLOCK_SIZE = 16


class PagedSequences:
    """Gives test sequences cache blocks (in shuffled order, so block tables are not
    contiguous) and builds each step's metadata the way the engine's model runner does."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, num_blocks: int = 64):
        self.kv_caches = allocate_kv_cache(config, num_blocks, BLOCK_SIZE, dtype, "cpu")
        self.free = list(range(1, num_blocks))  # block 0 stays free: it pads decode tables
        random.Random(0).shuffle(self.free)
        self.tables: dict[str, list[int]] = {}

    def step(self, model: LlamaForCausalLM,
             items: list[tuple[str, list[int], int]]) -> list[torch.Tensor]:
        """items: (sequence name, new token ids, tokens already cached), single-token items
        first. Returns each item's hidden states [new tokens, hidden]."""
        ids, positions, slots, spans = [], [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        for name, new, cached in items:
            end = cached + len(new)
            table = self.tables.setdefault(name, [])
            while len(table) * BLOCK_SIZE < end:
                table.append(self.free.pop())
            spans.append((len(ids), len(new)))
            if len(new) == 1:
                assert not prefills, "single-token items come first"
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                prefills.append(PrefillSeq(start=len(ids), num_new=len(new), context_len=end,
                                           block_table=torch.tensor(table)))
            ids += new
            positions += range(cached, end)
            slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                      for p in range(cached, end)]
        width = max((len(t) for t in decode_tables), default=0)
        meta = AttentionMetadata(
            block_size=BLOCK_SIZE,
            slot_mapping=torch.tensor(slots),
            num_decodes=len(decode_tables),
            decode_block_tables=(torch.tensor([t + [0] * (width - len(t)) for t in decode_tables])
                                 if decode_tables else None),
            decode_context_lens=torch.tensor(decode_lens) if decode_tables else None,
            prefills=prefills)
        with torch.inference_mode():
            hidden = model(torch.tensor(ids), torch.tensor(positions), self.kv_caches, meta)
        return [hidden[start:start + n] for start, n in spans]


def hf_llama_config(config: ModelConfig) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=config.attention_bias,
        bos_token_id=config.bos_token_id, eos_token_id=list(config.eos_token_ids))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # These tests run ~200 small forward passes. With two OpenMP threads on a busy machine
    # (other tests, CI neighbours) each op can wait for a descheduled spinning thread, which
    # made this module 5-10x slower; one thread keeps it fast and its timing predictable.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def smollm() -> tuple[LlamaForCausalLM, transformers.LlamaForCausalLM, dict[str, torch.Tensor]]:
    reader = gguf.GGUFReader(resolve_model_path("smollm2-135m-instruct"))
    config = ModelConfig.from_gguf(reader)
    weights = dict(iter_gguf_weights(reader, config))
    ours = LlamaForCausalLM(config, torch.float32, "cpu")
    ours.load_weights(weights.items())
    hf = transformers.LlamaForCausalLM(hf_llama_config(config)).eval()
    hf.load_state_dict(weights | {"lm_head.weight": weights["model.embed_tokens.weight"]},
                       strict=True)
    return ours, hf, weights


def logits_of(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    """Logits of every position of `tokens` from one fresh prefill."""
    (hidden,) = PagedSequences(model.config, model.dtype).step(model, [("s", tokens, 0)])
    with torch.inference_mode():
        return model.compute_logits(hidden)


def test_prefill_logits_match_transformers_at_every_position(smollm):
    ours, hf, _ = smollm
    with torch.inference_mode():
        expected = hf(torch.tensor([PROMPT])).logits[0].float()
    actual = logits_of(ours, PROMPT)
    assert actual.dtype == torch.float32 and actual.shape == (64, 49152)
    assert (actual - expected).abs().max().item() < 1e-3


def test_greedy_decode_through_paged_cache_matches_transformers_generate(smollm):
    ours, hf, _ = smollm
    with torch.inference_mode():
        generated = hf.generate(torch.tensor([PROMPT]), max_new_tokens=64, do_sample=False,
                                pad_token_id=0)[0, len(PROMPT):].tolist()
    assert len(generated) == 64

    seqs = PagedSequences(ours.config, torch.float32)
    (hidden,) = seqs.step(ours, [("s", PROMPT, 0)])
    tokens = []
    for _ in range(64):
        with torch.inference_mode():
            tokens.append(int(ours.compute_logits(hidden[-1:]).argmax()))
        if len(tokens) < 64:
            (hidden,) = seqs.step(ours, [("s", tokens[-1:], len(PROMPT) + len(tokens) - 1)])
    assert tokens == generated


def test_chunked_prefill_matches_one_full_prefill(smollm):
    ours, _, _ = smollm
    expected = logits_of(ours, PROMPT)
    seqs = PagedSequences(ours.config, torch.float32)
    # A chunk boundary inside a block: the second chunk reads 40 cached tokens.
    (first,) = seqs.step(ours, [("s", PROMPT[:40], 0)])
    (second,) = seqs.step(ours, [("s", PROMPT[40:], 40)])
    with torch.inference_mode():
        actual = ours.compute_logits(torch.cat([first, second]))
    assert (actual - expected).abs().max().item() < 1e-4


def test_batch_mixing_decodes_and_prefills_matches_separate_full_prefills(smollm):
    ours, _, _ = smollm
    a, b, c, d = PROMPT[:31], PROMPT[10:30], PROMPT[5:55], PROMPT
    seqs = PagedSequences(ours.config, torch.float32)
    seqs.step(ours, [("a", a[:-1], 0), ("c", c[:-1], 0), ("d", d[:40], 0)])
    # Two decodes with different context lengths (so different table widths), a fresh
    # prefill, and the second chunk of a prefill, all in one step.
    dec_a, dec_c, pre_b, pre_d = seqs.step(ours, [
        ("a", a[-1:], len(a) - 1), ("c", c[-1:], len(c) - 1), ("b", b, 0), ("d", d[40:], 40)])
    with torch.inference_mode():
        checks = [(ours.compute_logits(dec_a), logits_of(ours, a)[-1:]),
                  (ours.compute_logits(dec_c), logits_of(ours, c)[-1:]),
                  (ours.compute_logits(pre_b), logits_of(ours, b)),
                  (ours.compute_logits(pre_d), logits_of(ours, d)[40:])]
    for actual, expected in checks:
        assert (actual - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("count", [8, SDPA_MAX_DECODES, SDPA_MAX_DECODES + 4])
def test_decode_batches_of_different_lengths_match_full_prefills(smollm, count, monkeypatch):
    # The torch paths (the CPU kernel has its own tests, test_cpu_kernels.py): up to
    # SDPA_MAX_DECODES decodes, SDPA over whole gathered blocks; more, the batched-matmul
    # path over gathered rows: block tables of different widths padded with block 0 and
    # masked by each sequence's context length either way.
    monkeypatch.setattr("workers.models.attention.CPU_DECODE_KERNEL", False)
    ours, _, _ = smollm
    lengths = [(3, 17, 16, 33, 9, 48, 2, 25)[i % 8] + i // 8 for i in range(count)]
    sequences = {f"s{i}": PROMPT[i:i + length] for i, length in enumerate(lengths)}
    seqs = PagedSequences(ours.config, torch.float32, num_blocks=128)
    # Everything but each last token; "s6" has a one-token prefix, which goes as a decode.
    seqs.step(ours, [("s6", sequences["s6"][:1], 0)] + [
        (name, tokens[:-1], 0) for name, tokens in sequences.items() if name != "s6"])
    decoded = seqs.step(ours, [(name, tokens[-1:], len(tokens) - 1)
                               for name, tokens in sequences.items()])
    with torch.inference_mode():
        for hidden, tokens in zip(decoded, sequences.values(), strict=True):
            expected = logits_of(ours, tokens)[-1:]
            # float32 rounding only: a batched GEMM of B rows and one of a whole prompt's
            # rows sum in different orders (up to 1.4e-4 on logits of ~10 after 30 layers).
            torch.testing.assert_close(ours.compute_logits(hidden), expected,
                                       rtol=2e-5, atol=1e-4)


def test_bfloat16_model_completes_a_known_fact(smollm):
    # The production dtype, end to end: bf16 weights, bf16 KV cache, packed CPU matmuls.
    ours, _, weights = smollm
    model = LlamaForCausalLM(ours.config, torch.bfloat16, "cpu")
    model.load_weights(weights.items())
    logits = logits_of(model, CAPITAL_OF_FRANCE_IS)
    assert int(logits[-1].argmax()) == PARIS


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def _assert_matches_transformers(directory: Path, hf_class: type, tokens: list[int]) -> None:
    ours, config = load_model(directory, torch.float32, "cpu")
    hf = hf_class.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = hf(torch.tensor([tokens])).logits[0].float()
    actual = logits_of(ours, tokens)
    assert expected.std().item() > 0.5  # logits vary: the comparison below means something
    assert (actual - expected).abs().max().item() < 1e-4


def test_tiny_llama_dir_with_qkv_bias_gqa_and_llama3_rope_matches_transformers(tmp_path):
    directory = make_tiny_llama_dir(tmp_path / "tiny", attention_bias=True,
                                    rope_scaling=LLAMA3_SCALING, heads=4, kv_heads=2)
    config = ModelConfig.from_hf_dir(directory)
    assert config.attention_bias and config.attention_out_bias
    assert config.rope_scaling == LLAMA3_SCALING and config.num_kv_heads < config.num_heads
    _assert_matches_transformers(directory, transformers.LlamaForCausalLM, PROMPT)

    # The scaling matters at these positions: without it the logits move far past tolerance.
    unscaled = LlamaForCausalLM(replace(config, rope_scaling=None), torch.float32, "cpu")
    unscaled.load_weights(iter_safetensors_weights(safetensors_files(directory)))
    scaled, _ = load_model(directory, torch.float32, "cpu")
    assert (logits_of(unscaled, PROMPT) - logits_of(scaled, PROMPT)).abs().max().item() > 1e-2


def test_tiny_qwen2_dir_with_linear_rope_matches_transformers(tmp_path):
    hf_config = transformers.Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(hf_config)
    with torch.no_grad():  # default init zeroes biases and sets norms to 1: randomize all
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif "embed_tokens" in name:
                param.copy_(torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
    model.save_pretrained(tmp_path / "qwen2")
    config = ModelConfig.from_hf_dir(tmp_path / "qwen2")
    assert config.architecture == "qwen2" and config.attention_bias
    assert not config.attention_out_bias and config.rope_scaling == {"rope_type": "linear",
                                                                     "factor": 2.0}
    _assert_matches_transformers(tmp_path / "qwen2", transformers.Qwen2ForCausalLM,
                                 [t % 512 for t in PROMPT])


def run_both_ways(monkeypatch, module, flag: str, model: LlamaForCausalLM,
                  steps: list[list[tuple[str, list[int], int]]]) -> dict[bool, tuple]:
    """The model through ``steps`` (fresh caches each time) with ``module.flag`` True, then
    False: {flag: (each step's hidden states, the caches)}."""
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(module, flag, on)
        seqs = PagedSequences(model.config, model.dtype)
        runs[on] = ([torch.cat(seqs.step(model, items)) for items in steps], seqs.kv_caches)
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rope_kernel_computes_what_torch_does_in_every_kind_of_step(tmp_path, monkeypatch,
                                                                        dtype):
    # Prefills, a cached prefix, a chunk, decodes beside a prefill: with the CPU kernel
    # rotating and caching (its default) and with torch's RoPE and index copies, the hidden
    # states and the caches agree (equal in bfloat16, where both round alike; an ulp in
    # float32, where the kernel's multiply-add may be fused).
    from workers.models import llama

    directory = make_tiny_llama_dir(tmp_path / "tiny", attention_bias=True, heads=4,
                                    kv_heads=2, rope_scaling=LLAMA3_SCALING)
    model, _ = load_model(directory, dtype, "cpu")
    steps = [[("a", PROMPT[:20], 0), ("b", PROMPT[3:40], 0)],
             [("a", PROMPT[20:21], 20), ("b", PROMPT[40:41], 37), ("c", PROMPT[:9], 0)],
             [("c", PROMPT[9:30], 9)]]
    calls = spy_on_kernel(monkeypatch, "rope_write_kv")
    runs = run_both_ways(monkeypatch, llama, "CPU_ROPE_KERNEL", model, steps)
    layers = model.config.num_layers
    # With the kernel on, a call per layer (the step's tokens); off, none.
    assert [shape[0] for shape in calls] == [57] * layers + [11] * layers + [21] * layers
    tol = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for kernel_out, torch_out in zip(*(runs[on][0] for on in (True, False)), strict=True):
        torch.testing.assert_close(kernel_out, torch_out, **tol)
    for kernel_cache, torch_cache in zip(runs[True][1], runs[False][1], strict=True):
        torch.testing.assert_close(kernel_cache, torch_cache, **tol)


@pytest.mark.skipif(not (kernels.cpu() is not None
                         and kernels.cpu().prefill_attention_available()),
                    reason="the prefill kernel needs AVX512-BF16")
def test_the_prefill_kernel_computes_what_sdpa_does_in_every_kind_of_step(tmp_path,
                                                                         monkeypatch):
    # Whole prompts, a chunk over a cached prefix, prefills beside decodes: with the CPU
    # kernel (bfloat16, heads of 32) and with SDPA over gathered rows, the hidden states agree
    # within bfloat16's rounding (each sums in its own order).
    from workers.models import attention

    directory = make_tiny_llama_dir(tmp_path / "tiny", hidden=128, heads=4, kv_heads=2,
                                    attention_bias=True)
    model, _ = load_model(directory, torch.bfloat16, "cpu")
    assert model.config.head_dim == 32
    steps = [[("a", PROMPT[:40], 0), ("b", PROMPT[3:20], 0)],
             [("a", PROMPT[40:41], 40), ("b", PROMPT[20:52], 17), ("c", PROMPT[:9], 0)],
             [("c", PROMPT[9:60], 9)]]
    calls = spy_on_kernel(monkeypatch, "prefill_attention")
    runs = run_both_ways(monkeypatch, attention, "CPU_PREFILL_KERNEL", model, steps)
    layers = model.config.num_layers
    assert [shape[0] for shape in calls] == [40, 17] * layers + [32, 9] * layers + [51] * layers
    for kernel_out, sdpa_out in zip(runs[True][0], runs[False][0], strict=True):
        kernel_out, sdpa_out = kernel_out.float(), sdpa_out.float()
        assert kernel_out.std() > 0.5  # the states vary: the comparison means something
        torch.testing.assert_close(kernel_out, sdpa_out, rtol=3e-2, atol=3e-2)
        assert (kernel_out - sdpa_out).abs().mean() < 5e-3


def test_a_step_gathers_keys_and_values_into_buffers_every_layer_refills(smollm, monkeypatch):
    # A new tensor per layer and gather would be a fresh mmap each time (blocks of 2 MiB and
    # more leave the heap: workers/__init__.py), page-faulted in again 2 x layers times a
    # step; this made a 64-sequence CPU decode step twice as slow (bench/README.md).
    ours, _, _ = smollm
    from workers.models import attention as attention_module

    monkeypatch.setattr(attention_module, "CPU_DECODE_KERNEL", False)  # its decode gathers
    made: list[attention_module.PagedAttention] = []
    gathered: list[int] = []
    real_make, real_select = attention_module.make_attention, torch.index_select

    def make(*args, **kwargs):
        made.append(real_make(*args, **kwargs))
        return made[-1]

    def select(source, dim, index, *, out=None):
        result = real_select(source, dim, index, out=out)
        gathered.append(result.data_ptr())
        return result

    monkeypatch.setattr("workers.models.llama.make_attention", make)
    monkeypatch.setattr(attention_module.torch, "index_select", select)
    seqs = PagedSequences(ours.config, torch.float32)
    seqs.step(ours, [("a", PROMPT[:20], 0), ("b", PROMPT[5:40], 0)])
    gathered.clear()
    seqs.step(ours, [("a", PROMPT[20:21], 20), ("b", PROMPT[40:50], 35)])  # decode + chunk
    layers = ours.config.num_layers
    assert len(gathered) == 4 * layers  # keys and values, for the decode and the chunk
    assert len(set(gathered)) == 4  # one buffer each, refilled by every layer
    assert len(made[-1]._gathered) == 4


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_weight_layout_follows_the_fastest_gemm(dtype, vendor, monkeypatch):
    # bfloat16 runs the pairs kernel on AVX512-BF16 (AMX or not) and packs elsewhere oneDNN
    # computes it; float32 stays plain on Intel, where MKL's GEMV (F.linear) is fast, and
    # runs our panels kernel elsewhere (sliced per thread where the kernels are not built).
    monkeypatch.setattr("workers.models.llama.cpuinfo",
                        lambda field: vendor if field == "vendor_id" else "")
    if dtype == torch.bfloat16 and kernels.pairs() is not None:
        expected = "pairs"
    elif dtype == torch.bfloat16:
        expected = "packed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "plain"
    else:
        expected = "plain" if vendor == "GenuineIntel" else "panels"
    assert cpu_weight_layout(dtype, "cpu") == expected
    if dtype == torch.float32 and vendor == "AuthenticAMD":
        monkeypatch.setattr("workers.models.llama.kernels.cpu", lambda: None)
        assert cpu_weight_layout(dtype, "cpu") == "sliced"
    assert cpu_weight_layout(dtype, "meta") == "plain"
    assert cpu_weight_layout(torch.float16, "cpu") == "plain"


def _projection(in_features: int, out_features: int, bias: bool,
                dtype: torch.dtype = torch.float32) -> Projection:
    projection = Projection(in_features, out_features, bias=bias, dtype=dtype, device="cpu")
    with torch.no_grad():
        projection.weight.normal_()
        if bias:
            projection.bias.normal_()
    return projection


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("out_features", "parts", "slices"),
                         [(96, 2, 2), (96, 4, 4), (100, 3, 2), (97, 4, 1), (96, 1, 1)])
def test_a_sliced_projection_computes_what_f_linear_does(out_features, parts, slices, bias):
    # One token (the output already in order) and several (the slices' outputs interleaved
    # back); an output that does not split evenly takes fewer slices.
    projection = _projection(64, out_features, bias)
    weight = projection.weight.detach().clone()
    bias_copy = None if not bias else projection.bias.detach().clone()
    projection.slice(parts)
    assert projection.slices.shape == (slices, 64, out_features // slices)
    assert projection.weight.numel() == 0  # one copy of the weight, the sliced one
    with pytest.raises(RuntimeError, match="already let its plain weight go"):
        projection.slice(parts)
    with torch.inference_mode():
        for tokens in (1, 5, 64):
            x = torch.randn(tokens, 64)
            y = projection(x)
            assert y.shape == (tokens, out_features) and y.is_contiguous()
            torch.testing.assert_close(y, F.linear(x, weight, bias_copy))


def test_a_packed_projection_computes_what_f_linear_does():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    projection = _projection(64, 96, bias=True)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        plain = projection(x)
        assert torch.equal(plain, F.linear(x, projection.weight, projection.bias))
        projection.pack()
        torch.testing.assert_close(projection(x), plain)
    assert projection.weight.numel() == 0
    with pytest.raises(RuntimeError, match="already let its plain weight go"):
        projection.pack()


@pytest.mark.parametrize("layout,small_rows", [("packed", 0), ("packed", 2), ("sliced", 2),
                                               ("panels", 2)])
@pytest.mark.parametrize("tied", [False, True])
def test_a_laid_out_model_keeps_one_copy_of_each_weight(tmp_path, monkeypatch, tied, layout,
                                                       small_rows):
    # Packing, slicing or panels let each plain projection weight go, except an lm_head tied
    # to the embedding (the lookup reads it) and packed weights whose plain copy serves steps
    # of one or two tokens (SMALL_BATCH_ROWS); the model computes what the plain one does.
    monkeypatch.setattr("workers.models.llama.SMALL_BATCH_ROWS", small_rows)
    directory = make_tiny_llama_dir(tmp_path / "tiny", tie_word_embeddings=tied)
    monkeypatch.setattr("workers.models.llama.cpu_weight_layout", lambda *a: "plain")
    plain, config = load_model(directory, torch.float32, "cpu")
    monkeypatch.setattr("workers.models.llama.cpu_weight_layout", lambda *a: layout)
    laid_out, _ = load_model(directory, torch.float32, "cpu")
    assert plain.weight_layout == "plain" and laid_out.weight_layout == layout
    projections = [m for m in laid_out.modules() if isinstance(m, Projection)]
    assert len(projections) == 4 * config.num_layers + 1
    small = layout == "packed" and small_rows > 0
    for m in projections:
        copies = {"packed": m.packed, "sliced": m.slices, "panels": m.panels}
        assert [name for name, copy in copies.items() if copy is not None] == [layout]
        kept = (m is laid_out.lm_head and tied) or small
        assert (m.weight.numel() > 0) == kept
        assert (m.small is not None) == (small or layout == "panels")
        assert m.pairs is None  # pairs: bfloat16 only
    if tied:
        assert laid_out.lm_head.weight is laid_out.embed_tokens
    # Another GEMM sums in another order: float32 logits of a few units then differ by up to
    # ~2e-5 (a mistake in the layout would be off by whole units).
    tol = dict(rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(logits_of(laid_out, PROMPT[:1]), logits_of(plain, PROMPT[:1]),
                               **tol)
    torch.testing.assert_close(logits_of(laid_out, PROMPT), logits_of(plain, PROMPT), **tol)
