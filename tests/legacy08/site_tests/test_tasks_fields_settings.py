"""The 0.8 documentation's Fields, Tasks and Settings pages on the site's models."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.files import File
from django.core.mail import EmailMessage
from django.core.management import CommandError
from django.utils import timezone
from mysite.gallery.models import Attachment, Report, Scan
from mysite.storage import ArchiveStorage
from mysite.tasks import TransferAndNotify

from queued_storage.models import PendingTransfer
from queued_storage.signals import transfer_failed
from queued_storage.tasks import Transfer, TransferAndDelete
from site_tests.conftest import bucket_keys, drain, png

pytestmark = pytest.mark.django_db(transaction=True)


def test_delayed_storage_waits_for_field_transfer(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Fields page's example: QueuedFileField(storage=QueuedS3BotoStorage(
    delayed=True)) saves locally; my_obj.image.transfer() sends it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "image.png").write_bytes(png().read())
    with open("image.png", "rb") as image:
        my_obj = Scan(image=File(image))
        # Save locally:
        my_obj.save()
    name = my_obj.image.name
    drain()
    assert bucket_keys(s3) == []
    assert my_obj.image.storage.using_local(name)

    # Transfer to remote location:
    assert my_obj.image.transfer() is True
    drain()

    assert bucket_keys(s3) == [name]
    assert my_obj.image.storage.using_remote(name)


def test_transfer_and_notify_example_runs_unchanged(
    mailoutbox: list[EmailMessage],
) -> None:
    """The Tasks page's TransferAndNotify, word for word: super().transfer()
    answers True and notify() is called with it."""
    report = Report.objects.create(file=png(name="q1.png"))
    assert mailoutbox == []

    drain()

    assert report.file.storage.using_remote(report.file.name)
    assert [m.body for m in mailoutbox] == ["transfer result: True"]


def test_hook_retry_attributes_read_the_settings() -> None:
    """max_retries and default_retry_delay default to QUEUED_STORAGE_RETRIES and
    QUEUED_STORAGE_RETRY_DELAY (the site sets 2 and 30)."""
    for hook in (Transfer, TransferAndDelete, TransferAndNotify):
        assert hook.max_retries == 2
        assert hook.default_retry_delay == 30
        assert hook().max_retries == 2
        assert hook().default_retry_delay == 30


def _break_archive() -> None:
    """The archive's folder becomes a file: every copy to it fails."""
    os.rmdir(settings.ARCHIVE_ROOT)
    Path(settings.ARCHIVE_ROOT).write_text("not a folder")


def test_retry_delay_setting_is_the_backoff_base() -> None:
    """After a failed attempt the next one waits QUEUED_STORAGE_RETRY_DELAY
    seconds (+-10 % jitter; later retries wait twice as long each time)."""
    attachment = Attachment.objects.create(file=png(name="a.png"))
    _break_archive()
    before = timezone.now()

    drain()

    row = PendingTransfer.objects.get(name=attachment.file.name)
    assert row.status == PendingTransfer.Status.QUEUED
    assert row.attempts == 1
    assert row.last_error
    assert row.next_attempt_at is not None
    wait = row.next_attempt_at - before
    assert timedelta(seconds=27) <= wait <= timedelta(seconds=34)


def test_retries_setting_bounds_the_attempts(settings: Any) -> None:
    """QUEUED_STORAGE_RETRIES retries after the first attempt, then the row is
    failed and transfer_failed is sent."""
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    attachment = Attachment.objects.create(file=png(name="b.png"))
    _break_archive()
    failed: list[dict[str, Any]] = []

    def on_failed(sender: Any, **kwargs: Any) -> None:
        failed.append(kwargs)

    transfer_failed.connect(on_failed)
    try:
        with pytest.raises(CommandError, match="failed for good"):
            drain()
    finally:
        transfer_failed.disconnect(on_failed)

    row = PendingTransfer.objects.get(name=attachment.file.name)
    assert row.status == PendingTransfer.Status.FAILED
    assert row.attempts == 3
    assert [f["name"] for f in failed] == [attachment.file.name]
    # The file is still served, from the local copy.
    assert attachment.file.storage.exists(attachment.file.name)


def test_subclass_class_attributes_configure_the_storage() -> None:
    """ArchiveStorage sets remote, remote_options and task as class attributes,
    as 0.8 subclasses did: they are the constructor's defaults."""
    storage = ArchiveStorage()
    assert storage.remote.location == os.path.abspath(settings.ARCHIVE_ROOT)  # type: ignore[attr-defined]
    attachment = Attachment.objects.create(file=png(name="c.png"))
    name = attachment.file.name

    drain()

    assert os.path.isfile(os.path.join(settings.ARCHIVE_ROOT, name))
    # task = TransferAndDelete: the local copy is gone, the archive serves it.
    assert not attachment.file.storage.local.exists(name)
    assert attachment.file.url == f"/archive/{name}"
