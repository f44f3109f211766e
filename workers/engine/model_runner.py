"""Runs one forward pass over a scheduled batch with the paged KV cache.

The model runner owns the model, its KV cache tensors and the device. It turns a list of
(request, number of new tokens) into flat input tensors and attention metadata, runs the
model, and returns the logits of the requests that caught up with their tokens (one row
each: the next token of each is sampled from it).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

from core.config import EngineConfig
from core.model_files import resolve_model_path
from workers import malloc
from workers.models import triton_attention
from workers.models.attention import (
    AttentionMetadata,
    PrefillSeq,
    allocate_kv_cache,
    kv_cache_bytes_per_block,
)
from workers.models.config import ModelConfig
from workers.models.dtype import pick_dtype
from workers.models.loader import load_model

from .paged_steps import (
    DecodeGraphs,
    StepBuffers,
    StepTensors,
    decode_graph_sizes,
    layout,
    plan_step,
)
from .request import Request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchItem:
    request: Request
    num_new_tokens: int


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_attention_backend(name: str, device: torch.device) -> str:
    """"torch" or "triton" for the config's ``attention_backend`` on ``device``.

    Triton runs on CUDA; on the CPU only in Triton's interpreter (``TRITON_INTERPRET=1``,
    for tests). "auto" is "torch" for now, on every device: the Triton path has passed its
    tests in Triton's interpreter on a CPU but not yet on a CUDA device (scripts/gpu_check.sh
    runs them there; docs/engine.md, "On a GPU"), so a GPU deployment opts in with
    ``attention_backend: triton``."""
    usable = triton_attention.available() and (
        device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    if name == "triton" and not usable:
        raise ValueError("attention_backend 'triton' needs CUDA and Triton (on a CPU, "
                         "Triton's interpreter: TRITON_INTERPRET=1)")
    return "torch" if name == "auto" else name


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        self.model_path = resolve_model_path(config.model)
        self.model, self.model_config = load_model(self.model_path, self.dtype, self.device)
        self.model.eval()
        mc: ModelConfig = self.model_config
        self.block_size = config.block_size
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        bytes_per_block = kv_cache_bytes_per_block(mc, self.block_size, self.dtype)
        self.num_blocks = self._kv_budget() // bytes_per_block
        capacity = self.num_blocks * self.block_size
        if capacity < self.max_model_len:
            if config.max_model_len is not None:
                raise ValueError(
                    f"a KV cache of {self.num_blocks} blocks ({capacity} tokens) cannot hold one "
                    f"{self.max_model_len}-token sequence: raise kv_cache_bytes or lower "
                    "max_model_len")
            # Unset max_model_len: serve the longest context one sequence can have alone.
            log.warning("KV cache holds %d tokens: context window lowered from %d to %d",
                        capacity, self.max_model_len, capacity)
            self.max_model_len = capacity
        self.attention_backend = pick_attention_backend(config.attention_backend, self.device)
        triton = self.attention_backend == "triton"
        # The Triton path keeps one block more than the pool hands out: padding rows of decode
        # steps write their throwaway keys there.
        self.scratch_block = self.num_blocks
        self.kv_caches = allocate_kv_cache(mc, self.num_blocks + triton, self.block_size,
                                           self.dtype, self.device)
        log.info("model %s on %s in %s: %d KV blocks of %d tokens (%.0f MiB), %s attention",
                 self.model_path.name, self.device, self.dtype, self.num_blocks,
                 self.block_size, self.num_blocks * bytes_per_block / 2**20,
                 self.attention_backend)
        # On a CPU the forward's tensors come from the heap, each layer reusing what the last
        # one freed, not a fresh mapping each (workers/malloc.py).
        self._step_memory = (malloc.step_heap if self.device.type == "cpu"
                             else contextlib.nullcontext)
        self.graphs: DecodeGraphs | None = None
        self.graph_capture_s: float | None = None
        if triton:
            self._set_up_triton(config)

    def _set_up_triton(self, config: EngineConfig) -> None:
        mc, bs = self.model_config, self.block_size
        self.group = mc.num_heads // mc.num_kv_heads
        max_seqs = config.max_num_seqs
        max_tokens = max(config.max_num_batched_tokens, bs, max_seqs)
        # A step with fewer tiles than this per KV head splits its keys across programs: two
        # programs per streaming multiprocessor keep a GPU busy. Triton's interpreter (tests)
        # counts as a device of 4, so the engine's tests split small steps too.
        programs = 2 * (torch.cuda.get_device_properties(self.device).multi_processor_count
                        if self.device.type == "cuda" else 4)
        self.target_tiles = programs // mc.num_kv_heads
        # Decode-only steps are padded to these sizes, with graphs or without (paged_steps.py).
        self.decode_sizes = decode_graph_sizes(min(max_seqs, config.cuda_graph_max_batch))
        _, capacity = layout({"input_ids": max_tokens, "positions": max_tokens,
                              "slots": max_tokens, "query_start": max_seqs + 1,
                              "context_lens": max_seqs, "tile_seq": max_tokens + max_seqs,
                              "tile_start": max_tokens + max_seqs, "table_start": max_seqs,
                              "sample_rows": max_seqs,
                              "block_tables": max_seqs * -(-self.max_model_len // bs)})
        self.buffers = StepBuffers(capacity, self.device, bs)
        if config.cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(self.decode_sizes)
            with torch.inference_mode():
                self.graphs.capture(self._upload_padding, self._forward)
            self.graph_capture_s = self.graphs.capture_s
            log.info("captured CUDA graphs of decode steps at %d batch sizes (up to %d) in "
                     "%.2f s", len(self.decode_sizes), self.decode_sizes[-1],
                     self.graph_capture_s)

    def _upload_padding(self, size: int) -> StepTensors:
        """A decode step of ``size`` padding rows (what graphs are captured on)."""
        return self.buffers.upload(plan_step(
            [], [], self.block_size, self.group, pad_to=size, scratch_block=self.scratch_block,
            target_tiles=self.target_tiles))

    def _forward(self, step: StepTensors) -> torch.Tensor:
        return self.model(step.input_ids, step.positions, self.kv_caches, step.meta)

    def _execute_triton(self, batch: list[BatchItem], sample: list[Request]
                        ) -> torch.Tensor | None:
        sampled = {id(r) for r in sample}
        items = [(it.request.token_ids, it.request.num_computed_tokens, it.num_new_tokens,
                  it.request.block_ids) for it in batch]
        flags = [id(it.request) in sampled for it in batch]
        bucket = None
        if all(it.num_new_tokens == 1 for it in batch):
            bucket = next((s for s in self.decode_sizes if s >= len(batch)), None)
        if bucket is None:
            plan = plan_step(items, flags, self.block_size, self.group,
                             target_tiles=self.target_tiles)
        else:
            plan = plan_step(items, flags, self.block_size, self.group, pad_to=bucket,
                             scratch_block=self.scratch_block, target_tiles=self.target_tiles)
        step = self.buffers.upload(plan)
        if bucket is not None and self.graphs is not None and step.persistent:
            hidden = self.graphs.replay(bucket)
        else:
            hidden = self._forward(step)
        if not plan.sample_rows:
            return None
        return self.model.compute_logits(hidden.index_select(0, step.sample_rows)).float()

    def _kv_budget(self) -> int:
        if self.config.kv_cache_bytes is not None or self.device.type != "cuda":
            return self.config.kv_cache_bytes or 256 * 2**20
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(free * self.config.gpu_memory_fraction)

    @torch.inference_mode()
    def execute(self, batch: list[BatchItem], sample: list[Request]) -> torch.Tensor | None:
        """Computes the batch's new tokens; returns float32 logits [len(sample), vocab].

        ``batch`` lists single-token items first (the model batches them as decodes);
        ``sample`` is the subset whose last computed token is their last token, in batch order.
        """
        if self.attention_backend == "triton":
            return self._execute_triton(batch, sample)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSeq] = []
        sample_rows: list[int] = []
        sample_set = {id(r) for r in sample}
        for item in batch:
            req, n = item.request, item.num_new_tokens
            start, end = req.num_computed_tokens, req.num_computed_tokens + n
            flat_start = len(input_ids)
            input_ids.extend(req.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = req.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            num_blocks = (end + bs - 1) // bs
            if n == 1:
                if prefills:
                    raise AssertionError("single-token items must come before prefills")
                decode_tables.append(blocks[:num_blocks])
                decode_lens.append(end)
            else:
                prefills.append(PrefillSeq(
                    start=flat_start, num_new=n, context_len=end,
                    block_table=torch.tensor(blocks[:num_blocks], dtype=torch.long,
                                             device=self.device)))
            if id(req) in sample_set:
                sample_rows.append(len(input_ids) - 1)
        dev = self.device
        decode_block_tables = decode_context_lens = None
        if decode_tables:
            width = max(len(t) for t in decode_tables)
            decode_block_tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables],
                                               dtype=torch.long, device=dev)
            decode_context_lens = torch.tensor(decode_lens, dtype=torch.long, device=dev)
        meta = AttentionMetadata(
            block_size=bs,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=len(decode_tables),
            decode_block_tables=decode_block_tables,
            decode_context_lens=decode_context_lens,
            prefills=prefills,
        )
        with self._step_memory():
            hidden = self.model(torch.tensor(input_ids, dtype=torch.long, device=dev),
                                torch.tensor(positions, dtype=torch.long, device=dev),
                                self.kv_caches, meta)
        if not sample_rows:
            return None
        rows = torch.tensor(sample_rows, dtype=torch.long, device=dev)
        return self.model.compute_logits(hidden.index_select(0, rows)).float()
