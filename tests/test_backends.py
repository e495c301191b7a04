"""Every remote backend through the whole path, one test for all: a save is
served from the local copy, a drain moves it to the backend's test server (on
127.0.0.1, port 0), it is served from there, and delete() removes both copies;
and names as people upload them (tests/real_names.py). Each case's server and
storage are conftest.py's ``<backend>_remote`` fixture. What only one backend
does is tested in its own tests/test_backend_<name>.py. Dropbox has no server
to run here: tests/test_backend_dropbox.py tests its wiring."""

from __future__ import annotations

import os
import urllib.request
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.core.files.base import ContentFile

from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.real_names import check_real_names
from tests.servers import Remote

pytestmark = pytest.mark.django_db

BACKENDS = ["s3", "azure", "gcs", "sftp", "ftp", "libcloud", "memory", "filesystem"]


def remote_of(request: pytest.FixtureRequest, backend: str) -> Remote:
    """The backend's server, started by this test, and its queued storage."""
    remote: Remote = request.getfixturevalue(f"{backend}_remote")
    return remote


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip(
    backend: str,
    request: pytest.FixtureRequest,
    django_capture_on_commit_callbacks: Any,
) -> None:
    remote = remote_of(request, backend)
    storage = remote.storage
    payload = os.urandom(300_000)
    name = storage.save("reports/2026/q1.pdf", ContentFile(payload))

    assert name == "reports/2026/q1.pdf"
    assert storage.url(name) == "/media/reports/2026/q1.pdf"
    assert remote.read(name) is None

    stats = drain(keys=[storage.key])

    row = PendingTransfer.objects.get(storage_key=storage.key, name=name)
    assert (stats.done, row.status) == (1, PendingTransfer.Status.DONE), row.last_error
    assert remote.read(name) == payload
    url = storage.url(name)
    parts = urlsplit(url)
    assert parts._replace(query="").geturl() == remote.url_of(name)
    if remote.signed_by is None:
        assert parts.query == ""
    else:
        assert remote.signed_by in parse_qs(parts.query), url
    if remote.served_over_http:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.read() == payload
    with storage.open(name) as opened:
        assert opened.read() == payload

    with django_capture_on_commit_callbacks(execute=True):
        storage.delete(name)

    assert remote.read(name) is None
    assert not storage.local.exists(name)
    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()


# FTP's own test_ftp_real_names checks more: the names on the server's disk.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "ftp"])
def test_real_names(
    backend: str,
    request: pytest.FixtureRequest,
    django_capture_on_commit_callbacks: Any,
) -> None:
    remote = remote_of(request, backend)
    check_real_names(remote.storage, remote.read, django_capture_on_commit_callbacks)
