"""Attacks on the host rule (PendingTransfer.hosts_here): a row with no host is
any host's only while no host's disk holds its local copy."""

from __future__ import annotations

from collections.abc import Callable
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command

from queued_storage import registry
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.verification import rows_to_verify, verify
from queued_storage.worker import drain
from tests.helpers import content

pytestmark = pytest.mark.django_db

Make = Callable[..., QueuedStorage]


def test_a_fix_from_one_hosts_local_copy_is_that_hosts_to_transfer(
    make_storage: Make, settings: Any
) -> None:
    """An adopted file (no host) whose remote copy went missing, re-queued by
    verify_transfers --fix on web-1 from the local copy on web-1's disk (a copy
    0.8 left there): only web-1 can send it again. A row left without a host was
    any host's, and web-2's worker took it, whose disk has no such file."""
    storage = make_storage(local_shared=False)
    registry.register(storage)  # declared by the site: the commands know its key
    settings.QUEUED_STORAGE_HOSTNAME = "web-1"
    storage.remote.save("old.txt", content("from before the ledger"))
    call_command("adopt_remote_files", "--storage", storage.key, stdout=StringIO())
    assert PendingTransfer.objects.get(storage_key=storage.key).host == ""
    storage.local.save("old.txt", content("from before the ledger"))
    storage.remote.delete("old.txt")

    stats = verify(rows_to_verify(), fix=True)

    assert stats.fixed == 1
    row = PendingTransfer.objects.get(storage_key=storage.key)
    assert row.status == PendingTransfer.Status.QUEUED
    assert row.host == "web-1"
    settings.QUEUED_STORAGE_HOSTNAME = "web-2"
    assert drain(keys=[storage.key]).processed == 0
    settings.QUEUED_STORAGE_HOSTNAME = "web-1"
    assert drain(keys=[storage.key]).done == 1
    assert storage.remote.exists("old.txt")
