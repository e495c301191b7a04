"""Database settings for the test suite, chosen by ``QUEUED_STORAGE_TEST_DB``.

Shared by ``tests/settings.py`` and ``tests/run_matrix.py`` so that the server
the matrix probes is the one the tests connect to. Imports nothing but the
standard library.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ENV_VAR = "QUEUED_STORAGE_TEST_DB"
VENDORS = ("sqlite", "postgresql", "mariadb")
DEFAULT_VENDOR = "sqlite"

# One fixed directory rather than mkdtemp(): a worker started in a subprocess
# by a test imports these settings again and must find the same SQLite file.
TEMP_DIR = os.path.join(tempfile.gettempdir(), "queued_storage_tests")


def run_id() -> str:
    """A name for this test run, shared with the worker processes it starts (they
    inherit the environment), so that concurrent runs never share a database."""
    return os.environ.setdefault("QUEUED_STORAGE_TEST_RUN", str(os.getpid()))


def selected_vendor() -> str:
    return os.environ.get(ENV_VAR, "").strip().lower() or DEFAULT_VENDOR


def server_address(vendor: str) -> tuple[str, int]:
    """Return the (host, port) of a server database; env vars override."""
    prefix = {"postgresql": "QUEUED_STORAGE_PG", "mariadb": "QUEUED_STORAGE_MARIADB"}
    default_port = {"postgresql": 5432, "mariadb": 3306}
    host = os.environ.get(f"{prefix[vendor]}_HOST", "127.0.0.1")
    port = int(os.environ.get(f"{prefix[vendor]}_PORT", default_port[vendor]))
    return host, port


def server_credentials(vendor: str) -> tuple[str, str]:
    """Return the (user, password) of a server database; env vars override."""
    prefix = {"postgresql": "QUEUED_STORAGE_PG", "mariadb": "QUEUED_STORAGE_MARIADB"}
    default_user = {"postgresql": "postgres", "mariadb": "root"}
    user = os.environ.get(f"{prefix[vendor]}_USER", default_user[vendor])
    password = os.environ.get(f"{prefix[vendor]}_PASSWORD", "")
    return user, password


def database_settings(vendor: str) -> dict[str, Any]:
    """Return the ``DATABASES["default"]`` dict for ``vendor``.

    Raises ``ValueError`` for an unknown vendor; settings turn that into
    ``ImproperlyConfigured``.
    """
    if vendor == "sqlite":
        os.makedirs(TEMP_DIR, exist_ok=True)
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.path.join(TEMP_DIR, "queued_storage.sqlite3"),
            # A file, not ":memory:", so that other processes (a worker under
            # test) can open the test database too.
            "TEST": {
                "NAME": os.path.join(
                    TEMP_DIR, f"test_queued_storage_{run_id()}.sqlite3"
                )
            },
            # IMMEDIATE takes the write lock at BEGIN, so concurrent writers
            # wait up to `timeout` instead of failing with "database is locked"
            # when a read transaction upgrades to a write.
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
        }
    if vendor == "postgresql":
        host, port = server_address(vendor)
        user, password = server_credentials(vendor)
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "queued_storage",
            "HOST": host,
            "PORT": str(port),
            "USER": user,
            "PASSWORD": password,
            "TEST": {"NAME": f"test_queued_storage_{run_id()}"},
        }
    if vendor == "mariadb":
        host, port = server_address(vendor)
        user, password = server_credentials(vendor)
        return {
            "ENGINE": "django.db.backends.mysql",
            "NAME": "queued_storage",
            "HOST": host,
            "PORT": str(port),
            "USER": user,
            "PASSWORD": password,
            "OPTIONS": {"charset": "utf8mb4"},
            "TEST": {
                "NAME": f"test_queued_storage_{run_id()}",
                "CHARSET": "utf8mb4",
                "COLLATION": "utf8mb4_unicode_ci",
            },
        }
    raise ValueError(
        f"{ENV_VAR}={vendor!r} is not supported; use one of: {', '.join(VENDORS)}."
    )


@contextmanager
def live_database(name: str) -> Iterator[None]:
    """An empty database ``name`` on the selected server, as a live site has one
    (not a test database): created, then dropped afterwards. Nothing on SQLite,
    where a new file is one."""
    vendor = selected_vendor()
    if vendor == "sqlite":
        yield
        return
    host, port = server_address(vendor)
    user, password = server_credentials(vendor)
    if vendor == "postgresql":
        import psycopg

        def execute(sql: str) -> None:
            with psycopg.connect(
                host=host,
                port=port,
                user=user,
                password=password,
                dbname="postgres",
                autocommit=True,
            ) as conn:
                conn.execute(sql)

        execute(f'CREATE DATABASE "{name}"')
        drop = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
    else:
        import pymysql

        def execute(sql: str) -> None:
            conn = pymysql.connect(host=host, port=port, user=user, password=password)
            try:
                with conn.cursor() as cursor:
                    cursor.execute(sql)
            finally:
                conn.close()

        execute(
            f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        )
        drop = f"DROP DATABASE IF EXISTS `{name}`"
    try:
        yield
    finally:
        execute(drop)
