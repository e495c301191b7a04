"""Minimal settings for the test suite (never imports the sandbox).

The database comes from ``QUEUED_STORAGE_TEST_DB``: ``sqlite`` (default),
``postgresql`` or ``mariadb``; see ``tests/databases.py`` for host, port and
user overrides.
"""

from __future__ import annotations

import importlib.util
import os

from django.core.exceptions import ImproperlyConfigured

from tests.databases import TEMP_DIR, database_settings, selected_vendor

SECRET_KEY = "queued-storage-tests-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ROOT_URLCONF = "tests.urls"

_vendor = selected_vendor()
if _vendor == "mariadb":
    # PyMySQL stands in for mysqlclient, which needs a C compiler and client
    # headers; it reports a mysqlclient-compatible version to Django's check.
    import pymysql

    pymysql.install_as_MySQLdb()

try:
    DATABASES = {"default": database_settings(_vendor)}
except ValueError as exc:
    raise ImproperlyConfigured(str(exc)) from exc

# A worker process started by a test (see tests/workers.py) connects straight to
# the test database that pytest-django created for the run it belongs to.
if os.environ.get("QUEUED_STORAGE_USE_TEST_DB"):
    DATABASES["default"]["NAME"] = DATABASES["default"]["TEST"]["NAME"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "queued_storage",
    "tests.testapp",
]

# The wake-up integrations' own apps, when installed (the test group has them; the
# core passes its tests without them, and their tests fail under CI=true).
for _module, _app in [
    ("django_q", "django_q"),
    ("django_tasks", "django_tasks"),
    ("django_tasks_db", "django_tasks_db"),
]:
    if importlib.util.find_spec(_module) is not None:
        INSTALLED_APPS.append(_app)

# django-q2 reads this once, at import: tests switch sync mode on Conf itself.
Q_CLUSTER = {
    "name": "queued_storage_tests",
    "orm": "default",
    "workers": 1,
    "timeout": 60,
    "retry": 120,
    "max_attempts": 1,
    "poll": 0.1,
    "catch_up": False,
}

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

MEDIA_ROOT = os.path.join(TEMP_DIR, "media")
MEDIA_URL = "/media/"
STATIC_URL = "/static/"

STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # The test models' QueuedStorage uses these two; a fixture re-points them at a
    # fresh directory for every test.
    "queued_local": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": os.path.join(TEMP_DIR, "local"), "base_url": "/media/"},
    },
    "queued_remote": {
        "BACKEND": "tests.storages.CountingStorage",
        "OPTIONS": {
            "location": os.path.join(TEMP_DIR, "remote"),
            "base_url": "https://remote.example/",
        },
    },
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# Admin tests create users; the default hasher costs ~0.3 s per password.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Settings a test hands to the worker processes it starts (tests/workers.py):
# JSON, e.g. {"QUEUED_STORAGE_LEASE": 2, "STORAGES": {...}}.
if os.environ.get("QUEUED_STORAGE_TEST_OVERRIDES"):
    import json

    globals().update(json.loads(os.environ["QUEUED_STORAGE_TEST_OVERRIDES"]))
