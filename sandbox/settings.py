"""Settings for the sandbox: a demo project that uses queued_storage end to end.

Not for production: the secret key is public and DEBUG is on. Environment:

* ``SANDBOX_LOG_LEVEL=INFO``: see every transfer the ``queued_storage`` logger
  reports.
* ``SANDBOX_S3_ENDPOINT``: the S3 API of the "s3" storage (``manage.py demo`` and
  ``manage.py runsandbox`` start their own on loopback and set it).
* ``SANDBOX_WORKER=django_q``: django-q2 wakes the worker (``runsandbox`` starts
  ``qcluster``); unset, ``runsandbox`` starts ``process_transfers --loop``.
* ``SANDBOX_DB``, ``SANDBOX_MEDIA_ROOT``: where the SQLite file and the local
  copies live (default: beside this file); the browser test uses a temporary one.
"""

from __future__ import annotations

import os
from pathlib import Path

SANDBOX_DIR = Path(__file__).resolve().parent
SANDBOX_WORKER = os.environ.get("SANDBOX_WORKER", "").strip() or None

SECRET_KEY = "sandbox-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ROOT_URLCONF = "sandbox.urls"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "queued_storage",
    "sandbox.gallery",
]
if SANDBOX_WORKER == "django_q":
    INSTALLED_APPS.append("django_q")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("SANDBOX_DB") or SANDBOX_DIR / "db.sqlite3",
        # A web process and a process_transfers worker write the same file: wait
        # for the lock, and take it when a transaction starts, not mid-way.
        "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
    }
}

MEDIA_ROOT = Path(os.environ.get("SANDBOX_MEDIA_ROOT") or SANDBOX_DIR / "media")
MEDIA_URL = "/media/"
STATIC_URL = "/static/"

STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    # Where every upload lands first, served by Django under MEDIA_URL.
    "local": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": MEDIA_ROOT, "base_url": MEDIA_URL},
    },
    # Where uploads end up. moto stands in for S3 and accepts any credentials.
    "s3": {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": "sandbox",
            "endpoint_url": os.environ.get(
                "SANDBOX_S3_ENDPOINT", "http://127.0.0.1:9000"
            ),
            "access_key": "sandbox-access-key",
            "secret_key": "sandbox-secret-key",
            "region_name": "us-east-1",
            "addressing_style": "path",
            "signature_version": "s3v4",
            "querystring_auth": True,
        },
    },
    "queued": {
        "BACKEND": "queued_storage.backends.QueuedStorage",
        "OPTIONS": {
            "local": "local",
            "remote": "s3",
            "key": "sandbox",
            # The default copy, behind the switches on the gallery page.
            "task": "sandbox.gallery.transfer.SandboxTransfer",
        },
    },
}

# A failure shows within seconds: two retries, 2 s then 4 s apart.
QUEUED_STORAGE_RETRIES = 2
QUEUED_STORAGE_RETRY_DELAY = 2
QUEUED_STORAGE_LEASE = 60
QUEUED_STORAGE_WORKER = SANDBOX_WORKER
# /metrics answers this machine only: curl http://127.0.0.1:8000/metrics
QUEUED_STORAGE_METRICS_ALLOWED_IPS = ["127.0.0.1", "::1"]

# Used when SANDBOX_WORKER=django_q: the ORM broker, in the sandbox's database.
Q_CLUSTER = {
    "name": "sandbox",
    "orm": "default",
    "workers": 2,
    "timeout": 120,
    "retry": 180,
    "max_attempts": 1,
    "catch_up": False,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "loggers": {
        "queued_storage": {
            "handlers": ["console"],
            "level": os.environ.get("SANDBOX_LOG_LEVEL", "WARNING").upper(),
            "propagate": False,
        },
    },
}
