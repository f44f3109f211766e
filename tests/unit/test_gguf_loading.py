"""GGUF files written with gguf.GGUFWriter read back through our loader: every tensor type we
claim to support, in the right shape and row order, within its quantization error.

llama.cpp stores q/k rows permuted for its RoPE; these files are written the same way (the
permutation below is llama.cpp's converter's), so the loader must undo it.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from workers.models.config import ModelConfig
from workers.models.llama import rope_inv_freq
from workers.models.loader import iter_gguf_weights, load_model

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 256, 4, 2, 256, 64  # K-quants need rows of 256
HEAD_DIM = HIDDEN // HEADS

# GGUF name -> (rows, cols) in HF layout.
MATRICES = {
    "token_embd.weight": (VOCAB, HIDDEN),
    "output.weight": (VOCAB, HIDDEN),
    "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
    "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
    "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
    "blk.0.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
    "blk.0.ffn_gate.weight": (FFN, HIDDEN),
    "blk.0.ffn_up.weight": (FFN, HIDDEN),
    "blk.0.ffn_down.weight": (HIDDEN, FFN),
}
NORMS = ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight")
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
    "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
    "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
    "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
    "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
}

# Worst-case error of each type relative to the largest magnitude in a block: half a
# quantization step (or half a unit in the last place), with a little slack. Q4_0 is coarser:
# its scale maps the signed extreme to -8, so the opposite extreme clips to 7/8 of it.
TOLERANCE = {Q.F32: 0.0, Q.F16: 6e-4, Q.BF16: 4e-3, Q.Q8_0: 5e-3, Q.Q4_0: 0.13, Q.Q4_1: 7e-2}
# gguf.quants cannot quantize K-quants: their tests write raw blocks and decode them with the
# reference below, transcribed from llama.cpp's dequantize_row_q4_K / dequantize_row_q6_K.
K_QUANTS = (Q.Q4_K, Q.Q6_K)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (HF row order -> llama.cpp's)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def permute_for(name: str, w: np.ndarray) -> np.ndarray:
    if ".attn_q." in name:
        return llama_cpp_permute(w, HEADS)
    if ".attn_k." in name:
        return llama_cpp_permute(w, KV_HEADS)
    return w


def reference_q4_k(blocks: np.ndarray) -> np.ndarray:
    """uint8 [n, 144] -> float32 [n, 256]."""
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
    scales, qs = blocks[:, 4:16].astype(np.int32), blocks[:, 16:144].astype(np.int32)

    def scale_min(j: int) -> tuple[np.ndarray, np.ndarray]:
        if j < 4:
            return scales[:, j] & 63, scales[:, j + 4] & 63
        return ((scales[:, j + 4] & 0xF) | ((scales[:, j - 4] >> 6) << 4),
                (scales[:, j + 4] >> 4) | ((scales[:, j] >> 6) << 4))

    out = np.zeros((blocks.shape[0], 256), np.float32)
    for chunk in range(4):  # 64 values per chunk: low nibbles, then high nibbles
        q = qs[:, 32 * chunk: 32 * chunk + 32]
        for half, values in enumerate((q & 0xF, q >> 4)):
            sc, m = scale_min(2 * chunk + half)
            start = 64 * chunk + 32 * half
            out[:, start:start + 32] = ((d * sc)[:, None] * values - (dmin * m)[:, None])
    return out


def reference_q6_k(blocks: np.ndarray) -> np.ndarray:
    """uint8 [n, 210] -> float32 [n, 256]."""
    ql, qh = blocks[:, 0:128].astype(np.int32), blocks[:, 128:192].astype(np.int32)
    sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)[:, 0]
    out = np.zeros((blocks.shape[0], 256), np.float32)
    for n in range(2):
        lo, hi, s = ql[:, 64 * n: 64 * n + 64], qh[:, 32 * n: 32 * n + 32], sc[:, 8 * n: 8 * n + 8]
        for j in range(32):
            i = j // 16
            quads = (((lo[:, j] & 0xF) | (((hi[:, j] >> 0) & 3) << 4)) - 32,
                     ((lo[:, j + 32] & 0xF) | (((hi[:, j] >> 2) & 3) << 4)) - 32,
                     ((lo[:, j] >> 4) | (((hi[:, j] >> 4) & 3) << 4)) - 32,
                     ((lo[:, j + 32] >> 4) | (((hi[:, j] >> 6) & 3) << 4)) - 32)
            for k, q in enumerate(quads):
                out[:, 128 * n + 32 * k + j] = d * s[:, i + 2 * k] * q
    return out


def random_k_quant(qtype: Q, rows: int, cols: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random raw blocks (with sane fp16 scales) and their values per the reference."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, block_bytes), dtype=np.uint8)
    scale = rng.uniform(0.001, 0.01, size=(blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = (scale.view(np.float16) / 2).view(np.uint8)
        values = reference_q4_k(blocks)
    else:
        blocks[:, 208:210] = scale
        values = reference_q6_k(blocks)
    return blocks.reshape(rows, -1), values.reshape(rows, cols)


def write_tiny_llama_gguf(path: Path, qtype: Q, seed: int = 0,
                          rope_freqs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Writes a one-layer llama GGUF with every matrix stored as `qtype`; returns the float
    values the file stores for each tensor (in GGUF row order: q/k permuted)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    stored: dict[str, np.ndarray] = {}
    for name, (rows, cols) in MATRICES.items():
        if qtype in K_QUANTS:
            raw, stored[name] = random_k_quant(qtype, rows, cols, rng)
            writer.add_tensor(name, raw, raw_dtype=qtype)
            continue
        stored[name] = permute_for(name, rng.standard_normal((rows, cols)).astype(np.float32))
        data = gguf.quants.quantize(stored[name], qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    for name in NORMS:
        stored[name] = rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32)
        writer.add_tensor(name, stored[name])
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K],
                         ids=lambda q: q.name)
def test_loader_reads_back_each_tensor_type_in_hf_layout(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    stored = write_tiny_llama_gguf(path, qtype)
    reader = gguf.GGUFReader(path)
    config = ModelConfig.from_gguf(reader)
    assert (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
            config.intermediate_size, config.vocab_size, config.num_layers) == (
        HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, 1)
    assert not config.tie_word_embeddings and config.eos_token_ids == (2,)

    loaded = dict(iter_gguf_weights(reader, config))
    assert set(loaded) == set(HF_NAMES.values())
    for name, expected in stored.items():
        weight = loaded[HF_NAMES[name]]
        assert weight.dtype == torch.float32 and tuple(weight.shape) == expected.shape, name
        # Back to GGUF row order with llama.cpp's own permutation: equal iff un-permuted right.
        actual = permute_for(name, weight.numpy())
        tolerance = 1e-6 if qtype in K_QUANTS or name in NORMS else TOLERANCE[qtype]
        limit = tolerance * np.abs(expected).max()
        assert np.abs(actual - expected).max() <= limit, name


def test_load_model_fuses_gguf_tensors_and_converts_dtype(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    stored = write_tiny_llama_gguf(path, Q.Q8_0)
    # Plain weights, to compare them: where oneDNN computes bfloat16, the loaded model would
    # run on packed copies and let the plain weights go (the CPU's own layout: below).
    with monkeypatch.context() as plain:
        plain.setattr("workers.models.llama.cpu_weight_layout", lambda *a: "plain")
        model, config = load_model(path, torch.bfloat16, "cpu")
    assert config.architecture == "llama" and model.dtype == torch.bfloat16
    layer = model.layers[0]
    assert layer.qkv_proj.weight.dtype == torch.bfloat16
    weights = dict(iter_gguf_weights(gguf.GGUFReader(path), config))
    qkv = torch.cat([weights[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    gate_up = torch.cat([weights[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(layer.qkv_proj.weight, qkv.to(torch.bfloat16))
    assert torch.equal(layer.gate_up_proj.weight, gate_up.to(torch.bfloat16))
    assert torch.equal(model.norm, torch.from_numpy(stored["output_norm.weight"]).bfloat16())
    assert model.lm_head.weight is not model.embed_tokens

    # In the layout this CPU serves, the fused projections compute the same.
    served, _ = load_model(path, torch.bfloat16, "cpu")
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0)).bfloat16()
    for ours, weight in ((served.layers[0].qkv_proj, qkv), (served.layers[0].gate_up_proj,
                                                            gate_up)):
        expected = torch.nn.functional.linear(x.float(), weight.bfloat16().float())
        torch.testing.assert_close(ours(x).float(), expected, rtol=2e-2, atol=2e-2)


def test_gguf_rope_freqs_tensor_reproduces_llama3_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    hf_config = transformers.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS,
                                         rope_theta=10000.0, rope_scaling=scaling)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    # What llama.cpp's converter (LlamaModel.generate_extra_tensors) stores for Llama 3.1:
    # a divisor for each inverse frequency.
    base = 1.0 / 10000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    low_wavelen, high_wavelen = 32 / 1.0, 32 / 4.0
    factors = []
    for wavelen in 2 * math.pi / base:
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(8.0)
        else:
            smooth = (32 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    path = tmp_path / "llama3.gguf"
    write_tiny_llama_gguf(path, Q.F16, rope_freqs=np.array(factors))

    config = ModelConfig.from_gguf(gguf.GGUFReader(path))
    assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == "freq_factors"
    assert torch.allclose(rope_inv_freq(config), expected, rtol=1e-6, atol=0)
    # The factors are not all 1: the file really scales RoPE.
    assert not torch.allclose(rope_inv_freq(config), torch.from_numpy(base).float())
    load_model(path, torch.float32, "cpu")  # rope_freqs is metadata, not an unknown weight
