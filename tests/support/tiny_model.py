"""A tiny random-weight Llama saved as a Hugging Face directory, for fast engine tests.

It uses SmolLM2's tokenizer (vocabulary, special tokens, chat template), so prompts encode as
they would for the real model; its outputs are random but deterministic for a seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from core.model_files import resolve_model_path
from core.tokenizer import Tokenizer

SMOLLM2 = "smollm2-135m-instruct"
# A Hugging Face tokenizer directory to read SmolLM2's tokenizer from instead of the embedded
# package's GGUF (a GPU machine without the package: scripts/gpu_check.sh carries it).
TOKENIZER_ENV = "ELECTRON_TEST_TOKENIZER"


def smollm2_tokenizer() -> Tokenizer:
    """SmolLM2's tokenizer: from the directory ``$ELECTRON_TEST_TOKENIZER`` names, if it is
    one, else from the embedded package."""
    override = os.environ.get(TOKENIZER_ENV)
    if override and Path(override).is_dir():
        return Tokenizer.from_model_path(Path(override))
    return Tokenizer.from_model_path(resolve_model_path(SMOLLM2))


def make_tiny_llama_dir(directory: Path, *, vocab_size: int = 49152, hidden: int = 64,
                        layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0,
                        max_position_embeddings: int = 2048, intermediate: int | None = None,
                        attention_bias: bool = False, rope_scaling: dict[str, Any] | None = None,
                        tie_word_embeddings: bool = False) -> Path:
    """Writes config.json, model.safetensors and the tokenizer files; returns ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = smollm2_tokenizer()
    tokenizer.save_hf(directory)

    intermediate = intermediate or 2 * hidden
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": rope_scaling,
        "attention_bias": attention_bias,
        "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_ids[0],
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))

    gen = torch.Generator().manual_seed(seed)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        # Scaled like a trained model (unit-variance activations), so that logits are O(1)
        # and a wrong RoPE or attention mask changes them by far more than any tolerance.
        return torch.randn(rows, cols, generator=gen) / cols ** 0.5

    def vector(n: int, mean: float, std: float) -> torch.Tensor:
        return mean + std * torch.randn(n, generator=gen)

    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    weights = {"model.embed_tokens.weight": torch.randn(vocab_size, hidden, generator=gen),
               "model.norm.weight": vector(hidden, 1.0, 0.1)}
    if not tie_word_embeddings:
        weights["lm_head.weight"] = matrix(vocab_size, hidden)
    for i in range(layers):
        prefix = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": vector(hidden, 1.0, 0.1),
            "self_attn.q_proj.weight": matrix(q_size, hidden),
            "self_attn.k_proj.weight": matrix(kv_size, hidden),
            "self_attn.v_proj.weight": matrix(kv_size, hidden),
            "self_attn.o_proj.weight": matrix(hidden, q_size),
            "post_attention_layernorm.weight": vector(hidden, 1.0, 0.1),
            "mlp.gate_proj.weight": matrix(intermediate, hidden),
            "mlp.up_proj.weight": matrix(intermediate, hidden),
            "mlp.down_proj.weight": matrix(hidden, intermediate),
        }
        if attention_bias:  # Llama's attention_bias puts a bias on all four projections
            layer |= {"self_attn.q_proj.bias": vector(q_size, 0.0, 0.1),
                      "self_attn.k_proj.bias": vector(kv_size, 0.0, 0.1),
                      "self_attn.v_proj.bias": vector(kv_size, 0.0, 0.1),
                      "self_attn.o_proj.bias": vector(hidden, 0.0, 0.1)}
        weights |= {prefix + name: tensor for name, tensor in layer.items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    return directory


def tiny_cluster_config(model_dir: Path, *, workers: int, max_model_len: int = 256,
                        **cluster: Any) -> Any:
    """A ``core.config.Config`` for Ray tests: the tiny model on CPU in float32, one
    torch thread and one CPU per worker, a Ray namespace of its own; ``cluster``: more
    ClusterConfig fields (a fleet name, faster supervision, ...)."""
    import uuid

    from core.config import (
        AuthConfig,
        ClusterConfig,
        Config,
        EngineConfig,
        TenancyConfig,
    )
    from tests.support.tenancy import local_tenancy

    return Config(
        engine=EngineConfig(model=str(model_dir), dtype="float32", device="cpu",
                            kv_cache_bytes=4 * 2**20, max_model_len=max_model_len,
                            torch_threads=1),
        cluster=ClusterConfig(namespace=f"test-{uuid.uuid4().hex[:8]}", workers=workers,
                              num_cpus_per_worker=1, token=f"test-{uuid.uuid4().hex}",
                              **cluster),
        # Tenancy has tests of its own: these send no key, and keep no files outside tmp.
        auth=AuthConfig(enabled=False), tenancy=TenancyConfig(**local_tenancy()))


def tiny_engine(model_dir: Path, *, model_id: str = "electron", **engine: Any) -> Any:
    """An AsyncEngine (worker "w0") on the tiny model: float32 on the CPU, a 4 MiB KV pool,
    a 256-token window and one torch thread, with ``engine``'s EngineConfig fields on top.
    The caller shuts it down."""
    from core.config import EngineConfig
    from workers.engine.async_engine import AsyncEngine

    settings: dict[str, Any] = {"dtype": "float32", "device": "cpu",
                                "kv_cache_bytes": 4 * 2**20, "max_model_len": 256,
                                "torch_threads": 1, **engine}
    return AsyncEngine(EngineConfig(model=str(model_dir), **settings), worker_id="w0",
                       model_id=model_id)
