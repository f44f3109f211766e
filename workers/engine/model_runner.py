"""Runs one forward pass over a scheduled batch with the paged KV cache.

The model runner owns the model, its KV cache tensors and the device. It turns a list of
(request, number of new tokens) into flat input tensors and attention metadata, runs the
model, and returns the logits of the requests that caught up with their tokens (one row
each: the next token of each is sampled from it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from core.config import EngineConfig
from core.model_files import resolve_model_path
from workers.models.attention import (
    AttentionMetadata,
    PrefillSeq,
    allocate_kv_cache,
    kv_cache_bytes_per_block,
)
from workers.models.config import ModelConfig
from workers.models.dtype import pick_dtype
from workers.models.loader import load_model

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
        self.kv_caches = allocate_kv_cache(mc, self.num_blocks, self.block_size, self.dtype,
                                           self.device)
        log.info("model %s on %s in %s: %d KV blocks of %d tokens (%.0f MiB)", self.model_path.name,
                 self.device, self.dtype, self.num_blocks, self.block_size,
                 self.num_blocks * bytes_per_block / 2**20)

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
        hidden = self.model(torch.tensor(input_ids, dtype=torch.long, device=dev),
                            torch.tensor(positions, dtype=torch.long, device=dev),
                            self.kv_caches, meta)
        if not sample_rows:
            return None
        rows = torch.tensor(sample_rows, dtype=torch.long, device=dev)
        return self.model.compute_logits(hidden.index_select(0, rows)).float()
