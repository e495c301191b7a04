"""QueuedFileField: a file of a delayed storage waits for ``transfer()``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from queued_storage.fields import QueuedFieldFile
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import content, queued_file
from tests.testapp.models import Document, HeldDocument

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status


def status_of(document: Any) -> str:
    storage = document.file.storage
    return str(
        PendingTransfer.objects.get(
            storage_key=storage.key, name=document.file.name
        ).status
    )


def test_held_file_waits_for_transfer_then_is_drained_to_remote(
    fresh_storages: dict[str, Path],
) -> None:
    document = HeldDocument()
    document.file.save("report.txt", content("held bytes"))

    assert isinstance(document.file, QueuedFieldFile)
    assert document.file.name == "held/report.txt"
    assert status_of(document) == Status.HELD
    assert drain(keys=["documents-held"]).done == 0
    assert status_of(document) == Status.HELD
    assert not (fresh_storages["remote"] / "held/report.txt").exists()
    assert document.file.url == "/media/held/report.txt"

    loaded = HeldDocument.objects.get(pk=document.pk)
    assert queued_file(loaded.file).transfer() is True

    assert status_of(loaded) == Status.QUEUED
    assert drain(keys=["documents-held"]).done == 1
    assert status_of(loaded) == Status.DONE
    assert (fresh_storages["remote"] / "held/report.txt").read_bytes() == b"held bytes"
    assert loaded.file.url == "https://remote.example/held/report.txt"
    with loaded.file:
        assert loaded.file.read() == b"held bytes"


def test_transfer_of_a_transferred_file_returns_false(
    fresh_storages: dict[str, Path],
) -> None:
    document = Document.objects.create(title="a")
    document.file.save("a.txt", content())
    assert status_of(document) == Status.QUEUED
    drain(keys=["documents"])

    assert queued_file(document.file).transfer() is False

    assert status_of(document) == Status.DONE
    assert drain(keys=["documents"]).processed == 0


def test_transfer_with_the_immediate_worker_runs_after_commit(
    settings: Any,
    fresh_storages: dict[str, Path],
    django_capture_on_commit_callbacks: Any,
) -> None:
    settings.QUEUED_STORAGE_WORKER = "immediate"
    document = HeldDocument()
    document.file.save("now.txt", content("now"))

    with django_capture_on_commit_callbacks(execute=True):
        assert queued_file(document.file).transfer() is True
        assert status_of(document) == Status.QUEUED

    assert status_of(document) == Status.DONE
    assert (fresh_storages["remote"] / "held/now.txt").read_bytes() == b"now"
