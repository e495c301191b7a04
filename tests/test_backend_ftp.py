"""QueuedFTPStorage against a real FTP server (pyftpdlib) on loopback."""

from __future__ import annotations

import ftplib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile

from queued_storage import registry
from queued_storage.backends import QueuedFTPStorage
from queued_storage.models import PendingTransfer
from queued_storage.transfer import drain
from tests.servers import FTPServerInfo, configure_storage, ftp_server

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def ftp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FTPServerInfo]:
    with ftp_server(tmp_path_factory.mktemp("ftp-root")) as info:
        yield info


def configure(settings: Any, tmp_path: Path, location: str) -> QueuedFTPStorage:
    return configure_storage(
        settings,
        tmp_path,
        QueuedFTPStorage,
        key="ftp",
        remote_options={
            "location": location,
            "base_url": "https://files.example.com/",
        },
    )


@pytest.fixture
def ftp_storage(
    ftp: FTPServerInfo, tmp_path: Path, settings: Any
) -> Iterator[QueuedFTPStorage]:
    storage = configure(settings, tmp_path, ftp.location)
    yield storage
    disconnect(storage)
    registry.forget("ftp")


def disconnect(storage: QueuedFTPStorage) -> None:
    """Log out the remote FTPStorage, which keeps its connection between calls."""
    remote: Any = storage.remote
    if remote._connection is not None:
        remote.disconnect()


def ftp_client(ftp: FTPServerInfo) -> ftplib.FTP:
    client = ftplib.FTP()
    client.connect("127.0.0.1", ftp.port, timeout=10)
    client.login(ftp.user, ftp.password)
    return client


def ftp_read(ftp: FTPServerInfo, name: str) -> bytes | None:
    """The file's bytes as the FTP server serves them, or None if it has none."""
    client = ftp_client(ftp)
    try:
        buffer = io.BytesIO()
        client.retrbinary(f"RETR {name}", buffer.write)
        return buffer.getvalue()
    except ftplib.error_perm:
        return None
    finally:
        client.quit()


def test_ftp_round_trip(
    ftp_storage: QueuedFTPStorage,
    ftp: FTPServerInfo,
    django_capture_on_commit_callbacks: Any,
) -> None:
    payload = os.urandom(200_000)
    name = ftp_storage.save("reports/2026/q1.pdf", ContentFile(payload))

    assert name == "reports/2026/q1.pdf"
    assert ftp_storage.url(name) == "/media/reports/2026/q1.pdf"
    assert ftp_read(ftp, name) is None

    stats = drain(keys=["ftp"])

    row = PendingTransfer.objects.get(storage_key="ftp", name=name)
    assert (stats.done, row.status) == (1, PendingTransfer.Status.DONE), row.last_error
    assert ftp_read(ftp, name) == payload
    assert ftp_storage.url(name) == "https://files.example.com/reports/2026/q1.pdf"
    with ftp_storage.open(name) as opened:
        assert opened.read() == payload

    with django_capture_on_commit_callbacks(execute=True):
        ftp_storage.delete(name)

    assert ftp_read(ftp, name) is None
    assert not (ftp.root / name).exists()
    assert not ftp_storage.local.exists(name)
    assert not PendingTransfer.objects.filter(storage_key="ftp").exists()


def test_ftp_login_error_is_kept_without_the_password(
    ftp: FTPServerInfo, tmp_path: Path, settings: Any
) -> None:
    """A wrong password is a retryable error on the row, and the row, whose
    error text django-storages builds from the parsed location, never holds
    the password."""
    password = "wrong-passw0rd"
    storage = configure(
        settings,
        tmp_path,
        f"ftp://{ftp.user}:{password}@127.0.0.1:{ftp.port}/",
    )
    try:
        name = storage.save("a.txt", ContentFile(b"abc"))
        drain(keys=["ftp"])
    finally:
        registry.forget("ftp")

    row = PendingTransfer.objects.get(storage_key="ftp", name=name)
    assert row.status == PendingTransfer.Status.QUEUED
    assert row.attempts == 1
    assert "FTPStorageException" in row.last_error
    assert password not in row.last_error
    assert password not in str(row.error_history)
    assert storage.url(name) == "/media/a.txt"
    assert ftp_read(ftp, name) is None
