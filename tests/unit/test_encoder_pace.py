"""The encoder's learnt pace, which sizes how much a grouping tick embeds."""

from __future__ import annotations

from workers.encoder import EncoderPace


def test_affordable_counts_the_fixed_cost_of_a_call() -> None:
    pace = EncoderPace(0.002, call_s=0.005)
    assert 49 <= pace.affordable(0.105) <= 50  # (0.105 - 0.005) / 0.002, give or take rounding
    assert pace.affordable(0.004) == 0
    assert pace.affordable(-1.0) == 0


def test_small_calls_bring_the_estimate_back_after_one_slow_call() -> None:
    pace = EncoderPace(0.002, call_s=0.005)
    pace.record(64, 64.0)  # one call stalled for a minute
    assert pace.affordable(0.1) == 0
    for _ in range(30):  # then single texts at their usual 7 ms
        pace.record(1, 0.007)
    assert pace.seconds_per_text < 0.0025
    assert pace.affordable(0.1) >= 30
