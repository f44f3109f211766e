"""Llama-family decoder (Llama, Mistral, Qwen2) over the paged KV cache.

Numerically the model follows Hugging Face's LlamaForCausalLM (rotate_half RoPE, RMSNorm,
SwiGLU), with q/k/v fused into one projection and gate/up into another: on CPU each op costs
microseconds of overhead, and a decode step runs ~20 of them per layer.

Weights arrive by their Hugging Face names through `load_weights`; the loader translates GGUF
names and layouts before that.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from workers import kernels

from .attention import (
    AttentionMetadata,
    PagedAttention,
    TritonPagedAttention,
    make_attention,
)
from .config import ModelConfig
from .dtype import cpuinfo

log = logging.getLogger(__name__)

# Where the weights are packed for oneDNN (bfloat16 on a CPU that computes it), a projection
# of up to this many tokens runs our kernel on the plain weight instead
# (workers/kernels/small_linear.cpp), which is then kept beside the packed copy: oneDNN's
# kernels are made for many rows, and read the weights for one token at 14-18 GB/s where ours
# streams them at 26-29 on an AVX512-BF16 EPYC (bench/README.md). 0 turns it off (tests and
# benchmarks compare the two).
SMALL_BATCH_ROWS = 2

# On a CPU the residual add and the RMS norm before each block run fused in our kernel
# (workers/kernels/rms_norm.cpp) where it could be built: torch runs F.rms_norm in bfloat16
# as seven operators, ~40 µs a call for one token, 2.5 ms of a batch-1 decode step on an
# AVX512-BF16 EPYC. False selects torch (tests and benchmarks compare the two).
CPU_NORM_KERNEL = True


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual); x alone where residual is None."""
    if CPU_NORM_KERNEL and x.device.type == "cpu":
        kernel = kernels.cpu()
        if kernel is not None:
            return kernel.add_rms_norm(x, residual, weight, eps)
    total = x if residual is None else x + residual
    return F.rms_norm(total, (total.shape[-1],), weight, eps), total


# On a CPU the MLP's activation, silu(gate) * up, runs in our kernel
# (workers/kernels/silu_mul.cpp) where it could be built: one pass over the gate/up output
# read in place (a weight sliced in two hands over its slices, with no reordering copy),
# where torch runs a split and two operators. False selects torch (tests and benchmarks
# compare the two).
CPU_SILU_MUL_KERNEL = True


def mlp_activation(gate_up: Projection, h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused gate/up projection of h, [T, intermediate]."""
    if CPU_SILU_MUL_KERNEL and h.device.type == "cpu":
        kernel = kernels.cpu()
        if kernel is not None:
            return kernel.silu_mul(*gate_up.halves(h))
    gate, up = gate_up(h).chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """float32 [head_dim // 2] inverse frequencies, after RoPE scaling (as transformers does)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "freq_factors":
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"unsupported RoPE scaling {kind!r}")


def rope_tables(config: ModelConfig, dtype: torch.dtype,
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, [max_position_embeddings, head_dim] each.

    HF's rotate_half(x) = cat(-x2, x1) equals roll(x, d/2) * cat(-1, 1): folding the sign into
    the sin table makes RoPE roll + mul + addcmul, with no slicing or cat per layer.
    """
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(positions, rope_inv_freq(config))
    cos, sin = freqs.cos(), freqs.sin()
    cos = torch.cat([cos, cos], dim=-1)
    signed_sin = torch.cat([-sin, sin], dim=-1)
    return cos.to(dtype=dtype, device=device), signed_sin.to(dtype=dtype, device=device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]; cos, signed_sin [T, 1, d]."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), signed_sin)


# On a CPU, RoPE and the write of the step's keys and values into the cache run in one pass
# of our kernel (workers/kernels/rope_cache.cpp) where it could be built: torch runs a
# multiply, a roll, an addcmul and two index copies per layer. False selects torch (tests and
# benchmarks compare the two).
CPU_ROPE_KERNEL = True


class StepRope:
    """RoPE at one step's positions, shared by its layers. Where the CPU kernel runs it, it
    also writes the step's keys and values into the layer's cache (``writes_cache``), and
    attention is told so."""

    def __init__(self, config: ModelConfig, cos: torch.Tensor, signed_sin: torch.Tensor,
                 positions: torch.Tensor, attention: PagedAttention | TritonPagedAttention):
        """cos, signed_sin: the model's tables (rope_tables); positions [T]."""
        self.config = config
        self.kernel = (kernels.cpu() if CPU_ROPE_KERNEL and positions.device.type == "cpu"
                       and isinstance(attention, PagedAttention) else None)
        self.writes_cache = self.kernel is not None
        if self.kernel is not None:
            self.tables, self.positions = (cos, signed_sin), positions
            self.slots = attention.meta.slot_mapping
        else:
            self.cos = cos.index_select(0, positions).unsqueeze(1)
            self.signed_sin = signed_sin.index_select(0, positions).unsqueeze(1)

    def __call__(self, qkv: torch.Tensor, kv_cache: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection's output [T, q + 2 kv] -> q [T, H, d], k and v [T, kvh, d],
        q and k rotated (in place in qkv where the kernel runs, and k and v then cached)."""
        c, t = self.config, qkv.shape[0]
        qk = qkv[:, : c.q_size + c.kv_size].view(t, c.num_heads + c.num_kv_heads, c.head_dim)
        if self.kernel is not None:
            self.kernel.rope_write_kv(qkv, *self.tables, self.positions, kv_cache, self.slots,
                                      c.num_heads, c.num_kv_heads)
        else:
            qk = apply_rope(qk, self.cos, self.signed_sin)
        v = qkv[:, c.q_size + c.kv_size:].view(t, c.num_kv_heads, c.head_dim)
        return qk[:, : c.num_heads], qk[:, c.num_heads:], v


def _param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def cpu_weight_layout(dtype: torch.dtype, device: torch.device | str) -> str:
    """How a Projection holds its weight on this device: "pairs" (our bfloat16 kernel's
    layout), "panels" (our float32 kernel's), "packed" (oneDNN's), "sliced" (column slices,
    one per thread, for batched GEMMs) or "plain" (F.linear).

    bfloat16 runs our pairs kernel on a CPU with AVX512-BF16 (``kernels.pairs``), on AMX's
    tiles where the CPU has them: SmolLM2's projections took 0.49x oneDNN's time for one
    token, 0.74x for 16, 0.98x for 1,024 and 1.02x for 2,048 on an AMD EPYC Zen 4, and on an
    Intel Xeon with AMX 0.75x for one token, 0.73x for 16, 0.93x for 256 and 1.14x for 1,024
    (bench/README.md); its one copy replaces oneDNN's packed copy, the plain weight kept for
    small steps and oneDNN's per-shape primitive cache. Elsewhere bfloat16 packs wherever
    oneDNN computes it: a packed copy measured 2x F.linear for one token. float32 stays plain
    on Intel CPUs, where F.linear is MKL's fast GEMV; elsewhere MKL runs a GEMV on one thread
    in its slow orientation and small GEMMs far under the CPU's peak, and our panels kernel
    serves every step where the kernels are built (column slices for batched GEMMs where
    they are not; ``bench/cpu_paths.py --parts layout projections``, docs/engine.md)."""
    if torch.device(device).type != "cpu":
        return "plain"
    if dtype == torch.bfloat16:
        if kernels.pairs() is not None:
            return "pairs"
        packs = torch.backends.mkldnn.is_available() and \
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return "packed" if packs else "plain"
    if dtype == torch.float32 and cpuinfo("vendor_id") != "GenuineIntel":
        return "panels" if kernels.cpu() is not None else "sliced"
    return "plain"


class Projection(nn.Module):
    """A bias-optional linear layer whose weight can be laid out for the CPU's fastest GEMM.

    - ``pair``: a bfloat16 copy in pairs of inputs, ``[out / 32, in / 2, 32 columns, 2]``,
      for our kernel on AVX512-BF16's ``vdpbf16ps`` (workers/kernels/pairs_linear.cpp).
    - ``panel``: a float32 copy in panels of output columns, ``[out / P, in, P columns]``
      (P = 16 on AVX2, 32 on AVX-512), for our kernel's fused multiply-adds
      (workers/kernels/panels_linear.cpp).
    - ``pack``: a copy prepacked in oneDNN's layout (what torch.compile's CPU freezing does).
      In bf16, F.linear hands oneDNN a plain weight to reorder on every call; the packed copy
      measured 2x faster for one token, and 2-4x for the lm_head at batch 16.
    - ``slice``: the weight cut by output columns into one slice per thread, each stored
      transposed ([slices, in, out / slices]), run as one batched matmul: every thread
      streams its own slice. In float32 on an AMD EPYC, one token through SmolLM2's
      projections read the weights at 20.5 GB/s this way, against 16.1 packed and 13.3 with
      F.linear (whose MKL GEMV runs on one thread there).

    The snapshot is taken once (load_weights, per ``cpu_weight_layout``), and the plain
    weight's memory then goes back: a model holds one copy of each weight, except an lm_head
    tied to the embedding, which the embedding lookup still reads plain, and packed weights,
    which keep the plain one for steps of up to ``SMALL_BATCH_ROWS`` tokens on our kernel
    (``small``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.out_features = out_features
        self.weight = _param(out_features, in_features, dtype=dtype, device=device)
        self.register_parameter("bias", _param(out_features, dtype=dtype, device=device)
                                if bias else None)
        self.packed: torch.Tensor | None = None
        self.slices: torch.Tensor | None = None  # [slices, in, out / slices]
        self.sliced_bias: torch.Tensor | None = None  # [slices, 1, out / slices]
        # The CPU kernels' module where steps run on our kernels: every step on the pairs
        # layout (pairs_linear), or those of up to SMALL_BATCH_ROWS tokens on the plain
        # weight kept beside a packed copy (small_linear).
        self.small: ModuleType | None = None
        self.pairs: torch.Tensor | None = None  # [ceil(out / 32), in / 2, 64]
        self.panels: torch.Tensor | None = None  # [ceil(out / P), in, P]

    def pair(self, module: ModuleType, keep_plain: bool = False) -> None:
        """Runs on a copy in pairs of inputs (our kernel, ``module.pairs_linear``) from now
        on: bfloat16 with an even number of inputs."""
        self.pairs = module.pairs_pack(self._plain())
        self.small = module
        self._let_go(keep_plain)

    def panel(self, module: ModuleType, keep_plain: bool = False) -> None:
        """Runs on a copy in panels of output columns (our kernel, ``module.panels_linear``)
        from now on: float32."""
        self.panels = module.panels_pack(self._plain())
        self.small = module
        self._let_go(keep_plain)

    def pack(self, keep_plain: bool = False) -> None:
        """Runs on oneDNN's packed copy from now on."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self._plain(), 1)
        self._let_go(keep_plain)

    def slice(self, parts: int, keep_plain: bool = False) -> None:
        """Runs on ``parts`` column slices from now on (fewer where the output does not split
        evenly: the largest count up to ``parts`` that divides it)."""
        weight = self._plain()
        n = next(k for k in range(max(1, parts), 0, -1) if weight.shape[0] % k == 0)
        self.slices = torch.stack([c.t() for c in weight.chunk(n)]).contiguous()
        if self.bias is not None:
            self.sliced_bias = self.bias.detach().view(n, 1, -1)
        self._let_go(keep_plain)

    def _plain(self) -> torch.Tensor:
        if self.weight.numel() == 0:
            raise RuntimeError("this projection already let its plain weight go")
        return self.weight.detach()

    def _let_go(self, keep_plain: bool) -> None:
        """The plain weight's memory goes back (it becomes empty) unless ``keep_plain``."""
        if not keep_plain:
            self.weight.data = self.weight.data.new_empty((0, self.weight.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out]."""
        if self.small is not None:
            if self.pairs is not None:
                return self.small.pairs_linear(x, self.pairs, self.out_features, self.bias)
            if self.panels is not None:
                return self.small.panels_linear(x, self.panels, self.out_features, self.bias)
            if x.shape[0] <= SMALL_BATCH_ROWS and self.weight.numel():
                return self.small.small_linear(x, self.weight, self.bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.slices is not None:
            return self._sliced(x)
        return F.linear(x, self.weight, self.bias)

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output's first and second halves of columns, [T, out / 2] each, as views where
        they can be: a weight sliced in two gives its two slices with no reordering copy."""
        if self.slices is not None and self.slices.shape[0] == 2:
            y = self._sliced_raw(x)
            return y[0], y[1]
        y = self(x)
        half = y.shape[-1] // 2
        return y[:, :half], y[:, half:]

    def _sliced_raw(self, x: torch.Tensor) -> torch.Tensor:
        """[slices, T, out / slices]."""
        n, t = self.slices.shape[0], x.shape[0]
        rows = x.expand(n, t, x.shape[1])
        return (torch.bmm(rows, self.slices) if self.sliced_bias is None
                else torch.baddbmm(self.sliced_bias, rows, self.slices))

    def _sliced(self, x: torch.Tensor) -> torch.Tensor:
        y, t = self._sliced_raw(x), x.shape[0]
        # [n, T, out / n]: for one token already the output's order, else one copy. (Writing
        # each slice's columns in place through a strided ``out=`` measured slower in the
        # engine: 0.84x decode tokens/s at batch 64 against the copy's 1.08x of packed.)
        return y.view(t, -1) if t == 1 else y.transpose(0, 1).reshape(t, -1)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        h, q, kv = config.hidden_size, config.q_size, config.kv_size
        p = dict(dtype=dtype, device=device)
        self.config = config
        self.eps = config.rms_norm_eps
        self.input_norm = _param(h, **p)
        self.qkv_proj = Projection(h, q + 2 * kv, config.attention_bias, **p)  # rows: q, k, v
        self.o_proj = Projection(q, h, config.attention_out_bias, **p)
        self.post_attention_norm = _param(h, **p)
        # rows: gate, then up
        self.gate_up_proj = Projection(h, 2 * config.intermediate_size, False, **p)
        self.down_proj = Projection(config.intermediate_size, h, False, **p)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: StepRope,
                attention: PagedAttention | TritonPagedAttention,
                kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it): the caller adds them,
        so each residual add happens where the next norm needs it."""
        h, residual = add_rms_norm(x, residual, self.input_norm, self.eps)
        q, k, v = rope(self.qkv_proj(h), kv_cache)
        x = self.o_proj(attention(q, k, v, kv_cache, written=rope.writes_cache))

        h, residual = add_rms_norm(x, residual, self.post_attention_norm, self.eps)
        return self.down_proj(mlp_activation(self.gate_up_proj, h)), residual


# HF checkpoint name -> (our parameter name, row offset into a fused parameter as a function
# of the config, or None when the parameter is not fused).
_LAYER_WEIGHTS = {
    "input_layernorm.weight": ("input_norm", None),
    "self_attn.q_proj.weight": ("qkv_proj.weight", lambda c: 0),
    "self_attn.k_proj.weight": ("qkv_proj.weight", lambda c: c.q_size),
    "self_attn.v_proj.weight": ("qkv_proj.weight", lambda c: c.q_size + c.kv_size),
    "self_attn.q_proj.bias": ("qkv_proj.bias", lambda c: 0),
    "self_attn.k_proj.bias": ("qkv_proj.bias", lambda c: c.q_size),
    "self_attn.v_proj.bias": ("qkv_proj.bias", lambda c: c.q_size + c.kv_size),
    "self_attn.o_proj.weight": ("o_proj.weight", None),
    "self_attn.o_proj.bias": ("o_proj.bias", None),
    "post_attention_layernorm.weight": ("post_attention_norm", None),
    "mlp.gate_proj.weight": ("gate_up_proj.weight", lambda c: 0),
    "mlp.up_proj.weight": ("gate_up_proj.weight", lambda c: c.intermediate_size),
    "mlp.down_proj.weight": ("down_proj.weight", None),
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        p = dict(dtype=dtype, device=device)
        self.config = config
        self.dtype = dtype
        self.embed_tokens = _param(config.vocab_size, config.hidden_size, **p)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype, device)
                                    for _ in range(config.num_layers))
        self.norm = _param(config.hidden_size, **p)
        self.lm_head = Projection(config.hidden_size, config.vocab_size, False, **p)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens
        self.weight_layout = cpu_weight_layout(dtype, device)
        cos, signed_sin = rope_tables(config, dtype, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_signed_sin", signed_sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final-norm hidden states [T, hidden]."""
        attention = make_attention(meta, self.config, self.dtype)
        rope = StepRope(self.config, self.rope_cos, self.rope_signed_sin, positions, attention)
        x = F.embedding(input_ids, self.embed_tokens)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rope, attention, kv_cache)
        return add_rms_norm(x, residual, self.norm, self.config.rms_norm_eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] (only the rows to sample) -> float32 logits [S, vocab]."""
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies HF-named tensors in (converting dtype); every parameter must be covered.
        The weights are read-only afterwards (packed copies are taken here)."""
        params = dict(self.named_parameters())  # a tied lm_head appears once, as embed_tokens
        missing = {name: p.numel() for name, p in params.items()}
        for hf_name, tensor in weights:
            located = self._locate(hf_name)
            if located is None:
                continue
            name, offset = located
            if name not in params:
                raise ValueError(f"weight {hf_name!r} present but the config has no such bias")
            param = params[name]
            target = param if offset is None else param.narrow(0, offset, tensor.shape[0])
            if target.shape != tensor.shape:
                raise ValueError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(target.shape)}")
            target.copy_(tensor)
            missing[name] -= tensor.numel()
        incomplete = sorted(n for n, left in missing.items() if left)
        if incomplete:
            raise ValueError(f"checkpoint does not cover {len(incomplete)} parameters "
                             f"(e.g. {incomplete[:3]})")
        self.lay_out_weights(self.weight_layout)

    def lay_out_weights(self, layout: str, keep_plain: bool = False) -> None:
        """Every projection to ``layout`` ("pairs", "panels" or "packed", where
        ``kernels.pairs``, ``kernels.cpu`` and oneDNN's bfloat16 serve; "sliced" over this
        process's torch threads; or "plain": as loaded). Under "pairs", a projection the
        kernel cannot take (not bfloat16, or an odd number of inputs) is packed; under
        "panels", one not in float32 is sliced."""
        if layout == "plain":
            return
        if layout not in ("pairs", "panels", "packed", "sliced"):
            raise ValueError(f"unknown weight layout {layout!r}")
        # Our kernels' module: the pairs' and panels' every step, and a packed copy's small
        # steps on the plain weight kept beside it, where the kernels are built.
        small = kernels.cpu() if layout in ("pairs", "panels", "packed") else None
        pairs = kernels.pairs() if layout == "pairs" else None
        if layout == "pairs" and pairs is None:
            raise ValueError("the pairs layout needs the CPU kernels on AVX512-BF16")
        if layout == "panels" and small is None:
            raise ValueError("the panels layout needs the CPU kernels")
        kept = {"plain": 0}
        for module in self.modules():
            if isinstance(module, Projection):
                keep = keep_plain or module.weight is self.embed_tokens
                if (pairs is not None and module.weight.dtype == torch.bfloat16
                        and module.weight.shape[1] % 2 == 0):
                    module.pair(pairs, keep_plain=keep)
                elif layout == "panels" and module.weight.dtype == torch.float32:
                    module.panel(small, keep_plain=keep)
                elif layout in ("sliced", "panels"):
                    module.slice(torch.get_num_threads(), keep_plain=keep)
                else:
                    module.pack(keep_plain=True)
                    if small is not None and SMALL_BATCH_ROWS > 0:
                        module.small = small
                        if not keep:
                            keep = True
                            kept["plain"] += module.weight.numel() * module.weight.element_size()
                    module._let_go(keep)
        if kept["plain"]:
            log.info("projections of up to %d tokens run on the plain weights, kept beside "
                     "the packed copies: %.0f MiB more", SMALL_BATCH_ROWS, kept["plain"] / 2**20)

    def _locate(self, hf_name: str) -> tuple[str, int | None] | None:
        """Our parameter name and row offset for an HF name; None for tensors we skip."""
        if hf_name == "model.embed_tokens.weight":
            return "embed_tokens", None
        if hf_name == "model.norm.weight":
            return "norm", None
        if hf_name == "lm_head.weight":
            # Tied models read the embedding; a copy of it in the file adds nothing.
            return None if self.config.tie_word_embeddings else ("lm_head.weight", None)
        match = _LAYER_NAME.fullmatch(hf_name)
        if match is None:
            raise ValueError(f"unexpected weight {hf_name!r}")
        index, rest = int(match.group(1)), match.group(2)
        if rest == "self_attn.rotary_emb.inv_freq":
            return None  # old checkpoints store RoPE frequencies: we compute our own
        if rest not in _LAYER_WEIGHTS or index >= len(self.layers):
            raise ValueError(f"unexpected weight {hf_name!r}")
        attr, offset = _LAYER_WEIGHTS[rest]
        return f"layers.{index}.{attr}", None if offset is None else offset(self.config)
