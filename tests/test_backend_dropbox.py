"""QueuedDropboxStorage: wiring only. Dropbox has no emulator, and the tests
reach no network, so these show that the storage is built from STORAGES, that
saving never touches Dropbox, and that a worker calls the Dropbox API for the
transfer (stopped at name resolution, and recorded as a retryable error)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile

from queued_storage import registry
from queued_storage.backends import QueuedDropboxStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.real_names import REAL_NAMES
from tests.servers import configure_storage
from tests.tools import require_module

pytestmark = pytest.mark.django_db

TOKEN = "sl.test-token-not-real-0123456789"


@pytest.fixture
def no_internet(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Resolve loopback names only; remember every other host asked for."""
    asked: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in ("localhost", "127.0.0.1", "::1"):
            asked.append(name)
            raise socket.gaierror(f"tests reach no network (asked for {name})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


@pytest.fixture
def dropbox_storage(tmp_path: Path, settings: Any) -> Iterator[QueuedDropboxStorage]:
    """The README's STORAGES example."""
    require_module("dropbox")
    yield configure_storage(
        settings,
        tmp_path,
        QueuedDropboxStorage,
        key="dropbox",
        remote_options={
            "oauth2_access_token": TOKEN,
            "root_path": "/site-uploads",
            "timeout": 5,
        },
    )
    registry.forget("dropbox")


def test_dropbox_wiring(
    dropbox_storage: QueuedDropboxStorage, no_internet: list[str], settings: Any
) -> None:
    from storages.backends.dropbox import DropboxStorage

    settings.QUEUED_STORAGE_RETRY_DELAY = 60
    remote = dropbox_storage.remote
    assert isinstance(remote, DropboxStorage)
    assert remote.root_path == "/site-uploads"

    name = dropbox_storage.save("notes/today.txt", ContentFile(b"dear diary"))

    assert no_internet == []  # saving never contacts the remote
    assert dropbox_storage.url(name) == "/media/notes/today.txt"
    with dropbox_storage.open(name) as opened:
        assert opened.read() == b"dear diary"
    row = PendingTransfer.objects.get(storage_key="dropbox", name=name)
    assert row.status == PendingTransfer.Status.QUEUED

    drain(keys=["dropbox"])

    # The worker built the Dropbox client and called its API for this file.
    assert no_internet
    assert all(host.endswith(".dropboxapi.com") for host in no_internet)
    row.refresh_from_db()
    assert row.status == PendingTransfer.Status.QUEUED
    assert row.attempts == 1
    assert "dropboxapi.com" in row.last_error
    assert TOKEN not in row.last_error
    assert dropbox_storage.url(name) == "/media/notes/today.txt"


def test_dropbox_real_names_reach_the_api_whole(
    dropbox_storage: QueuedDropboxStorage,
    no_internet: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a server, as far as the wire: each name reaches the Dropbox API
    whole, as JSON that an HTTP header can carry (escaped to ASCII), in the
    existence check and in the upload. Dropbox itself answers the check (no such
    file); the upload is stopped before it leaves."""
    requests = require_module("requests")
    sent: list[tuple[str, str]] = []

    def post(session: Any, url: str, headers: Any, data: Any, **kwargs: Any) -> Any:
        if url.endswith("/files/get_metadata"):
            sent.append(("check", json.loads(data)["path"]))
            answer = requests.Response()
            answer.status_code = 409
            answer.headers["content-type"] = "application/json"
            answer._content = json.dumps(
                {
                    "error_summary": "path/not_found/",
                    "error": {".tag": "path", "path": {".tag": "not_found"}},
                }
            ).encode()
            return answer
        header = headers["Dropbox-API-Arg"]
        assert header.isascii()
        sent.append(("upload", json.loads(header)["path"]))
        raise requests.ConnectionError("stopped before it leaves")

    monkeypatch.setattr(requests.Session, "post", post)
    for name in REAL_NAMES:
        dropbox_storage.save(name, ContentFile(name.encode()))

    drain(keys=["dropbox"])

    assert set(sent) == {
        (step, f"/site-uploads/{name}")
        for name in REAL_NAMES
        for step in ("check", "upload")
    }
    assert [step for step, _path in sent].count("upload") == len(REAL_NAMES)
    rows = PendingTransfer.objects.filter(storage_key="dropbox")
    assert {(row.status, row.attempts) for row in rows} == {
        (PendingTransfer.Status.QUEUED, 1)
    }
