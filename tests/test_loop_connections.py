"""Attacks on a ``process_transfers --loop`` worker's database connection: the
server drops it between two polls (a restarted PostgreSQL or MariaDB, a proxy's
idle timeout), and the worker's next poll must not end the worker; its idle
polls leave nothing behind; its ``--storage KEY`` keeps to this host's rows."""

from __future__ import annotations

import threading
from collections.abc import Callable
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, connections

from queued_storage import registry
from queued_storage.backends import QueuedStorage
from queued_storage.management.commands.process_transfers import Command
from queued_storage.models import PendingTransfer
from tests.helpers import content, row_of

pytestmark = pytest.mark.django_db(transaction=True)


def _kill_from_another_connection() -> None:
    """End this thread's database session on the server, as a restart does."""
    vendor = connection.vendor
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_backend_pid()"
            if vendor == "postgresql"
            else "SELECT CONNECTION_ID()"
        )
        (session,) = cursor.fetchone()
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            if vendor == "postgresql":
                cursor.execute("SELECT pg_terminate_backend(%s)", [session])
            else:
                cursor.execute(f"KILL {int(session)}")
    finally:
        other.close()


def test_a_loop_recovers_when_the_server_dropped_its_connection_between_polls(
    make_storage: Callable[..., QueuedStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle poll's claim runs on the command's own connection, which Django
    never checks outside a request: once the server dropped it, the next poll's
    claim raised and the worker exited; it logs the error, reconnects at the
    next poll, and transfers what was saved meanwhile."""
    if connection.vendor == "sqlite":
        pytest.skip("SQLite has no server to drop the connection")
    storage = make_storage()
    polls: list[int] = []

    def between_polls(self: Command, seconds: float) -> None:
        polls.append(len(polls) + 1)
        if len(polls) == 1:
            storage.save("saved-meanwhile.txt", content("x"))
            _kill_from_another_connection()

    monkeypatch.setattr(Command, "_sleep", between_polls)
    out = StringIO()
    try:
        call_command(
            "process_transfers",
            "--loop",
            "--max-polls",
            "4",
            "--interval",
            "1",
            stdout=out,
        )
    finally:
        connection.close()  # the test's own queries on a fresh connection
    row = row_of(storage, "saved-meanwhile.txt")
    assert row.status == PendingTransfer.Status.DONE
    assert storage.remote.exists("saved-meanwhile.txt")
    assert "done=1 " in out.getvalue()


def test_no_thread_or_connection_is_left_by_many_idle_polls(
    make_storage: Callable[..., QueuedStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle poll is its claim alone: a hundred of them start no thread that
    outlives them and open no connection beyond the command's own."""
    make_storage()
    counts: list[tuple[int, int]] = []

    def between_polls(self: Command, seconds: float) -> None:
        counts.append((threading.active_count(), _open_connections()))

    monkeypatch.setattr(Command, "_sleep", between_polls)
    call_command(
        "process_transfers",
        "--loop",
        "--max-polls",
        "100",
        "--interval",
        "1",
        stdout=StringIO(),
    )
    assert len(counts) == 99
    assert counts[-1] == counts[0]


def _open_connections() -> int:
    return sum(1 for conn in connections.all() if conn.connection is not None)


@pytest.mark.parametrize("concurrency", ["1", "2"])
def test_storage_key_on_another_host_takes_only_this_hosts_rows(
    make_storage: Callable[..., QueuedStorage], settings: Any, concurrency: str
) -> None:
    """``--storage KEY`` of a storage whose local copies are each host's own
    (local_shared=False), run on web-2: web-1's row is left as it was, unclaimed
    and unattempted, and web-2's is transferred."""
    storage = make_storage(local_shared=False)
    registry.register(storage)
    settings.QUEUED_STORAGE_HOSTNAME = "web-1"
    storage.save("web1.txt", content("1"))
    settings.QUEUED_STORAGE_HOSTNAME = "web-2"
    storage.save("web2.txt", content("2"))
    out = StringIO()
    call_command(
        "process_transfers",
        "--storage",
        storage.key,
        "--concurrency",
        concurrency,
        stdout=out,
    )
    assert "done=1 " in out.getvalue()
    other = row_of(storage, "web1.txt")
    assert (other.status, other.attempts, other.lease_expires_at) == (
        PendingTransfer.Status.QUEUED,
        0,
        None,
    )
    assert row_of(storage, "web2.txt").status == PendingTransfer.Status.DONE
    assert not storage.remote.exists("web1.txt")
