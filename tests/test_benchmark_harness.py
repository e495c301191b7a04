"""The arithmetic of the benchmark harness (no timing here): a side-by-side
figure cancels an effect that slows whichever side runs first in a round."""

from __future__ import annotations

import math

import pytest

from benchmarks.harness import SideBySide


def test_pairs_of_both_orders_cancel_a_first_runner_penalty() -> None:
    # The package takes 1.2 s, the floor 1.0 s; whoever runs first pays 40 %.
    timing = SideBySide(subject=[1.68, 1.2, 1.68, 1.2], floor=[1.0, 1.4, 1.0, 1.4])

    assert timing.ratios() == pytest.approx([1.68, 0.857, 1.68, 0.857], abs=1e-3)
    assert timing.paired_ratios() == pytest.approx([1.2, 1.2])
    assert timing.median_ratio() == pytest.approx(1.2)
    assert timing.median_throughput() == pytest.approx(1 / 1.2)


def test_a_round_without_its_pair_counts_alone() -> None:
    timing = SideBySide(subject=[2.0, 1.0, 3.0], floor=[1.0, 2.0, 1.0])

    assert timing.paired_ratios() == pytest.approx([1.0, 3.0])
    assert timing.median_ratio() == pytest.approx(2.0)


def test_one_outlying_pair_does_not_make_the_figure() -> None:
    timing = SideBySide(
        subject=[1.5, 0.9, 1.5, 1.0, 1.5, 1.0], floor=[0.24, 1.26, 1.2, 1.3, 1.2, 1.3]
    )

    assert timing.median_ratio() == pytest.approx(
        math.sqrt(1.5 / 1.2 * 1.0 / 1.3), rel=1e-6
    )
