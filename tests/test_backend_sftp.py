"""QueuedSFTPStorage against a real SSH server (asyncssh's SFTP subsystem) on
loopback, with key authentication and a pinned host key."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile

from queued_storage import registry
from queued_storage.backends import QueuedSFTPStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.real_names import check_real_names
from tests.servers import SFTPServerInfo, configure_storage, sftp_server
from tests.tools import require_module

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def sftp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SFTPServerInfo]:
    base = tmp_path_factory.mktemp("sftp")
    with sftp_server(base / "root", base / "keys") as info:
        yield info


def configure(
    settings: Any, tmp_path: Path, sftp: SFTPServerInfo, known_hosts: Path
) -> QueuedSFTPStorage:
    return configure_storage(
        settings,
        tmp_path,
        QueuedSFTPStorage,
        key="sftp",
        remote_options={
            "host": "127.0.0.1",
            "params": sftp.params,
            "known_host_file": str(known_hosts),
            "root_path": "/uploads",
            "base_url": "https://files.example.com/",
        },
    )


@pytest.fixture
def sftp_storage(
    sftp: SFTPServerInfo, tmp_path: Path, settings: Any
) -> Iterator[QueuedSFTPStorage]:
    storage = configure(settings, tmp_path, sftp, sftp.known_hosts)
    yield storage
    storage.remote.close()
    registry.forget("sftp")


@pytest.fixture
def sftp_client(sftp: SFTPServerInfo) -> Iterator[Any]:
    """paramiko's own SFTP client, on a connection of its own."""
    paramiko = require_module("paramiko")
    ssh = paramiko.SSHClient()
    ssh.load_host_keys(str(sftp.known_hosts))
    ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
    ssh.connect("127.0.0.1", **sftp.params)
    client = ssh.open_sftp()
    yield client
    client.close()
    ssh.close()


def sftp_read(client: Any, path: str) -> bytes | None:
    try:
        with client.open(path, "rb") as remote_file:
            return bytes(remote_file.read())
    except FileNotFoundError:
        return None


def test_sftp_round_trip(
    sftp_storage: QueuedSFTPStorage,
    sftp: SFTPServerInfo,
    sftp_client: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    payload = os.urandom(300_000)
    name = sftp_storage.save("scans/2026/contract.pdf", ContentFile(payload))

    assert name == "scans/2026/contract.pdf"
    assert sftp_storage.url(name) == "/media/scans/2026/contract.pdf"
    assert sftp_read(sftp_client, f"/uploads/{name}") is None

    stats = drain(keys=["sftp"])

    row = PendingTransfer.objects.get(storage_key="sftp", name=name)
    assert (stats.done, row.status) == (1, PendingTransfer.Status.DONE), row.last_error
    assert sftp_read(sftp_client, f"/uploads/{name}") == payload
    assert (sftp.root / "uploads" / name).read_bytes() == payload
    assert sftp_storage.url(name) == "https://files.example.com/scans/2026/contract.pdf"
    with sftp_storage.open(name) as opened:
        assert opened.read() == payload

    with django_capture_on_commit_callbacks(execute=True):
        sftp_storage.delete(name)

    assert sftp_read(sftp_client, f"/uploads/{name}") is None
    assert not sftp_storage.local.exists(name)
    assert not PendingTransfer.objects.filter(storage_key="sftp").exists()


def test_sftp_wrong_host_key_is_refused(
    sftp: SFTPServerInfo, tmp_path: Path, settings: Any
) -> None:
    """With a known_hosts file that pins another key for the server, the
    transfer fails and nothing reaches the server: the pinned key is checked."""
    asyncssh = require_module("asyncssh")
    impostor = asyncssh.generate_private_key("ssh-ed25519")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        f"[127.0.0.1]:{sftp.port} "
        f"{impostor.export_public_key('openssh').decode().strip()}\n"
    )
    storage = configure(settings, tmp_path, sftp, known_hosts)
    try:
        name = storage.save("pinned.txt", ContentFile(b"secret plans"))
        drain(keys=["sftp"])
    finally:
        # paramiko keeps the refused connection open until the client closes;
        # left open, it holds the server's shutdown (Python 3.12.1+ waits for it).
        storage.remote.close()
        registry.forget("sftp")

    row = PendingTransfer.objects.get(storage_key="sftp", name=name)
    assert row.status == PendingTransfer.Status.QUEUED
    assert "BadHostKeyException" in row.last_error
    assert not (sftp.root / "uploads" / name).exists()
    assert storage.url(name) == "/media/pinned.txt"


def test_sftp_real_names(
    sftp_storage: QueuedSFTPStorage,
    sftp_client: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    check_real_names(
        sftp_storage,
        lambda name: sftp_read(sftp_client, f"/uploads/{name}"),
        django_capture_on_commit_callbacks,
    )
