"""ModelConfig: the shape of a Llama-family model, read from GGUF metadata or an HF config.json.

One frozen object describes every architecture we serve (llama, mistral, qwen2): they differ
only in attention biases, RoPE scaling and tied embeddings, which are fields here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

# HF architecture name -> (qkv projections carry a bias, o_proj carries a bias) when the
# config does not say. Qwen2 always has q/k/v biases and never an o_proj bias; Llama's
# `attention_bias` switches all four projections.
_HF_ARCHITECTURES = {"llama": (False, False), "mistral": (False, False), "qwen2": (True, False)}

# RoPE scaling types the model implements (see workers/models/llama.py `rope_inv_freq`).
# "freq_factors" is how llama.cpp stores Llama 3 scaling: a `rope_freqs` tensor of per-frequency
# divisors instead of the parameters that produced it.
ROPE_SCALING_TYPES = ("linear", "llama3", "freq_factors")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None, or {"rope_type": one of ROPE_SCALING_TYPES, ...that type's parameters}.
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    # q/k/v projections carry a bias (Qwen2; Llama with attention_bias).
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # o_proj carries a bias (only Llama with attention_bias=True).
    attention_out_bias: bool = False
    architecture: str = "llama"

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"model config: {name} must be positive, got {value}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model config: {self.num_heads} attention heads are not a multiple "
                             f"of {self.num_kv_heads} KV heads")
        if self.head_dim % 2:
            raise ValueError(f"model config: RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            if kind not in ROPE_SCALING_TYPES:
                raise ValueError(f"model config: unsupported RoPE scaling {kind!r} "
                                 f"(supported: {', '.join(ROPE_SCALING_TYPES)})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf_dir(cls, directory: Path) -> ModelConfig:
        config = json.loads((directory / "config.json").read_text())
        generation = directory / "generation_config.json"
        extra_eos: Any = None
        if generation.is_file():
            # generation_config.json often lists more stop ids (e.g. <|eot_id|>) than config.json.
            extra_eos = json.loads(generation.read_text()).get("eos_token_id")
        return cls.from_hf_config(config, extra_eos_token_ids=extra_eos)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], *,
                       extra_eos_token_ids: Any = None) -> ModelConfig:
        arch = config.get("model_type", "llama")
        if arch not in _HF_ARCHITECTURES:
            raise ValueError(f"unsupported model_type {arch!r} (supported: "
                             f"{', '.join(_HF_ARCHITECTURES)})")
        qkv_bias, out_bias = _HF_ARCHITECTURES[arch]
        if arch == "llama" and config.get("attention_bias", False):
            qkv_bias = out_bias = True
        if config.get("mlp_bias", False):
            raise ValueError("MLP biases are not supported")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {config['hidden_act']!r}")

        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        max_pos = config.get("max_position_embeddings", 2048)
        window = config.get("sliding_window")
        use_window = config.get("use_sliding_window", arch == "mistral")
        if use_window and window is not None and window < max_pos:
            # Sliding-window attention is not implemented; within the window it equals full
            # attention, so serving at most `window` positions keeps outputs exact.
            max_pos = window
        # transformers >= 5 writes `rope_parameters` (with rope_theta inside); hub files written
        # earlier have `rope_theta` and `rope_scaling` at the top level.
        rope_params = config.get("rope_parameters") or {}
        rope_theta = config.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = config.get("rope_scaling") or rope_params
        eos = _as_ids(config.get("eos_token_id")) + _as_ids(extra_eos_token_ids)
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=_normalize_rope_scaling(scaling),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            architecture=arch,
        )

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> ModelConfig:
        arch = _field(reader, "general.architecture")
        # Mistral models convert to the "llama" GGUF architecture.
        if arch not in ("llama", "qwen2"):
            raise ValueError(f"unsupported GGUF architecture {arch!r}")

        def key(name: str, default: Any = _REQUIRED) -> Any:
            return _field(reader, f"{arch}.{name}", default)

        tensor_names = {t.name for t in reader.tensors}
        hidden = int(key("embedding_length"))
        heads = int(key("attention.head_count"))
        head_dim = int(key("attention.key_length", hidden // heads))
        rot_dims = key("rope.dimension_count", None)
        if rot_dims is not None and int(rot_dims) != head_dim:
            raise ValueError(f"partial rotary embeddings ({rot_dims} of {head_dim} dims) "
                             "are not supported")
        vocab = key("vocab_size", None)
        if vocab is None:
            vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
        eos = _as_ids(_field(reader, "tokenizer.ggml.eos_token_id", None))
        eos += _as_ids(_field(reader, "tokenizer.ggml.eot_token_id", None))
        qkv_bias = "blk.0.attn_q.bias" in tensor_names
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=_gguf_rope_scaling(reader, arch),
            max_position_embeddings=int(key("context_length")),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias=qkv_bias,
            attention_out_bias="blk.0.attn_output.bias" in tensor_names,
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            architecture=arch,
        )


_REQUIRED = object()


def _field(reader: gguf.GGUFReader, name: str, default: Any = _REQUIRED) -> Any:
    field = reader.fields.get(name)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"GGUF file lacks the metadata key {name!r}")
        return default
    value = field.contents()
    return value.item() if isinstance(value, np.generic) else value


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _normalize_rope_scaling(scaling: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """HF rope_scaling / rope_parameters -> None or {"rope_type": ..., parameters}."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        return {
            "rope_type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
        }
    raise ValueError(f"unsupported RoPE scaling type {kind!r} "
                     f"(supported: {', '.join(ROPE_SCALING_TYPES)})")


def _gguf_rope_scaling(reader: gguf.GGUFReader, arch: str) -> dict[str, Any] | None:
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        # llama.cpp bakes Llama 3 scaling into per-frequency divisors of the inverse frequencies.
        factors = np.asarray(gguf.quants.dequantize(freqs.data, freqs.tensor_type), np.float64)
        return {"rope_type": "freq_factors", "factors": tuple(float(f) for f in factors.ravel())}
    kind = _field(reader, f"{arch}.rope.scaling.type", None)
    factor = _field(reader, f"{arch}.rope.scaling.factor", None)
    legacy_linear = _field(reader, f"{arch}.rope.scale_linear", None)  # older GGUF files
    if kind is None and legacy_linear is not None:
        kind, factor = "linear", legacy_linear
    if kind in (None, "none") or (kind == "linear" and factor in (None, 0.0, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise ValueError(f"unsupported GGUF RoPE scaling type {kind!r} "
                     f"(supported: {', '.join(ROPE_SCALING_TYPES)})")
