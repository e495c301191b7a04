"""Attacks on the lane threads kept from one drain to the next (queued_storage/lanes.py):
what a parked thread keeps, what a drain's lane finds of the last one on its thread."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.conf import settings as django_settings

from queued_storage import lanes
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import content, row_of
from tests.storages import (
    FOUND_AT_UPLOAD,
    UPLOAD_THREADS,
    StateLeakingStorage,
)

Status = PendingTransfer.Status

LEAKING = "tests.storages.StateLeakingStorage"


@pytest.fixture(autouse=True)
def _no_leaks_set() -> Iterator[None]:
    UPLOAD_THREADS.clear()
    FOUND_AT_UPLOAD.clear()
    StateLeakingStorage.leak_activation = set()
    StateLeakingStorage.leak_transaction = set()
    yield
    StateLeakingStorage.leak_activation = set()
    StateLeakingStorage.leak_transaction = set()


class _Progress:
    def __call__(self, *args: Any, **kwargs: Any) -> None:
        pass


@pytest.mark.django_db(transaction=True)
def test_a_parked_thread_keeps_nothing_of_the_drain_it_ran_for(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    """The parked thread held its last lane (a method of the drain) until it ran
    another or ended, 5 minutes later: the drain, its stats and callbacks (the
    command, through ``should_stop``) and what its error referenced lived on."""
    storage = make_storage()
    name = storage.save("a.txt", content("a"))
    progress = _Progress()
    seen = weakref.ref(progress)
    assert drain(progress=progress).done == 1
    assert row_of(storage, name).status == Status.DONE
    assert lanes.parked() >= 1
    del progress
    gc.collect()
    assert seen() is None


@pytest.mark.django_db(transaction=True)
def test_a_drain_starts_without_what_the_last_drain_activated_on_its_thread(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    """A remote or hook that activates a language or time zone (context variables)
    and leaves it: the next drain's lanes on the thread ran in it, as they never
    did on a new thread."""
    storage = make_storage(remote=LEAKING)
    StateLeakingStorage.leak_activation = {"first.txt"}
    storage.save("first.txt", content("1"))
    assert drain().done == 1
    storage.save("second.txt", content("2"))
    assert drain().done == 1
    assert UPLOAD_THREADS["first.txt"] == UPLOAD_THREADS["second.txt"]
    assert (
        FOUND_AT_UPLOAD["second.txt"]
        == FOUND_AT_UPLOAD["first.txt"]
        == {
            "language": django_settings.LANGUAGE_CODE,
            "timezone": django_settings.TIME_ZONE,
        }
    )


@pytest.mark.django_db(transaction=True)
def test_a_drain_starts_without_a_transaction_the_last_drain_left_on_its_thread(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    """A hook that leaves a transaction open: Django closes such a connection at
    the lane's end but never reopens it, so every later drain's lane on the thread
    crashed on "connection closed" (and could not record it on the row), at every
    poll of a --loop worker."""
    storage = make_storage(remote=LEAKING)
    StateLeakingStorage.leak_transaction = {"first.txt"}
    storage.save("first.txt", content("1"))
    drain()
    name = storage.save("second.txt", content("2"))
    stats = drain()
    assert UPLOAD_THREADS.get("second.txt") == UPLOAD_THREADS["first.txt"]
    assert stats.done == 1
    assert row_of(storage, name).status == Status.DONE
