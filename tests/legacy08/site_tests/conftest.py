"""Fixtures of the site's test suite: an empty bucket and empty media directories
for every test, the site's worker as a process of its own."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.management import call_command
from PIL import Image

SITE = Path(__file__).resolve().parent.parent


@pytest.fixture
def s3() -> Any:
    return boto3.client(
        "s3",
        endpoint_url=settings.AWS_S3_ENDPOINT_URL,
        aws_access_key_id=settings.AWS_ACCESS_KEY_ID,
        aws_secret_access_key=settings.AWS_SECRET_ACCESS_KEY,
        region_name=settings.AWS_S3_REGION_NAME,
    )


@pytest.fixture(autouse=True)
def empty_remote_and_media(s3: Any) -> Iterator[None]:
    """Every test starts with an empty bucket, media, archive and mail folder."""
    bucket = settings.AWS_STORAGE_BUCKET_NAME
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=item["Key"])
    for folder in (
        settings.MEDIA_ROOT,
        settings.ARCHIVE_ROOT,
        settings.EMAIL_FILE_PATH,
    ):
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        elif os.path.exists(folder):
            os.remove(folder)
        os.makedirs(folder)
    yield


def png(width: int = 3, height: int = 2, name: str = "image.png") -> ContentFile:
    """A real PNG image, as an upload would bring it."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return ContentFile(buffer.getvalue(), name=name)


def drain() -> None:
    """The cron line of the site: ``manage.py process_transfers``, in process."""
    call_command("process_transfers", verbosity=0)


def bucket_keys(s3: Any) -> list[str]:
    found = s3.list_objects_v2(Bucket=settings.AWS_STORAGE_BUCKET_NAME)
    return sorted(item["Key"] for item in found.get("Contents", []))


def remote_bytes(s3: Any, key: str) -> bytes:
    body = s3.get_object(Bucket=settings.AWS_STORAGE_BUCKET_NAME, Key=key)["Body"]
    data: bytes = body.read()
    return data


def manage(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python manage.py <args>`` of the site, as a process of its own, on the
    database this test run set up."""
    env = {**os.environ, "LEGACY08_USE_TEST_DB": "1"}
    env["DJANGO_SETTINGS_MODULE"] = "mysite.settings"
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=SITE,
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
