"""The operations logic without a command, as the admin or a script calls it: the
result objects and per-row outcomes, and nothing printed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from queued_storage import adoption, registry
from queued_storage.backends import QueuedStorage
from queued_storage.backfill import Backfill
from queued_storage.local_copies import clean_local_copies, clean_one, rows_to_clean
from queued_storage.models import PendingTransfer
from queued_storage.verification import MISSING, Problem, rows_to_verify, verify
from tests.helpers import content, drained

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status


def transferred(storage: QueuedStorage, *names: str) -> list[str]:
    registry.register(storage)  # declared by the site, as the commands find it
    saved = [storage.save(name, content(f"content of {name}")) for name in names]
    drained(storage)
    return saved


def test_a_backfill_returns_its_counts_and_names_each_skipped_file(
    storage: QueuedStorage, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a.txt", "sub/b.txt", "bad\x01name.txt"):
        path = Path(storage.local.path(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"from before the ledger")
    skipped: list[str] = []
    batches: list[int] = []
    run = Backfill(storage, skipped=lambda name, error: skipped.append(name))

    counts = run.run(batch_size=1, after_batch=lambda: batches.append(1))

    assert counts.as_dict() == {
        "scanned": 3,
        "queued": 2,
        "done": 0,
        "existing": 0,
        "conflicts": 0,
        "invalid": 1,
        "vanished": 0,
    }
    assert skipped == ["bad\x01name.txt"]
    assert len(batches) == 3
    assert set(
        PendingTransfer.objects.filter(
            storage_key=storage.key, status=Status.QUEUED
        ).values_list("name", flat=True)
    ) == {"a.txt", "sub/b.txt"}
    assert capsys.readouterr() == ("", "")


def test_verify_reports_each_row_and_fixes_a_missing_copy(
    storage: QueuedStorage, capsys: pytest.CaptureFixture[str]
) -> None:
    kept, lost = transferred(storage, "kept.txt", "lost.txt")
    storage.remote.delete(lost)
    heard: list[tuple[str, Problem | None]] = []

    stats = verify(
        rows_to_verify().filter(storage_key=storage.key),
        fix=True,
        checked=lambda row, found, _stats: heard.append((row.name, found)),
    )

    assert (stats.checked, stats.ok, stats.fixed, stats.unfixed) == (2, 1, 1, [])
    [problem] = stats.problems
    assert (problem.name, problem.problem, problem.fixed) == (lost, MISSING, True)
    assert heard == [(kept, None), (lost, problem)]
    assert PendingTransfer.objects.get(name=lost).status == Status.QUEUED
    assert capsys.readouterr() == ("", "")


def test_cleaning_returns_one_outcome_per_row(
    storage: QueuedStorage, capsys: pytest.CaptureFixture[str]
) -> None:
    same, changed = transferred(storage, "same.txt", "changed.txt")
    Path(storage.local.path(changed)).write_bytes(b"written again, other size")
    rows = rows_to_clean(timedelta(0)).filter(storage_key=storage.key)
    row = rows.get(name=same)

    assert clean_one(row, dry_run=True).counted == "removed"
    assert storage.local.exists(same)

    outcomes = {}
    stats = clean_local_copies(
        rows, cleaned=lambda row, outcome, _stats: outcomes.update({row.name: outcome})
    )

    assert (outcomes[same].counted, outcomes[same].action) == ("removed", "removed")
    assert outcomes[same].bytes == len(b"content of same.txt")
    assert (outcomes[changed].counted, outcomes[changed].action) == ("changed", "kept")
    assert (stats.checked, stats.removed, stats.changed) == (2, 1, 1)
    assert stats.kept_in_doubt == 0
    assert not storage.local.exists(same)
    assert storage.local.exists(changed)
    assert capsys.readouterr() == ("", "")


def test_adoption_statuses_say_where_an_unfinished_adoption_stopped(
    storage: QueuedStorage, make_storage: Callable[..., QueuedStorage]
) -> None:
    other = make_storage()
    for name in ("a.txt", "b.txt"):
        storage.remote.save(name, content())
    run = adoption.Adoption(storage)
    run.record(["a.txt"])  # stopped after its first batch

    found = adoption.statuses([storage.key, other.key])

    assert list(found) == [storage.key, other.key]
    assert found[storage.key].as_dict() == {
        "adopted": False,
        "adopted_at": None,
        "adoption_cursor": "a.txt",
    }
    assert found[other.key].as_dict()["adoption_cursor"] is None

    run = adoption.Adoption(storage)
    run.run()

    assert adoption.statuses([storage.key])[storage.key].as_dict()["adopted"] is True
