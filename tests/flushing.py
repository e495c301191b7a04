"""The flush after each transactional test, without its post_migrate signal (a
pytest plugin, loaded by tests/conftest.py).

Django empties every table after a ``TransactionTestCase`` (pytest-django's
``django_db(transaction=True)``) and then sends ``post_migrate``, whose receivers
build the content types and permissions of every app again: on this suite about
a tenth of a second a test, most of a transactional test's cost. Those two
tables hold what the test database's migrate wrote and no test changes them, so
the flush here empties every table but them and sends no signal: each test
starts from the same rows as before, sooner. A test that sets
``available_apps`` or ``serialized_rollback`` gets Django's own flush.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management.color import no_style
from django.db import connections
from django.test import TransactionTestCase

#: Written by migrate's post_migrate receivers; kept from one test to the next.
KEPT_TABLES = frozenset({"django_content_type", "auth_permission"})

# Not in django-stubs: a private method of TransactionTestCase.
_django_teardown = TransactionTestCase._fixture_teardown  # type: ignore[attr-defined]


def _fixture_teardown(self: Any) -> None:
    if self.available_apps is not None or self.serialized_rollback:
        _django_teardown(self)
        return
    for alias in self._databases_names(include_mirrors=False):
        connection = connections[alias]
        tables = connection.introspection.django_table_names(
            only_existing=True, include_views=False
        )
        flushed = [table for table in tables if table not in KEPT_TABLES]
        if connection.vendor == "postgresql":
            # TRUNCATE gives each table new files: tens of milliseconds for a
            # test's few rows. Django's foreign keys there are deferred to the
            # commit, by when every referencing table is empty too.
            quote = connection.ops.quote_name
            statements = [f"DELETE FROM {quote(table)};" for table in flushed]
        else:
            statements = connection.ops.sql_flush(
                no_style(), flushed, reset_sequences=False, allow_cascade=False
            )
        if statements:
            connection.ops.execute_sql_flush(statements)


def pytest_configure(config: pytest.Config) -> None:
    TransactionTestCase._fixture_teardown = _fixture_teardown  # type: ignore[attr-defined]
