"""Attacks on claim sizing (claim_size.ClaimSize and the drain's hand-back): a
worker that claims about a row per lane must not leave its other lanes idle
behind one slow upload while rows are due."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.files.storage import FileSystemStorage

from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer, PendingTransferQuerySet
from queued_storage.stats import DrainStats
from queued_storage.worker import _Drain, drain
from tests.helpers import content, in_thread, joined
from tests.test_claim_size import NameGatedRemote, storage_on

Status = PendingTransfer.Status


@pytest.mark.django_db(transaction=True)
def test_one_slow_upload_does_not_idle_the_other_lanes(
    make_storage: Callable[..., QueuedStorage], tmp_path: Path
) -> None:
    """Two lanes, one held by a slow upload: the other lane drains the rest of the
    backlog meanwhile. A drain claimed again only once every row of its last
    claim had ended, and a claim of a row per lane left the free lane waiting
    for the slow upload (up to the transfer timeout) with rows due."""
    NameGatedRemote.held = "a.txt"
    NameGatedRemote.entered = threading.Event()
    NameGatedRemote.gate = threading.Event()
    storage = storage_on(make_storage, tmp_path, NameGatedRemote)
    names = [storage.save(f"{n}.txt", content(n)) for n in "abcdefgh"]
    rest = PendingTransfer.objects.filter(storage_key=storage.key).exclude(name="a.txt")
    others_done = threading.Event()

    def progress(stats: DrainStats, row: PendingTransfer, outcome: Any) -> None:
        if stats.done == len(names) - 1:
            others_done.set()

    thread, result = in_thread(
        lambda: drain(keys=[storage.key], concurrency=2, progress=progress)
    )
    try:
        assert NameGatedRemote.entered.wait(timeout=60)
        # Bounded: the free lane needs a moment per row, not the slow upload.
        finished = others_done.wait(timeout=30)
        assert finished, (
            "the free lane waited for the slow upload: "
            f"{rest.filter(status=Status.DONE).count()} of {rest.count()} done"
        )
    finally:
        NameGatedRemote.gate.set()
        thread.join(timeout=60)

    stats = joined(thread, result)
    assert stats.done == len(names)
    rows = PendingTransfer.objects.filter(storage_key=storage.key)
    assert set(rows.values_list("status", flat=True)) == {Status.DONE}


class FailFirstRemote(FileSystemStorage):
    """The first upload of ``held`` announces itself on ``entered``, waits for
    ``gate`` and fails (retryable); every other upload goes through."""

    held = ""
    entered = threading.Event()
    gate = threading.Event()
    failed = False

    def _save(self, name: str, content: Any) -> str:
        cls = type(self)
        if name == cls.held and not cls.failed:
            cls.entered.set()
            if not cls.gate.wait(timeout=60):
                raise TimeoutError("the test never opened the gate")
            cls.failed = True
            raise ConnectionError("the link dropped")
        return str(super()._save(name, content))  # type: ignore[misc]


@pytest.mark.django_db(transaction=True)
def test_a_retry_without_delay_after_a_free_lanes_empty_claim_runs_in_the_drain(
    make_storage: Callable[..., QueuedStorage],
    tmp_path: Path,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The free lane claims while a slow upload runs and finds nothing; the slow
    upload fails with a retry due at once, and ends before that claim returns:
    the drain retries it, as a drain whose claims waited for every row did."""
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    FailFirstRemote.held = "a.txt"
    FailFirstRemote.entered = threading.Event()
    FailFirstRemote.gate = threading.Event()
    FailFirstRemote.failed = False
    storage = make_storage(
        remote=f"{__name__}.{FailFirstRemote.__name__}",
        remote_options={"location": str(tmp_path / "remote")},
    )
    for n in "ab":
        storage.save(f"{n}.txt", content(n))
    rows = PendingTransfer.objects.filter(storage_key=storage.key)
    b_done = threading.Event()
    claimed_empty = threading.Event()
    a_ended = threading.Event()
    claim_due = PendingTransferQuerySet.claim_due
    row_ended = _Drain._row_ended

    def spy_claim(self: PendingTransferQuerySet, **kwargs: Any) -> list[Any]:
        found = claim_due(self, **kwargs)
        if not found and not claimed_empty.is_set():
            claimed_empty.set()
            # The slow row ends (its retry due at once) while this claim is out.
            assert a_ended.wait(timeout=60)
        return found

    def spy_ended(drain: _Drain, batch: Any) -> Any:
        ended = row_ended(drain, batch)
        if FailFirstRemote.failed:
            a_ended.set()
        return ended

    monkeypatch.setattr(PendingTransferQuerySet, "claim_due", spy_claim)
    monkeypatch.setattr(_Drain, "_row_ended", spy_ended)

    def progress(stats: DrainStats, row: PendingTransfer, outcome: Any) -> None:
        if row.name == "b.txt":
            b_done.set()

    thread, result = in_thread(
        lambda: drain(keys=[storage.key], concurrency=2, progress=progress)
    )
    try:
        assert FailFirstRemote.entered.wait(timeout=60)
        assert b_done.wait(timeout=30)
        assert claimed_empty.wait(timeout=30)
    finally:
        FailFirstRemote.gate.set()
        thread.join(timeout=60)

    stats = joined(thread, result)
    assert (stats.done, stats.retried) == (2, 1)
    assert set(rows.values_list("status", flat=True)) == {Status.DONE}


@pytest.mark.django_db(transaction=True)
def test_a_limited_drain_claims_no_more_than_its_limit_while_rows_run(
    make_storage: Callable[..., QueuedStorage],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--limit 2 on two lanes, one upload slow: the free lane does not claim a
    third row while the slow one runs (the limit counts rows recorded)."""
    NameGatedRemote.held = "a.txt"
    NameGatedRemote.entered = threading.Event()
    NameGatedRemote.gate = threading.Event()
    storage = storage_on(make_storage, tmp_path, NameGatedRemote)
    for n in "abc":
        storage.save(f"{n}.txt", content(n))
    claim_due = PendingTransferQuerySet.claim_due
    claims: list[int] = []
    second_claim = threading.Event()

    def spy_claim(self: PendingTransferQuerySet, **kwargs: Any) -> list[Any]:
        claims.append(kwargs["limit"])
        if len(claims) == 2:
            second_claim.set()
        return claim_due(self, **kwargs)

    monkeypatch.setattr(PendingTransferQuerySet, "claim_due", spy_claim)

    thread, result = in_thread(
        lambda: drain(keys=[storage.key], concurrency=2, limit=2)
    )
    try:
        assert NameGatedRemote.entered.wait(timeout=60)
        # Bounded: a free lane that claims while a.txt runs does so at once.
        second_claim.wait(timeout=3)
    finally:
        NameGatedRemote.gate.set()
        thread.join(timeout=60)

    stats = joined(thread, result)
    assert stats.done == 2
    rows = PendingTransfer.objects.filter(storage_key=storage.key)
    assert rows.filter(status=Status.DONE).count() == 2
