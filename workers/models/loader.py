"""Loads a Llama-family model from a GGUF file or a Hugging Face safetensors directory.

Both paths produce (Hugging Face name, tensor) pairs for `LlamaForCausalLM.load_weights`:
GGUF tensors are dequantized to float32, renamed, and their q/k rows put back in HF order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from .config import ModelConfig
from .llama import LlamaForCausalLM

_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Not weights: RoPE frequency factors (already in ModelConfig.rope_scaling).
_GGUF_SKIPPED = {"rope_freqs.weight"}


def load_model(path: Path, dtype: torch.dtype,
               device: torch.device | str) -> tuple[LlamaForCausalLM, ModelConfig]:
    """A GGUF file or an HF directory (config.json + safetensors) -> (model, its config)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        reader = gguf.GGUFReader(path)
        config = ModelConfig.from_gguf(reader)
        weights = iter_gguf_weights(reader, config)
    elif path.is_dir() and (path / "config.json").is_file():
        files = safetensors_files(path)
        config = ModelConfig.from_hf_dir(path)
        if not config.tie_word_embeddings and not _has_tensor(files, "lm_head.weight"):
            config = replace(config, tie_word_embeddings=True)
        weights = iter_safetensors_weights(files)
    else:
        raise FileNotFoundError(f"no GGUF file or Hugging Face directory at {path}")
    model = LlamaForCausalLM(config, dtype, device)
    model.load_weights(weights)
    return model.eval(), config


# ---------------------------------------------------------------------------------- GGUF
def iter_gguf_weights(reader: gguf.GGUFReader,
                      config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor in HF layout) for every weight of a GGUF file."""
    # llama.cpp's converter permutes the rows of q and k (weights and biases) of "llama"
    # models for its interleaved RoPE; our rotate_half RoPE needs HF's order back.
    unpermute = config.architecture == "llama"
    for tensor in reader.tensors:
        if tensor.name in _GGUF_SKIPPED:
            continue
        name = hf_name(tensor.name)
        # GGUF lists dims fastest-first; numpy (and torch) order is the reverse.
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        # asarray: numpy memmap views cost microseconds each, and dequantize makes thousands.
        array = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(shape)
        if unpermute and ".q_proj." in name:
            array = reverse_permute(array, config.num_heads)
        elif unpermute and ".k_proj." in name:
            array = reverse_permute(array, config.num_kv_heads)
        if not array.flags.writeable:  # F32 tensors are read-only views of the memory map
            array = array.copy()
        yield name, torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    match = _GGUF_LAYER.fullmatch(gguf_name)
    if match is None or match.group(2) not in _GGUF_LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"


def reverse_permute(array: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's `permute`: within each head, rows (pairs interleaved) -> (halves)."""
    rows = array.shape[0]
    half = rows // num_heads // 2
    grouped = array.reshape(num_heads, half, 2, *array.shape[1:])
    return grouped.swapaxes(1, 2).reshape(array.shape)


# ---------------------------------------------------------------------------------- safetensors
def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's files: the shards named by the index, else model.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / shard for shard in shards]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{directory} has neither model.safetensors nor "
                            "model.safetensors.index.json")


def iter_safetensors_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _has_tensor(files: list[Path], name: str) -> bool:
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            if name in f.keys():
                return True
    return False
