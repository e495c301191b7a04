"""The local copy: the bytes a save wrote are the size the ledger records, a save
that fails leaves nothing to serve, and the worker uploads only regular files
inside the local storage's root."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile

from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.transfer import drain
from tests.conftest import read_bytes, row_of

pytestmark = pytest.mark.django_db

Make = Callable[..., QueuedStorage]
Status = PendingTransfer.Status


def local_files(storage: QueuedStorage) -> list[str]:
    """Every file under the local storage's root, relative to it."""
    root = Path(storage.local.location)  # type: ignore[attr-defined]
    return sorted(
        str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()
    )


def transferred(storage: QueuedStorage, name: str) -> PendingTransfer:
    drain(keys=[storage.key])
    row = row_of(storage, name)
    assert (row.status, row.last_error) == (Status.DONE, "")
    return row


# Sizes are bytes


class Unsized:
    """A file object that cannot tell its size: no ``size``, no name, no seek."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._data.read(size)


def test_str_content_records_its_size_in_bytes(storage: QueuedStorage) -> None:
    text = "Grüße aus Köln"

    name = storage.save("n.txt", ContentFile(text))

    assert row_of(storage, name).size == len(text.encode()) == 17
    assert storage.local.size(name) == 17
    assert transferred(storage, name).size == storage.remote.size(name) == 17
    assert read_bytes(storage, name) == text.encode()


def test_a_file_whose_size_is_wrong_records_the_bytes_written(
    storage: QueuedStorage,
) -> None:
    wrong = ContentFile(b"twelve bytes", name="w.bin")
    wrong.size = 3

    name = storage.save("w.bin", wrong)

    assert row_of(storage, name).size == 12
    assert transferred(storage, name).size == storage.remote.size(name) == 12


def test_a_file_that_cannot_tell_its_size_records_the_bytes_written(
    storage: QueuedStorage,
) -> None:
    name = storage.save("u.bin", Unsized(b"no size known"))

    assert row_of(storage, name).size == 13
    assert transferred(storage, name).size == storage.remote.size(name) == 13


def test_a_file_whose_size_is_right_costs_no_second_statement(
    storage: QueuedStorage, django_assert_num_queries: Any
) -> None:
    with django_assert_num_queries(1):
        name = storage.save("r.bin", ContentFile(b"right size"))

    assert row_of(storage, name).size == 10
