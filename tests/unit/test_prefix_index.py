"""The router's prefix index against scripted KV event sequences: the worker's own event log
(workers/engine/kv_events.py) produces the events, fed the way the worker client feeds them."""

from __future__ import annotations

import random

import pytest

from core.hashing import block_hashes, extra_key
from router.routing.prefix_index import PrefixIndex, WorkerBlocks
from workers.engine.kv_events import AllCleared, BlocksRemoved, BlocksStored, KVEventLog

KEY = extra_key("", "electron")


def prompt_hashes(seed: int, blocks: int) -> list[int]:
    rng = random.Random(seed)
    return block_hashes([rng.randrange(49152) for _ in range(16 * blocks)], 16, KEY)


def feed(handle: WorkerBlocks, event) -> bool:
    """What router/fleet/client.py does with each WatchState event."""
    if isinstance(event, BlocksStored):
        return handle.store(event.sequence, event.block_hashes)
    if isinstance(event, BlocksRemoved):
        return handle.remove(event.sequence, event.block_hashes)
    assert isinstance(event, AllCleared)
    return handle.clear(event.sequence)


def subscribe(index: PrefixIndex, worker_id: str, log: KVEventLog) -> WorkerBlocks:
    handle = index.join(worker_id)
    handle.reset(*log.snapshot())
    return handle


def catch_up(handle: WorkerBlocks, log: KVEventLog) -> None:
    assert handle.sequence is not None
    for event in log.events_since(handle.sequence):
        assert feed(handle, event)


# -- events ------------------------------------------------------------------------------------

def test_stored_blocks_match_the_prompts_leading_blocks():
    index, log = PrefixIndex(), KVEventLog()
    w0 = subscribe(index, "w0", log)
    prompt = prompt_hashes(1, 6)
    log.record_stored(prompt[:4])
    catch_up(w0, log)
    assert index.match(prompt).of("w0") == 4
    assert index.match(prompt_hashes(2, 6)).of("w0") == 0
    index.check_integrity()


def test_removed_block_cuts_the_match_where_it_was():
    index, log = PrefixIndex(), KVEventLog()
    w0 = subscribe(index, "w0", log)
    prompt = prompt_hashes(1, 6)
    log.record_stored(prompt)
    log.record_removed([prompt[2]])
    catch_up(w0, log)
    assert index.match(prompt).of("w0") == 2
    assert w0.hashes == set(prompt) - {prompt[2]}
    index.check_integrity()


def test_cleared_event_forgets_everything_the_worker_held():
    index, log = PrefixIndex(), KVEventLog()
    w0 = subscribe(index, "w0", log)
    prompt = prompt_hashes(1, 6)
    log.record_stored(prompt)
    log.record_cleared()
    log.record_stored(prompt[:1])
    catch_up(w0, log)
    assert index.match(prompt).of("w0") == 1
    assert index.num_hashes == 1
    index.check_integrity()


def test_gap_in_sequence_is_refused_and_a_snapshot_resyncs():
    index, log = PrefixIndex(), KVEventLog()
    w0 = subscribe(index, "w0", log)
    first, second = prompt_hashes(1, 4), prompt_hashes(2, 4)
    log.record_stored(first)            # 1: the router misses this one
    log.record_stored(second)           # 2
    log.record_removed(first[1:])       # 3
    missed, *rest = log.events_since(0)
    assert not feed(w0, rest[0])        # 2 after 0: a gap
    assert w0.sequence == 0 and not w0.hashes
    assert index.match(second).of("w0") == 0
    w0.reset(*log.snapshot())           # the re-opened stream's first message
    assert w0.sequence == 3 and w0.hashes == {first[0], *second}
    assert index.match(first).of("w0") == 1 and index.match(second).of("w0") == 4
    index.check_integrity()


def test_resync_snapshot_drops_blocks_evicted_while_out_of_sync():
    index, log = PrefixIndex(), KVEventLog()
    w0 = subscribe(index, "w0", log)
    prompt = prompt_hashes(1, 4)
    log.record_stored(prompt)
    catch_up(w0, log)
    log.record_removed(prompt[2:])      # missed
    w0.reset(*log.snapshot())
    assert index.match(prompt).of("w0") == 2
    index.check_integrity()


def test_worker_that_leaves_is_purged_and_its_stream_is_ignored():
    index, log = PrefixIndex(), KVEventLog()
    w0 = subscribe(index, "w0", log)
    w1 = subscribe(index, "w1", log)
    prompt = prompt_hashes(1, 4)
    log.record_stored(prompt)
    catch_up(w0, log)
    catch_up(w1, log)
    w0.leave()
    assert index.match(prompt).blocks == {"w1": 4}
    assert index.worker_ids() == ["w1"] and index.worker("w0") is None
    log.record_stored(prompt_hashes(2, 2))
    # A late event from the departed worker's stream changes nothing and asks no resync.
    assert feed(w0, log.events_since(1)[0])
    assert index.match(prompt_hashes(2, 2)).blocks == {}
    index.check_integrity()


def test_rejoining_worker_starts_from_its_new_snapshot_only():
    index, log = PrefixIndex(), KVEventLog()
    old = subscribe(index, "w0", log)
    prompt = prompt_hashes(1, 4)
    log.record_stored(prompt)
    catch_up(old, log)
    restarted = KVEventLog()            # the worker came back with an empty cache
    new = subscribe(index, "w0", restarted)
    assert not old.active and new.active
    assert index.match(prompt).blocks == {}
    index.check_integrity()


def test_one_pass_gives_every_workers_match_length():
    index = PrefixIndex()
    prompt = prompt_hashes(1, 6)
    holdings = {"full": prompt, "half": prompt[:3], "holed": prompt[:1] + prompt[2:],
                "none": prompt_hashes(2, 6)}
    for worker_id, hashes in holdings.items():
        index.join(worker_id).reset(0, hashes)
    match = index.match(prompt)
    assert match.blocks == {"full": 6, "half": 3, "holed": 1}
    assert match.cached == match.blocks


def test_replicas_subscribing_at_different_times_keep_the_same_exact_view():
    rng = random.Random(7)
    log = KVEventLog(capacity=10_000)
    early, late = PrefixIndex(), PrefixIndex()
    early_w0 = subscribe(early, "w0", log)
    late_w0: WorkerBlocks | None = None
    universe = prompt_hashes(3, 64)
    for step in range(400):
        roll = rng.random()
        if roll < 0.6:
            log.record_stored(rng.sample(universe, rng.randint(1, 5)))
        elif roll < 0.97:
            log.record_removed(rng.sample(universe, rng.randint(1, 5)))
        else:
            log.record_cleared()
        if step == 150:
            late_w0 = subscribe(late, "w0", log)
        if step % 37 == 0:
            catch_up(early_w0, log)
            if late_w0 is not None:
                catch_up(late_w0, log)
    assert late_w0 is not None
    catch_up(early_w0, log)
    catch_up(late_w0, log)
    _, truth = log.snapshot()
    assert early_w0.hashes == late_w0.hashes == truth
    for prefix in (universe[:8], universe[8:40]):
        assert early.match(prefix).blocks == late.match(prefix).blocks
    early.check_integrity()
    late.check_integrity()


# -- pending assignments -----------------------------------------------------------------------

def test_pending_blocks_match_until_they_expire():
    index = PrefixIndex()
    index.join("w0").reset(0, [])
    index.join("w1").reset(0, [])
    prompt = prompt_hashes(1, 4)
    index.add_pending("w1", prompt, expires_at=10.0)
    match = index.match(prompt, now=9.9)
    assert match.blocks == {"w1": 4} and match.cached == {}
    assert index.match(prompt, now=10.0).blocks == {}
    index.check_integrity()


def test_pending_and_cached_blocks_chain_into_one_match():
    index = PrefixIndex()
    w0 = index.join("w0")
    prompt = prompt_hashes(1, 6)
    w0.reset(0, prompt[:2])
    index.add_pending("w0", prompt[2:5], expires_at=5.0)
    match = index.match(prompt, now=1.0)
    assert match.blocks == {"w0": 5} and match.cached == {"w0": 2}


def test_overlapping_assignments_keep_shared_blocks_until_the_last_expires():
    index = PrefixIndex()
    index.join("w0").reset(0, [])
    prompt = prompt_hashes(1, 4)
    index.add_pending("w0", prompt, expires_at=1.0)
    index.add_pending("w0", prompt[:2], expires_at=2.0)
    assert index.match(prompt, now=1.5).of("w0") == 2
    assert index.match(prompt, now=2.5).of("w0") == 0
    index.check_integrity()


def test_dropped_assignment_stops_matching_at_once_and_expiry_is_then_harmless():
    index = PrefixIndex()
    index.join("w0").reset(0, [])
    prompt = prompt_hashes(1, 4)
    entry = index.add_pending("w0", prompt, expires_at=10.0)
    index.drop_pending(entry)
    index.drop_pending(entry)
    assert index.match(prompt, now=0.0).blocks == {}
    index.expire(11.0)
    index.check_integrity()


def test_pending_blocks_of_a_worker_that_leaves_vanish_with_it():
    index = PrefixIndex()
    w0 = index.join("w0")
    prompt = prompt_hashes(1, 4)
    entry = index.add_pending("w0", prompt, expires_at=10.0)
    w0.leave()
    index.join("w1")  # reuses the slot: the old entry must not touch it
    index.add_pending("w1", prompt[:1], expires_at=20.0)
    index.drop_pending(entry)
    assert index.match(prompt, now=0.0).blocks == {"w1": 1}
    index.check_integrity()


def test_pending_on_an_unknown_worker_records_nothing():
    index = PrefixIndex()
    assert index.add_pending("ghost", prompt_hashes(1, 2), expires_at=1.0) is None


@pytest.mark.parametrize("workers", [1, 64, 70])
def test_match_handles_many_workers(workers):
    index = PrefixIndex()
    prompt = prompt_hashes(1, 8)
    for i in range(workers):
        index.join(f"w{i:02d}").reset(0, prompt[: i % 9])
    match = index.match(prompt)
    assert match.blocks == {f"w{i:02d}": i % 9 for i in range(workers) if i % 9}
    index.check_integrity()
