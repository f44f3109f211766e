"""Step inputs of the Triton backend: what a step plans, where it lands, and the property CUDA
graphs rely on (a padded decode step's sections sit where the graph was captured)."""

from __future__ import annotations

import pytest
import torch

from workers.engine.paged_steps import (
    SECTIONS,
    StepBuffers,
    decode_graph_sizes,
    layout,
    plan_step,
)
from workers.models import triton_attention as ta

BS = 16
SCRATCH = 999


def seq(computed: int, new: int, blocks: list[int]) -> tuple[list[int], int, int, list[int]]:
    return list(range(100, 100 + computed + new)), computed, new, blocks


def test_graph_sizes_are_powers_of_two_then_steps_of_sixteen_up_to_the_limit():
    assert decode_graph_sizes(1) == [1]
    assert decode_graph_sizes(12) == [1, 2, 4, 8, 12]
    assert decode_graph_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert decode_graph_sizes(70) == [1, 2, 4, 8, 16, 32, 48, 64, 70]


def test_a_mixed_step_plans_tokens_slots_tiles_and_tables():
    items = [seq(20, 1, [7, 3]),            # a decode at position 20
             seq(0, 5, [9]),                 # a new 5-token prompt
             seq(32, 40, [4, 5, 6, 8, 11])]  # a 40-token chunk over 32 cached tokens
    plan = plan_step(items, [True, True, False], BS, group=4)
    assert plan.block_m == ta.block_m_for(4, 40) == 64
    per_tile = ta.tile_tokens(64, 4)  # 16 tokens
    assert plan.positions == [20, 0, 1, 2, 3, 4, *range(32, 72)]
    assert plan.input_ids[:2] == [120, 100]
    assert plan.slots[0] == 3 * BS + 4 and plan.slots[1:6] == [9 * BS + i for i in range(5)]
    assert plan.slots[6] == 6 * BS + 0 and plan.slots[-1] == 11 * BS + 7  # positions 32, 71
    assert plan.query_start == [0, 1, 6, 46]
    assert plan.context_lens == [21, 5, 72]
    assert plan.tile_seq == [0, 1, 2, 2, 2]
    assert plan.tile_start == [0, 0, 0, per_tile, 2 * per_tile]
    assert plan.table_start == [0, 2, 3]
    assert plan.block_tables == [7, 3, 9, 4, 5, 6, 8, 11]
    assert plan.sample_rows == [0, 5]  # the last new token of each sampled sequence


def test_padding_rows_compute_in_the_scratch_block():
    plan = plan_step([seq(20, 1, [7, 3])], [True], BS, group=4, pad_to=4,
                     scratch_block=SCRATCH)
    assert plan.query_start == [0, 1, 2, 3, 4]
    assert plan.slots[1:] == [SCRATCH * BS] * 3
    assert plan.context_lens[1:] == [1, 1, 1]
    assert plan.block_tables[2:] == [SCRATCH] * 3 and plan.table_start == [0, 2, 3, 4]
    assert plan.tile_seq == [0, 1, 2, 3] and plan.sample_rows == [0]
    assert plan.sizes()["sample_rows"] == 4  # room for a full bucket


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_padded_decode_steps_put_what_a_graph_reads_where_it_was_captured(batch):
    """Whatever the sequences' lengths, blocks and sampled rows, every section but the block
    tables (read through table_start) has the offset and size of the capture-time step."""
    captured, _ = layout(plan_step([], [], BS, group=4, pad_to=8, scratch_block=SCRATCH).sizes())
    items = [seq(10 + 37 * i, 1, list(range(50 * i, 50 * i + (11 + 37 * i) // BS + 1)))
             for i in range(batch)]
    sampled = [i % 2 == 0 for i in range(batch)]
    places, _ = layout(plan_step(items, sampled, BS, group=4, pad_to=8,
                                 scratch_block=SCRATCH).sizes())
    for name in SECTIONS:
        if name == "block_tables":
            assert places[name][0] == captured[name][0]
        else:
            assert places[name] == captured[name], name


def test_upload_lands_every_section_in_its_view():
    items = [seq(20, 1, [7, 3]), seq(0, 5, [9])]
    plan = plan_step(items, [True, False], BS, group=2)
    buffers = StepBuffers(4096, torch.device("cpu"), BS)
    step = buffers.upload(plan)
    assert step.input_ids.tolist() == plan.input_ids
    assert step.positions.tolist() == plan.positions
    assert step.sample_rows.tolist() == [0]
    meta = step.meta
    assert meta.slot_mapping.tolist() == plan.slots
    t = meta.triton
    assert t.query_start.tolist() == [0, 1, 6] and t.context_lens.tolist() == [21, 5]
    assert t.table_start.tolist() == [0, 2] and t.block_tables.tolist() == [7, 3, 9]
    assert t.tile_seq.tolist() == [0, 1] and t.tile_start.tolist() == [0, 0]
    assert step.persistent
    # Every view is part of the one device buffer.
    base = buffers.dev.data_ptr()
    assert all(base <= v.data_ptr() < base + 4096 * 8 for v in (
        step.input_ids, t.block_tables, meta.slot_mapping))


def test_a_step_larger_than_the_buffer_gets_a_buffer_of_its_own():
    items = [seq(0, 300, list(range(19)))]
    plan = plan_step(items, [True], BS, group=2)
    buffers = StepBuffers(256, torch.device("cpu"), BS)
    step = buffers.upload(plan)
    assert step.positions.tolist() == list(range(300))
    assert step.input_ids.data_ptr() != buffers.dev.data_ptr()
    assert not step.persistent  # so a graph, which reads the runner's buffer, is not replayed


def test_a_padded_decode_step_splits_its_keys_as_its_graph_was_captured():
    """The split count sets the kernel's grid, which a graph fixes: a padded decode step's
    count follows its padded size alone, whatever its contexts."""
    captured = plan_step([], [], BS, group=4, pad_to=2, scratch_block=SCRATCH, target_tiles=33)
    assert captured.num_splits == ta.num_splits(2, 33) == 16
    for context in (1, 20, 5000):
        plan = plan_step([seq(context - 1, 1, list(range(context // BS + 1)))], [True], BS,
                         group=4, pad_to=2, scratch_block=SCRATCH, target_tiles=33)
        assert plan.num_splits == captured.num_splits
    # Without a target (or a bucket wide enough to fill the device) nothing is split.
    assert plan_step([], [], BS, group=4, pad_to=2, scratch_block=SCRATCH).num_splits == 1
    assert plan_step([], [], BS, group=4, pad_to=48, scratch_block=SCRATCH,
                     target_tiles=33).num_splits == 1


def test_an_eager_step_splits_by_its_tiles_and_its_longest_context():
    short = plan_step([seq(50, 16, [1, 2, 3, 4, 5])], [True], BS, group=4, target_tiles=33)
    assert short.num_splits == 1  # 66 keys: one share
    blocks = list(range(8192 // BS + 1))
    long = plan_step([seq(8176, 16, blocks)], [True], BS, group=4, target_tiles=33)
    assert long.num_splits == ta.MAX_SPLITS  # one tile over 8,192 keys
    wide = plan_step([seq(0, 1200, blocks[:75])], [True], BS, group=4, target_tiles=33)
    assert len(wide.tile_seq) >= 33 and wide.num_splits == 1  # a long prompt fills the device
    some = plan_step([seq(0, 600, blocks[:38])], [True], BS, group=4, target_tiles=33)
    assert len(some.tile_seq) == 19 and some.num_splits == 1  # 33 // 19: no whole second share
