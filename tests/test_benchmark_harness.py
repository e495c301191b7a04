"""The arithmetic of the benchmark harness (no timing here): a side-by-side
figure cancels an effect that slows whichever side runs first in a round; and
the drain's ledger floor does the work it stands for."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage

from benchmarks import ledger_floor
from benchmarks.harness import SideBySide
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer


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


@pytest.mark.django_db(transaction=True)
def test_the_ledger_floor_copies_every_due_row_and_marks_it_done(
    make_storage: Callable[..., QueuedStorage], tmp_path: Path
) -> None:
    # The floor the drain figure is read against must do the work it stands
    # for: every queued row's file copied whole, every row done, and nothing
    # of another storage's rows touched.
    storage = make_storage()
    other = make_storage()
    names = [storage.save(f"f/{i}.bin", ContentFile(b"x" * (i + 1))) for i in range(3)]
    other.save("f/other.bin", ContentFile(b"y"))
    remote = tmp_path / "floor-remote"
    local = storage.local
    assert isinstance(local, FileSystemStorage)

    assert ledger_floor.main([str(local.location), str(remote), storage.key]) == 0

    rows = PendingTransfer.objects.filter(storage_key=storage.key)
    assert set(rows.values_list("status", flat=True)) == {PendingTransfer.Status.DONE}
    for i, name in enumerate(names):
        assert (remote / name).read_bytes() == b"x" * (i + 1)
    untouched = PendingTransfer.objects.get(storage_key=other.key)
    assert untouched.status == PendingTransfer.Status.QUEUED
