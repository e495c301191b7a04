"""QueuedSFTPStorage against a real SSH server (asyncssh's SFTP subsystem) on
loopback, with key authentication and a pinned host key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile

from queued_storage import registry
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.servers import SFTPServerInfo, configure_sftp
from tests.tools import require_module

pytestmark = pytest.mark.django_db


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
    storage = configure_sftp(settings, tmp_path, sftp, known_hosts)
    try:
        name = storage.save("pinned.txt", ContentFile(b"secret plans"))
        drain(keys=["sftp"])
    finally:
        # paramiko keeps the refused connection open until the client closes;
        # left open, it holds the server's shutdown (Python 3.12.1+ waits for it).
        storage.remote.close()  # type: ignore[attr-defined]
        registry.forget("sftp")

    row = PendingTransfer.objects.get(storage_key="sftp", name=name)
    assert row.status == PendingTransfer.Status.QUEUED
    assert "BadHostKeyException" in row.last_error
    assert not (sftp.root / "uploads" / name).exists()
    assert storage.url(name) == "/media/pinned.txt"
