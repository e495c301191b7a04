"""Names as people upload them, sent through each shipped remote by its backend
test: spaces, accents and scripts outside latin-1, in folders and at the top."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from django.core.files.base import ContentFile

from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain

REAL_NAMES = (
    "dir with space/été ü 文件.txt",
    "dir with space/plain.txt",
    "a b.txt",
    "Ωμέγα/данные 2026.csv",
)


def payload_of(name: str) -> bytes:
    return f"{name}\n".encode() * 300


def check_real_names(
    storage: QueuedStorage,
    read_remote: Callable[[str], bytes | None],
    capture_on_commit: Any,
    *,
    urls: bool = True,
    names: tuple[str, ...] = REAL_NAMES,
) -> None:
    """Each of ``names`` (:data:`REAL_NAMES`) transfers and verifies; the remote
    holds its exact bytes under its name (``read_remote``, the service's own
    client: None for no object); ``exists``, ``open`` and (with ``urls``) ``url`` answer from
    the remote; and ``delete()`` removes the remote copy."""
    for name in names:
        assert storage.save(name, ContentFile(payload_of(name))) == name

    drain(keys=[storage.key])

    local_url = storage.local.url("")
    for name in names:
        row = PendingTransfer.objects.get(storage_key=storage.key, name=name)
        assert row.status == PendingTransfer.Status.DONE, (name, row.last_error)
        assert read_remote(name) == payload_of(name), name
        assert storage.exists(name)
        assert storage.remote.exists(name), name
        with storage.open(name) as opened:
            assert opened.read() == payload_of(name)
        if urls:
            url = storage.url(name)
            assert not url.startswith(local_url), url
            assert unquote(urlsplit(url).path).endswith(f"/{name}"), url

    with capture_on_commit(execute=True):
        for name in names:
            storage.delete(name)

    for name in names:
        assert read_remote(name) is None, name
        assert not storage.local.exists(name)
    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()
