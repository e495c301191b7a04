"""The switch from 0.8: old migrations, storages of the same classes, the files
from before the ledger, and the site's worker as a process of its own."""

from __future__ import annotations

import json
import os
from io import StringIO
from typing import Any

import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.management import call_command
from django.db import connection
from django.db.migrations.loader import MigrationLoader
from mysite.gallery.models import MyModel, Photo, Report, Scan, queued_s3storage
from mysite.transferlog.models import TransferLogEntry

from queued_storage.models import PendingTransfer
from site_tests.conftest import bucket_keys, drain, manage, png, remote_bytes

pytestmark = pytest.mark.django_db(transaction=True)


def test_makemigrations_finds_no_changes() -> None:
    """The 0.8-era migration plus the one written at the switch match the models."""
    out = StringIO()
    call_command("makemigrations", "--check", "--dry-run", stdout=out, stderr=out)
    assert "No changes detected" in out.getvalue()


def test_check_is_clean() -> None:
    out = StringIO()
    call_command("check", stdout=out, stderr=out)
    assert "no issues" in out.getvalue()


def test_old_migrations_leave_the_current_storages_in_charge() -> None:
    """Loading the migrations builds the storages as 0.8 serialised them (a
    CouchDB one, and the S3 ones without key=, sharing one key); the storages
    the models define still handle the files: no false key conflict, and a
    MyModel file keeps its local copy (its task is Transfer, not the
    TransferAndDelete of a historical storage)."""
    loader = MigrationLoader(connection)
    state = loader.project_state()
    historical = state.apps.get_model("gallery", "Photo")
    assert historical._meta.get_field("image").storage is not None
    before = loader.project_state(("gallery", "0001_initial")).apps
    backup = before.get_model("gallery", "Backup")  # 0.8's CouchDB model
    assert backup._meta.get_field("file").storage is not None

    obj = MyModel.objects.create(image=png(name="kept.png"))
    drain()

    out = StringIO()
    call_command("check", stdout=out, stderr=out)
    assert "no issues" in out.getvalue()
    assert queued_s3storage.using_remote(obj.image.name)
    assert queued_s3storage.local.exists(obj.image.name)


def test_storages_of_the_same_classes_keep_their_own_rows() -> None:
    """Four storages of FileSystemStorage -> S3 with other tasks and delayed:
    each row runs with its own storage's hook and its own delayed."""
    my = MyModel.objects.create(image=png(name="one.png"))
    photo = Photo.objects.create(image=png(name="two.png"))
    scan = Scan.objects.create(image=png(name="three.png"))
    report = Report.objects.create(file=png(name="four.png"))
    keys = {
        field.storage.key for field in (my.image, photo.image, scan.image, report.file)
    }
    assert len(keys) == 4
    assert PendingTransfer.objects.count() == 4

    drain()

    assert my.image.storage.local.exists(my.image.name)  # Transfer
    assert not photo.image.storage.local.exists(photo.image.name)  # TransferAndDelete
    assert scan.image.storage.using_local(scan.image.name)  # delayed: held
    assert report.file.storage.using_remote(report.file.name)


def test_remote_only_files_are_never_handed_to_a_new_upload(s3: Any) -> None:
    """0.8's TransferAndDelete left files that only S3 has, with no ledger row: a
    new upload of the same name gets another name, and the old file keeps its
    bytes and its URL."""
    bucket = settings.AWS_STORAGE_BUCKET_NAME
    s3.put_object(Bucket=bucket, Key="photos/beach.png", Body=b"from 2016")

    photo = Photo.objects.create(image=png(name="beach.png"))
    drain()

    assert photo.image.name != "photos/beach.png"
    assert remote_bytes(s3, "photos/beach.png") == b"from 2016"
    storage = photo.image.storage
    assert storage.exists("photos/beach.png")
    with storage.open("photos/beach.png") as old:
        assert old.read() == b"from 2016"
    assert storage.url("photos/beach.png").startswith(settings.AWS_S3_ENDPOINT_URL)
    row = PendingTransfer.objects.get(storage_key=storage.key, name=photo.image.name)
    assert row.status == PendingTransfer.Status.DONE


def test_adopt_remote_files_records_the_remote(s3: Any) -> None:
    """adopt_remote_files writes done rows for what the remote holds: served
    from S3, never offered to a new upload."""
    bucket = settings.AWS_STORAGE_BUCKET_NAME
    for key in ("photos/2015/a.png", "photos/2015/b.png"):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    storage = Photo._meta.get_field("image").storage

    out = StringIO()
    call_command("adopt_remote_files", "--storage", storage.key, "--json", stdout=out)

    rows = PendingTransfer.objects.filter(storage_key=storage.key).order_by("name")
    assert [(r.name, r.status) for r in rows] == [
        ("photos/2015/a.png", PendingTransfer.Status.DONE),
        ("photos/2015/b.png", PendingTransfer.Status.DONE),
    ]
    assert storage.using_remote("photos/2015/a.png")
    new = storage.save("photos/2015/a.png", ContentFile(b"new"))
    assert new != "photos/2015/a.png"
    assert remote_bytes(s3, "photos/2015/a.png") == b"photos/2015/a.png"


def test_queue_transfers_backfills_files_saved_before_the_switch(s3: Any) -> None:
    """A file 0.8 saved locally and never transferred has no row: queue_transfers
    gives it one and the worker moves it."""
    storage = Photo._meta.get_field("image").storage
    os.makedirs(os.path.join(settings.MEDIA_ROOT, "photos"))
    with open(os.path.join(settings.MEDIA_ROOT, "photos", "late.png"), "wb") as f:
        f.write(b"never sent")

    call_command("queue_transfers", "--storage", storage.key, verbosity=0)
    drain()

    assert remote_bytes(s3, "photos/late.png") == b"never sent"
    assert storage.using_remote("photos/late.png")
    assert not storage.local.exists("photos/late.png")  # TransferAndDelete


def test_the_sites_worker_process_transfers(s3: Any) -> None:
    """manage.py process_transfers with the site's settings, as cron runs it: the
    receiver and TransferAndNotify run in the worker, TransferAndDelete removes
    the local copy."""
    photo = Photo.objects.create(image=png(name="cron.png"))
    report = Report.objects.create(file=png(name="cron-report.png"))

    done = manage("process_transfers")

    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(bucket_keys(s3)) == sorted([photo.image.name, report.file.name])
    assert not photo.image.storage.local.exists(photo.image.name)
    logged = set(TransferLogEntry.objects.values_list("name", flat=True))
    assert logged == {photo.image.name, report.file.name}
    mails = os.listdir(settings.EMAIL_FILE_PATH)
    assert len(mails) == 1

    status = manage("transfer_status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    totals = json.loads(status.stdout)["totals"]
    assert totals["done"] == 2 and totals["failed"] == 0
