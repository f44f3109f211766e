"""Hugging Face's side of the engine benchmark: transformers' LlamaForCausalLM, our weights.

It is built from the same Hugging Face-named tensors our loader feeds our model (the GGUF
dequantized by ``workers.models.loader``, or the benchmark's seeded random weights), cast to
the same dtype, as tests/unit/test_model_parity.py does.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
import transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from workers.models.config import ModelConfig


def hf_config(mc: ModelConfig, dtype: torch.dtype) -> LlamaConfig:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": mc.rope_theta}
    if mc.rope_scaling is not None:
        if mc.rope_scaling["rope_type"] == "freq_factors":
            raise ValueError("transformers cannot express llama.cpp's RoPE frequency factors")
        rope = {**mc.rope_scaling, "rope_theta": mc.rope_theta}
    return LlamaConfig(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size,
        intermediate_size=mc.intermediate_size, num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_kv_heads,
        head_dim=mc.head_dim, rms_norm_eps=mc.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=mc.max_position_embeddings,
        tie_word_embeddings=mc.tie_word_embeddings, attention_bias=mc.attention_bias,
        bos_token_id=mc.bos_token_id, eos_token_id=list(mc.eos_token_ids), dtype=dtype)


class HFGenerate:
    """Static-batch greedy ``generate`` timings, on the same prompts our engine gets."""

    version = transformers.__version__

    def __init__(self, model: LlamaForCausalLM, device: torch.device, mc: ModelConfig):
        self.model = model
        self.device = device
        self.eos_token_ids = list(mc.eos_token_ids) or None
        self.pad_token_id = mc.eos_token_ids[0] if mc.eos_token_ids else 0

    @classmethod
    def from_weights(cls, weights: Iterable[tuple[str, torch.Tensor]], mc: ModelConfig,
                     dtype: torch.dtype, device: torch.device) -> HFGenerate:
        """``weights``: (Hugging Face name, tensor), as ``LlamaForCausalLM.load_weights`` takes."""
        config = hf_config(mc, dtype)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        state = {name: t.to(device=device, dtype=dtype) for name, t in weights
                 if not name.endswith("rotary_emb.inv_freq")}
        if mc.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, assign=True, strict=True)
        if mc.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        # RoPE frequencies are buffers computed at construction, not weights: build them for real.
        model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                    if t.device.type == "meta"]
        if leftover:
            raise RuntimeError(f"transformers model still has meta tensors: {leftover[:3]}")
        return cls(model.eval(), device, mc)

    def _generation_config(self, new_tokens: int, exact: bool) -> GenerationConfig:
        # exact: min_new_tokens == max_new_tokens masks EOS, so every row generates them all
        # (our side: ignore_eos, which lets EOS through without stopping: same cost).
        return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens if exact
                                else 0, do_sample=False, num_beams=1,
                                eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id,
                                use_cache=True)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int,
                 exact: bool = True) -> torch.Tensor:
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("a static batch needs prompts of one length (no padding)")
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  generation_config=self._generation_config(new_tokens, exact))
        if exact and out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, "
                               f"expected {new_tokens}")
        return out[:, ids.shape[1]:]

    def run(self, prompts: list[list[int]], new_tokens: int) -> float:
        """Seconds for one static batch to generate new_tokens tokens per prompt."""
        start = time.perf_counter()
        self.generate(prompts, new_tokens).cpu()  # the copy waits for the device
        return time.perf_counter() - start

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Up to new_tokens tokens, stopping after EOS."""
        return self.generate([prompt], new_tokens, exact=False)[0].tolist()
