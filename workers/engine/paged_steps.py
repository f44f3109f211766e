"""Step inputs for the Triton attention backend, and CUDA graphs of decode steps.

Every integer a step needs on the device (token ids, positions, cache slots, per-sequence
offsets and context lengths, the kernel's tiles, block tables, the rows to sample) is written
into ONE pinned host buffer and sent with ONE asynchronous copy into ONE device buffer that
lives as long as the runner; the step's tensors are views of it. A layout depends only on
the section sizes, so a decode step padded to a captured batch size lands at the very
addresses its CUDA graph was captured with, and replaying the graph reads the new step.

Decode-only steps (every sequence computes one token) of up to the largest captured size
are padded to the next captured size whether graphs are on or off: the matrix products then
have the same shapes either way and give the same bits, so turning graphs off changes
timings, not texts. Padding rows compute a throwaway token in a scratch block that the block
pool does not know.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from workers.models import triton_attention as ta
from workers.models.attention import AttentionMetadata

_ALIGN = 16  # elements: every section starts 128-byte aligned

# Block tables go last, one after another (``table_start`` says where each begins): only the
# blocks in use travel, and their section may grow or shrink between decode steps of one
# padded size while every section before it (all a graph reads) stays where it was captured.
SECTIONS = ("input_ids", "positions", "slots", "query_start", "context_lens", "tile_seq",
            "tile_start", "table_start", "sample_rows", "block_tables")


def decode_graph_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes captured for decode: 1, 2, 4, 8, then steps of 16 up to max_batch."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sizes + [max_batch]


@dataclass
class StepPlan:
    """One step's integers on the host, before packing."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_start: list[int]  # S + 1
    context_lens: list[int]
    tile_seq: list[int]
    tile_start: list[int]
    table_start: list[int]  # S: where each sequence's blocks begin in block_tables
    sample_rows: list[int]
    block_tables: list[int]  # every sequence's blocks, one table after another
    block_m: int
    sample_room: int = 0  # the sample_rows section's size, when more than its rows (graphs)
    num_splits: int = 1  # programs each tile's keys are split across (triton_attention.py)

    def sizes(self) -> dict[str, int]:
        sizes = {name: len(getattr(self, name)) for name in SECTIONS}
        sizes["sample_rows"] = max(sizes["sample_rows"], self.sample_room)
        return sizes


def layout(sizes: dict[str, int]) -> tuple[dict[str, tuple[int, int]], int]:
    """Section -> (offset, length), and the total length, in elements."""
    out, offset = {}, 0
    for name in SECTIONS:
        out[name] = (offset, sizes[name])
        offset += -(-sizes[name] // _ALIGN) * _ALIGN
    return out, offset


@dataclass(frozen=True)
class StepTensors:
    input_ids: torch.Tensor
    positions: torch.Tensor
    sample_rows: torch.Tensor
    meta: AttentionMetadata
    # In the runner's persistent buffer (what graphs read); False for an oversized one-off.
    persistent: bool = True


class StepBuffers:
    """The persistent pinned staging buffer and the device buffer the step's views come from."""

    def __init__(self, capacity: int, device: torch.device, block_size: int):
        self.device = device
        self.block_size = block_size
        self.capacity = capacity
        pin = device.type == "cuda"
        self.host = torch.zeros(capacity, dtype=torch.long, pin_memory=pin)
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(capacity, dtype=torch.long, device=device)
        # The last copy out of the staging buffer; the host waits for it before writing again.
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    def upload(self, plan: StepPlan) -> StepTensors:
        places, total = layout(plan.sizes())
        host, dev = self.host_np, self.dev
        if total > self.capacity:
            # Larger than any step the config allows: a one-off buffer (never graph-captured).
            host, dev = np.zeros(total, dtype=np.int64), None
        elif self._copied is not None:
            self._copied.synchronize()
        for name in SECTIONS:
            offset, _ = places[name]
            values = getattr(plan, name)
            host[offset:offset + len(values)] = values
        if dev is None:
            return self._views(torch.from_numpy(host).to(self.device), places, plan,
                               persistent=False)
        dev[:total].copy_(self.host[:total], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return self._views(dev, places, plan)

    def _views(self, dev: torch.Tensor, places: dict[str, tuple[int, int]],
               plan: StepPlan, persistent: bool = True) -> StepTensors:
        def view(name: str, length: int | None = None) -> torch.Tensor:
            offset, size = places[name]
            return dev[offset:offset + (size if length is None else length)]

        triton = ta.TritonMetadata(
            query_start=view("query_start"), context_lens=view("context_lens"),
            table_start=view("table_start"), block_tables=view("block_tables"),
            tile_seq=view("tile_seq"), tile_start=view("tile_start"), block_m=plan.block_m,
            num_splits=plan.num_splits)
        meta = AttentionMetadata(block_size=self.block_size, slot_mapping=view("slots"),
                                 num_decodes=0, decode_block_tables=None,
                                 decode_context_lens=None, prefills=[], triton=triton)
        return StepTensors(view("input_ids"), view("positions"),
                           view("sample_rows", len(plan.sample_rows)), meta, persistent)


def plan_step(items: Sequence[tuple[Sequence[int], int, int, Sequence[int]]],
              sample: Sequence[bool], block_size: int, group: int, *,
              pad_to: int | None = None, scratch_block: int = 0,
              target_tiles: int = 0) -> StepPlan:
    """``items``: per sequence (token ids, computed tokens, new tokens, block ids);
    ``sample``: whether each one's last new token is sampled. ``pad_to``: add one-token
    sequences in ``scratch_block`` up to that many (decode graphs). ``target_tiles``: tiles
    per KV head that keep the device busy; a step with fewer splits its keys (0: never).

    A padded decode step's split count depends on its padded size alone, as its graph does;
    any other step's also on its longest context."""
    bs = block_size
    block_m = ta.block_m_for(group, max((n for _, _, n, _ in items), default=1))
    per_tile = ta.tile_tokens(block_m, group)
    plan = StepPlan([], [], [], [0], [], [], [], [], [], [], block_m)
    tables = plan.block_tables
    for s, ((token_ids, start, n, blocks), sampled) in enumerate(zip(items, sample)):
        end = start + n
        plan.input_ids.extend(token_ids[start:end])
        plan.positions.extend(range(start, end))
        plan.slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
        plan.query_start.append(plan.query_start[-1] + n)
        plan.context_lens.append(end)
        plan.table_start.append(len(tables))
        tables.extend(blocks[:(end + bs - 1) // bs])
        for first in range(0, n, per_tile):
            plan.tile_seq.append(s)
            plan.tile_start.append(first)
        if sampled:
            plan.sample_rows.append(plan.query_start[-1] - 1)
    if pad_to is not None:
        plan.sample_room = pad_to
        for s in range(len(items), pad_to):
            plan.input_ids.append(0)
            plan.positions.append(0)
            plan.slots.append(scratch_block * bs)
            plan.query_start.append(plan.query_start[-1] + 1)
            plan.context_lens.append(1)
            plan.table_start.append(len(tables))
            tables.append(scratch_block)
            plan.tile_seq.append(s)
            plan.tile_start.append(0)
    longest = None if pad_to is not None else max(plan.context_lens, default=0)
    plan.num_splits = ta.num_splits(len(plan.tile_seq), target_tiles, longest)
    return plan


class DecodeGraphs:
    """CUDA graphs of the model's forward over decode steps, one per padded batch size."""

    def __init__(self, sizes: list[int]):
        self.sizes = sorted(sizes)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_s: float | None = None

    def bucket(self, batch: int) -> int | None:
        """The smallest captured size that holds ``batch`` sequences, or None."""
        return next((s for s in self.sizes if s >= batch), None)

    def capture(self, upload: Callable[[int], StepTensors],
                forward: Callable[[StepTensors], torch.Tensor]) -> None:
        """``upload(size)`` sends a padded decode step of ``size`` sequences to the device;
        ``forward`` runs the model on its tensors and returns the hidden states. Only the
        forward is captured: each replay reads whatever the last upload of that size wrote."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: smaller ones reuse its memory
            tensors = upload(size)
            forward(tensors)  # compiles the kernels and warms cuBLAS for this shape
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = forward(tensors)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - started

    def replay(self, size: int) -> torch.Tensor:
        self.graphs[size].replay()
        return self.outputs[size]
