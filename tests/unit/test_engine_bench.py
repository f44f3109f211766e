"""The engine benchmark's measurement order (bench/engine_bench.py, ``measure_sides``): both
sides are sampled in rounds, taking turns at every shape, so that a drift of the machine's
speed over the run reaches both sides instead of landing in their ratio."""

from __future__ import annotations

import time

import pytest

from bench import engine_bench
from bench.engine_bench import Side, Workload, measure_sides

W = Workload(prompt_len=4, new_tokens=5, prefill_lens=(8,), repeats=3)


def recording(name: str, calls: list[tuple[str, int, int]], seconds: dict[int, float]):
    """A side's ``run``: records (side, prompts, new tokens) and takes ``seconds[n]``."""
    def run(prompts: list[list[int]], new_tokens: int) -> float:
        calls.append((name, len(prompts), new_tokens))
        return seconds[new_tokens]
    return run


def test_the_sides_take_turns_at_every_shape_of_every_round():
    calls: list[tuple[str, int, int]] = []
    sides = {"ours": Side(recording("ours", calls, {1: 0.1, 2: 0.2, 5: 0.5}), (1, 16, 64), 3),
             "hf": Side(recording("hf", calls, {1: 0.2, 2: 0.4, 5: 1.0}), (1, 4, 16), 3)}
    out = measure_sides(sides, W)

    timed = calls[4:]  # after each side's two warm-up runs (largest batch, longest prompt)
    assert calls[:4] == [("ours", 64, 2), ("ours", 1, 1), ("hf", 16, 2), ("hf", 1, 1)]
    one_round = [("ours", 1, 1), ("ours", 1, 5), ("hf", 1, 1), ("hf", 1, 5),
                 ("hf", 4, 1), ("hf", 4, 5),
                 ("ours", 16, 1), ("ours", 16, 5), ("hf", 16, 1), ("hf", 16, 5),
                 ("ours", 64, 1), ("ours", 64, 5),
                 ("ours", 1, 1), ("hf", 1, 1)]  # prefill: one 8-token prompt, one token
    assert timed == one_round * 3

    assert sorted(out["ours"]["decode"]) == ["1", "16", "64"]
    assert sorted(out["hf"]["decode"]) == ["1", "16", "4"]
    # B * (N - 1) / (T(N) - T(1)) on the medians
    assert out["ours"]["decode"]["16"]["decode_tps"] == pytest.approx(16 * 4 / 0.4)
    assert out["hf"]["decode"]["1"]["decode_tps"] == pytest.approx(4 / 0.8)
    assert out["hf"]["prefill"]["8"] == {"ttft_s": 0.2, "prefill_tps": 40.0, "samples": 3}
    assert "skipped" not in out["ours"] and "skipped" not in out["hf"]


def test_each_number_is_the_median_of_its_samples():
    times = iter([0.1, 0.9, 0.3, 0.7, 0.2, 0.8])  # T(1), T(N) of rounds 0, 1, 2

    def run(prompts: list[list[int]], new_tokens: int) -> float:
        return 0.0 if new_tokens == 2 else next(times)  # the warm-up: 2 tokens

    out = measure_sides({"one": Side(run, (2,), 3)}, Workload(
        prompt_len=4, new_tokens=5, prefill_lens=(), repeats=3))
    # warm-ups take no samples; medians T(1) = 0.2, T(N) = 0.8
    assert out["one"]["decode"]["2"] == {"one_token_s": 0.2, "all_tokens_s": 0.8, "samples": 3,
                                         "decode_tps": pytest.approx(2 * 4 / 0.6)}


def test_a_side_with_fewer_repeats_sits_out_the_later_rounds():
    calls: list[tuple[str, int, int]] = []
    seconds = {1: 0.1, 2: 0.2, 5: 0.5}
    out = measure_sides({"ours": Side(recording("ours", calls, seconds), (1,), 2),
                         "hf": Side(recording("hf", calls, seconds), (1,), 1)}, W)
    # round 0: decode (T(1), T(N)) of each, prefill of each; round 1: ours alone
    assert [c[0] for c in calls[4:]] == ["ours"] * 2 + ["hf"] * 2 + ["ours", "hf"] \
        + ["ours"] * 3
    assert out["ours"]["prefill"]["8"]["samples"] == 2
    assert out["hf"]["decode"]["1"]["samples"] == 1


def test_past_the_deadline_no_sample_starts_and_what_has_none_is_listed_skipped(monkeypatch):
    monkeypatch.setattr(engine_bench, "log", lambda _message: None)
    calls: list[tuple[str, int, int]] = []
    run = recording("ours", calls, {1: 0.1, 2: 0.2, 5: 0.5})
    out = measure_sides({"ours": Side(run, (1, 4), 2)}, W, deadline=time.monotonic() - 1)
    assert len(calls) == 2  # the warm-ups only
    assert out["ours"] == {"decode": {}, "prefill": {},
                           "skipped": ["decode 1", "decode 4", "prefill 8"]}


def test_an_unusable_timing_is_an_error_not_a_rate():
    run = recording("ours", [], {1: 0.5, 2: 0.1, 5: 0.4})  # N tokens faster than one
    with pytest.raises(RuntimeError, match="timings are unusable"):
        measure_sides({"ours": Side(run, (1,), 1)}, W)


def test_the_peak_rss_leaves_out_what_came_and_went_before_the_reset():
    # peak_rss_mb is read from VmHWM; the roofline's 2 GiB of buffers came and went before
    # the engine loads, and must not be the peak reported for the engine.
    import torch

    buffer = torch.ones(2**27)  # 512 MiB, touched
    del buffer
    assert engine_bench.rss_mib("VmHWM") > engine_bench.rss_mib() + 400
    if not engine_bench.reset_peak_rss():
        pytest.skip("this kernel does not reset the peak (clear_refs)")
    assert engine_bench.rss_mib("VmHWM") < engine_bench.rss_mib() + 50
