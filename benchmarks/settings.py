"""Django settings for the benchmarks (never the test settings, never the sandbox).

The runner sets ``QUEUED_STORAGE_BENCH_DB`` (sqlite, postgresql, mariadb),
``QUEUED_STORAGE_BENCH_NAME`` (the dedicated database, created and dropped by the
runner) and ``QUEUED_STORAGE_BENCH_DIR`` (a temporary directory for files).
"""

from __future__ import annotations

import json
import os
from typing import Any

from tests.databases import server_address, server_credentials

SECRET_KEY = "queued-storage-benchmarks-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

VENDOR = os.environ.get("QUEUED_STORAGE_BENCH_DB", "sqlite")
NAME = os.environ.get("QUEUED_STORAGE_BENCH_NAME", "queued_storage_bench")
BENCH_DIR = os.environ.get("QUEUED_STORAGE_BENCH_DIR", "/tmp/queued_storage_bench")

if VENDOR == "mariadb":
    import pymysql

    pymysql.install_as_MySQLdb()


def _database(vendor: str, name: str) -> dict[str, Any]:
    if vendor == "sqlite":
        # A file database with Django's defaults, as a user's would be.
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.path.join(BENCH_DIR, f"{name}.sqlite3"),
        }
    host, port = server_address(vendor)
    user, password = server_credentials(vendor)
    engine = {"postgresql": "postgresql", "mariadb": "mysql"}[vendor]
    config: dict[str, Any] = {
        "ENGINE": f"django.db.backends.{engine}",
        "NAME": name,
        "HOST": host,
        "PORT": str(port),
        "USER": user,
        "PASSWORD": password,
    }
    if vendor == "mariadb":
        config["OPTIONS"] = {"charset": "utf8mb4"}
    return config


DATABASES = {"default": _database(VENDOR, NAME)}
# The scale benchmark's million-row ledger lives in a database of its own, so that
# the 1,000-row ledger it is compared with is a table of 1,000 rows.
if os.environ.get("QUEUED_STORAGE_BENCH_LARGE"):
    DATABASES["large"] = _database(VENDOR, os.environ["QUEUED_STORAGE_BENCH_LARGE"])
DATABASE_ROUTERS = ["benchmarks.harness.LedgerRouter"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "queued_storage",
    "benchmarks.benchapp",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": False,
        "OPTIONS": {},
    },
]

MEDIA_ROOT = os.path.join(BENCH_DIR, "media")
MEDIA_URL = "/media/"

STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    # The scale-out benchmark's storage: its worker processes find it here.
    "scaleout": {
        "BACKEND": "queued_storage.backends.QueuedStorage",
        "OPTIONS": {
            "local": "django.core.files.storage.FileSystemStorage",
            "remote": "benchmarks.noop.SlowStorage",
            "local_options": {"location": os.path.join(BENCH_DIR, "scaleout-local")},
            "remote_options": {"location": os.path.join(BENCH_DIR, "scaleout-remote")},
            "key": "bench-scaleout",
        },
    },
    # The audit benchmark's storage, on a bucket of the moto server that the
    # benchmark starts (its address comes in the environment of the audit's
    # process); the references are benchapp's AuditedDoc.file.
    "audit": {
        "BACKEND": "queued_storage.backends.QueuedStorage",
        "OPTIONS": {
            "local": "django.core.files.storage.FileSystemStorage",
            "remote": "storages.backends.s3.S3Storage",
            "local_options": {"location": os.path.join(BENCH_DIR, "audit-local")},
            "remote_options": {
                "access_key": "testing",
                "secret_key": "testing",
                "region_name": "us-east-1",
                "addressing_style": "path",
                "endpoint_url": os.environ.get(
                    "QUEUED_STORAGE_BENCH_AUDIT_ENDPOINT", "http://127.0.0.1:9"
                ),
                "bucket_name": "bench-audit",
            },
            "key": "bench-audit",
        },
    },
}
# The drain benchmark's storage, for the process_transfers it starts: the
# QueuedStorage options as JSON.
if os.environ.get("QUEUED_STORAGE_BENCH_STORAGE"):
    STORAGES["queued"] = {
        "BACKEND": "queued_storage.backends.QueuedStorage",
        "OPTIONS": json.loads(os.environ["QUEUED_STORAGE_BENCH_STORAGE"]),
    }

# Rows wait for process_transfers, as with a cron deployment.
QUEUED_STORAGE_WORKER = None
QUEUED_STORAGE_HOSTNAME = "bench"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"queued_storage": {"level": "WARNING"}},
}
