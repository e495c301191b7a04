"""Settings of a site written from the django-queued-storage 0.8 documentation,
switched to 0.9 by following the README's "Coming from django-queued-storage 0.8".

The first part is the site's own configuration. The test harness at the bottom
picks the database, the media directories and the S3 endpoint from the
environment (``tests/test_legacy08.py`` sets them).
"""

from __future__ import annotations

import os

SECRET_KEY = "legacy08-site-not-secret"
DEBUG = False
USE_TZ = True
ROOT_URLCONF = "mysite.urls"
# The site's tables were created with AutoField ids (Django 1.9).
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    # "Add 'queued_storage' to your INSTALLED_APPS setting" (0.8 docs).
    "queued_storage",
    "mysite.gallery",
    "mysite.transferlog",
]

# The three settings of 0.8.
QUEUED_STORAGE_CACHE_PREFIX = "mysite_files"
QUEUED_STORAGE_RETRIES = 2
QUEUED_STORAGE_RETRY_DELAY = 30

# S3BotoStorage read these; S3Storage reads the same names (boto's AWS_S3_HOST
# and AWS_S3_CALLING_FORMAT became AWS_S3_ENDPOINT_URL and AWS_S3_ADDRESSING_STYLE).
AWS_ACCESS_KEY_ID = "testing"
AWS_SECRET_ACCESS_KEY = "testing-secret-key"
AWS_S3_REGION_NAME = "us-east-1"
AWS_S3_ADDRESSING_STYLE = "path"

ADMINS = [("Ops", "ops@example.com")]
EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"

# --- test harness -----------------------------------------------------------

from tests.databases import database_settings, selected_vendor  # noqa: E402

_vendor = selected_vendor()
if _vendor == "mariadb":
    import pymysql

    pymysql.install_as_MySQLdb()

_name = os.environ["LEGACY08_DB_NAME"]
_database = database_settings(_vendor)
_var = os.environ["LEGACY08_VAR"]
if _vendor == "sqlite":
    _database["NAME"] = os.path.join(_var, f"{_name}.sqlite3")
    _database["TEST"] = {"NAME": os.path.join(_var, f"test_{_name}.sqlite3")}
else:
    _database["NAME"] = _name
    _database["TEST"] = {**_database.get("TEST", {}), "NAME": f"test_{_name}"}
# A worker started by the site's tests works on the database they set up.
if os.environ.get("LEGACY08_USE_TEST_DB"):
    _database["NAME"] = _database["TEST"]["NAME"]
DATABASES = {"default": _database}

MEDIA_ROOT = os.path.join(_var, "media")
MEDIA_URL = "/media/"
ARCHIVE_ROOT = os.path.join(_var, "archive")
EMAIL_FILE_PATH = os.path.join(_var, "mail")
AWS_STORAGE_BUCKET_NAME = os.environ["LEGACY08_S3_BUCKET"]
AWS_S3_ENDPOINT_URL = os.environ["LEGACY08_S3_ENDPOINT"]
