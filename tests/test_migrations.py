"""The models and their migrations agree: no migration is missing."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command


@pytest.mark.django_db
@pytest.mark.parametrize("app_label", ["queued_storage", "testapp"])
def test_no_missing_migrations(app_label: str) -> None:
    out = StringIO()
    try:
        call_command(
            "makemigrations", app_label, "--check", "--dry-run", stdout=out, stderr=out
        )
    except SystemExit:
        pytest.fail(f"makemigrations found changes to {app_label}:\n{out.getvalue()}")

    assert "No changes detected" in out.getvalue()
