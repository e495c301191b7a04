"""Attacks on serving from a mirror (see REDTEAM.md), each kept as a regression
test: generations that repeat or go back, read-ahead blocks inside one another,
and a local copy that goes between reading a row and using it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.core.files.base import ContentFile

from queued_storage import ledger_sql, prefetch, prefetch_locations
from queued_storage.backends import QueuedStorage
from queued_storage.migration import progress
from queued_storage.models import PendingTransfer
from queued_storage.prefetch import RowState
from queued_storage.worker import drain
from tests.helpers import NEW_URL, GenerationClock, read_bytes, row_of

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status
Pair = tuple[QueuedStorage, QueuedStorage]


def mirrored(pair: Pair, payload: bytes = b"first") -> str:
    """``a.txt`` saved, then done on the storage and on its serving mirror."""
    storage, mirror = pair
    name = storage.save("a.txt", ContentFile(payload))
    drain(keys=[storage.key])
    drain(keys=[mirror.key])
    assert storage.url(name).startswith(NEW_URL)
    return name


# Generations


def test_generations_increase_in_one_clock_tick_and_across_a_step_back(
    generation_clock: GenerationClock,
) -> None:
    generation_clock.freeze()
    first = ledger_sql.new_generation()
    second = ledger_sql.new_generation()
    generation_clock.step_back(10_000_000_000)  # NTP

    assert first < second < ledger_sql.new_generation()


def test_a_resave_in_the_clock_tick_of_the_version_before_is_not_served_from_the_mirror(
    migrating: Pair, generation_clock: GenerationClock
) -> None:
    storage, mirror = migrating
    generation_clock.freeze()
    name = mirrored(migrating)
    done = row_of(mirror, name).generation

    assert storage.save(name, ContentFile(b"second!")) == name

    # The mirror has the first version: not what save() just wrote.
    assert not storage.url(name).startswith(NEW_URL)
    assert read_bytes(storage, name) == b"second!"
    assert storage.size(name) == len(b"second!")
    found = progress(storage.key, mirror.key)
    assert (found.verified_files, found.ready) == (0, False)
    assert row_of(storage, name).generation > done


def test_a_resave_and_a_delete_on_a_host_whose_clock_is_behind_get_larger_generations(
    migrating: Pair, generation_clock: GenerationClock
) -> None:
    storage, _mirror = migrating
    name = mirrored(migrating)
    first = row_of(storage, name).generation

    generation_clock.another_host(behind=10_000_000_000)
    storage.save(name, ContentFile(b"second!"))
    resaved = row_of(storage, name).generation
    storage.delete(name)

    assert first < resaved < row_of(storage, name).generation


# Read-ahead blocks inside one another


@pytest.mark.parametrize("change", ["resave", "delete"])
def test_a_change_in_an_inner_prefetch_block_is_seen_by_the_blocks_around_it(
    migrating: Pair, change: str
) -> None:
    storage, _mirror = migrating
    name = mirrored(migrating)

    with prefetch_locations(storage, [name]):
        assert storage.url(name).startswith(NEW_URL)
        with prefetch_locations(storage, [name]):
            if change == "resave":
                storage.save(name, ContentFile(b"second!"))
            else:
                storage.delete(name)

        if change == "resave":
            assert not storage.url(name).startswith(NEW_URL)
            assert storage.exists(name)
            assert storage.size(name) == len(b"second!")
            assert read_bytes(storage, name) == b"second!"
        else:
            assert not storage.exists(name)
            with pytest.raises(FileNotFoundError):
                storage.size(name)
            with pytest.raises(FileNotFoundError):
                storage.open(name)


# The local copy removed between reading the row and using it


READS: dict[str, Callable[[QueuedStorage, str], Any]] = {
    "exists": QueuedStorage.exists,
    "size": QueuedStorage.size,
    "get_accessed_time": QueuedStorage.get_accessed_time,
    "get_created_time": QueuedStorage.get_created_time,
    "get_modified_time": QueuedStorage.get_modified_time,
}


@pytest.mark.parametrize("read", list(READS))
def test_a_read_finds_a_file_moved_to_the_remote_after_its_row_was_read(
    make_storage: Callable[..., QueuedStorage],
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
    read: str,
) -> None:
    storage = make_storage(task="queued_storage.tasks.TransferAndDelete")
    name = storage.save("a.txt", ContentFile(b"bytes"))
    read_ahead = prefetch.served_state

    def then_transferred(of: Any, asked: str) -> RowState | None:
        """The row as it was (queued), then, before the read uses it, a worker
        transfers the file and TransferAndDelete removes the local copy."""
        state = read_ahead(of, asked)
        monkeypatch.setattr(prefetch, "served_state", read_ahead)
        with django_capture_on_commit_callbacks(execute=True):
            assert drain(keys=[storage.key]).done == 1
        assert not storage.local.exists(name)
        return state

    monkeypatch.setattr(prefetch, "served_state", then_transferred)
    answer = READS[read](storage, name)

    assert prefetch.served_state is read_ahead  # the gate opened
    assert row_of(storage, name).status == Status.DONE
    if read == "exists":
        assert answer is True
    elif read == "size":
        assert answer == len(b"bytes")
    else:
        assert answer == getattr(storage.remote, read)(name)
