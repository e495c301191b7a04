"""Storage keys, names and hosts compare exactly on every database: keys or
names that differ only in case or accents never share a row or a listing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.files.base import ContentFile
from django.core.management import call_command

from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import read_bytes

pytestmark = pytest.mark.django_db

Make = Callable[..., QueuedStorage]
Status = PendingTransfer.Status


@pytest.mark.parametrize(
    ("first_key", "second_key"),
    [("Media", "media"), ("m\u00e9dia", "media"), ("media", "media ")],
    ids=["case", "accent", "trailing-space"],
)
def test_storages_whose_keys_differ_in_case_or_accent_keep_their_own_rows(
    make_storage: Make,
    django_capture_on_commit_callbacks: Any,
    first_key: str,
    second_key: str,
) -> None:
    first = make_storage(key=first_key)
    second = make_storage(key=second_key)
    assert first.save("a.txt", ContentFile(b"first")) == "a.txt"
    assert second.save("a.txt", ContentFile(b"second")) == "a.txt"
    drain()

    with django_capture_on_commit_callbacks(execute=True):
        first.delete("a.txt")

    assert not first.exists("a.txt")
    assert list(
        PendingTransfer.objects.filter(storage_key=second_key).values_list(
            "storage_key", "name", "status", "deleted"
        )
    ) == [(second_key, "a.txt", Status.DONE, False)]
    assert not PendingTransfer.objects.filter(storage_key=first_key).exists()
    assert read_bytes(second, "a.txt") == b"second"
    assert read_bytes(second.remote, "a.txt") == b"second"


def test_names_that_differ_in_case_or_accent_are_rows_of_their_own(
    storage: QueuedStorage,
) -> None:
    for name in ("Report.txt", "report.txt", "r\u00e9port.txt"):
        assert storage.save(name, ContentFile(name.encode())) == name
    drain()

    for name in ("Report.txt", "report.txt", "r\u00e9port.txt"):
        row = PendingTransfer.objects.get(storage_key=storage.key, name=name)
        assert (row.name, row.status) == (name, Status.DONE)
        assert read_bytes(storage, name) == name.encode()


def test_listdir_from_the_ledger_is_case_sensitive(
    make_storage: Make, django_capture_on_commit_callbacks: Any
) -> None:
    """A remote that cannot list (listdir raises NotImplementedError) is listed
    from the ledger's done rows: ``Docs`` is not ``docs``."""
    storage = make_storage(
        remote="tests.storages.UnlistedStorage",
        task="queued_storage.tasks.TransferAndDelete",
    )
    for name in ("docs/a.txt", "Docs/b.txt", "docs/sub/c.txt", "Docs/hidden.txt"):
        storage.save(name, ContentFile(b"x"))
    storage.save("docs/hidden.txt", ContentFile(b"x"))
    with django_capture_on_commit_callbacks(execute=True):
        drain()
    assert not storage.local.exists("docs/a.txt")  # served by the remote alone

    storage.delete("Docs/hidden.txt")  # hidden now, files removed after commit

    assert storage.listdir("Docs") == ([], ["b.txt"])
    assert storage.listdir("docs") == (["sub"], ["a.txt", "hidden.txt"])
    assert storage.listdir("DOCS") == ([], [])
    assert storage.listdir("") == (["Docs", "docs"], [])


def test_a_host_that_differs_in_case_is_another_host(
    make_storage: Make, settings: Any
) -> None:
    """Rows of a host-local storage are taken only by the host that wrote them,
    by its exact name."""
    storage = make_storage(local_shared=False)
    settings.QUEUED_STORAGE_HOSTNAME = "Web-1"
    storage.save("a.txt", ContentFile(b"x"))

    settings.QUEUED_STORAGE_HOSTNAME = "web-1"
    assert drain(keys=[storage.key]).processed == 0

    settings.QUEUED_STORAGE_HOSTNAME = "Web-1"
    assert drain(keys=[storage.key]).processed == 1
    assert PendingTransfer.objects.get(storage_key=storage.key).status == Status.DONE


@pytest.mark.django_db(transaction=True)
def test_the_migration_to_exact_comparisons_runs_backwards_and_forwards() -> None:
    call_command("migrate", "queued_storage", "0001", verbosity=0)
    call_command("migrate", "queued_storage", verbosity=0)

    PendingTransfer.objects.create(storage_key="Media", name="A.txt", host="Web")
    assert not PendingTransfer.objects.filter(storage_key="media").exists()
    assert not PendingTransfer.objects.filter(name="a.txt").exists()
    assert not PendingTransfer.objects.filter(host="web").exists()
    assert PendingTransfer.objects.filter(storage_key="Media", name="A.txt").exists()


def test_a_host_name_longer_than_the_ledger_keeps_fails_the_save_and_writes_nothing(
    storage: QueuedStorage, settings: Any
) -> None:
    """Truncated (MariaDB's INSERT IGNORE cuts it silently), the host would never
    match again and a host-local worker would never take the row."""
    settings.QUEUED_STORAGE_HOSTNAME = "h" * 256

    with pytest.raises(ImproperlyConfigured, match="QUEUED_STORAGE_HOSTNAME"):
        storage.save("a.txt", ContentFile(b"x"))

    assert not PendingTransfer.objects.exists()
    assert not storage.local.exists("a.txt")
