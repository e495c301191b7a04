"""The flush after a transactional test (tests/flushing.py): every table empty
but the content types and permissions, which stay as migrate wrote them."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.contrib.contenttypes.models import ContentType
from django.test import TransactionTestCase

from queued_storage.models import PendingTransfer
from tests.factories import pending_row


@pytest.mark.django_db(transaction=True)
def test_the_flush_empties_the_tables_but_keeps_content_types_and_permissions() -> None:
    kinds = sorted(ContentType.objects.values_list("pk", "app_label", "model"))
    permissions = sorted(Permission.objects.values_list("pk", "codename"))
    assert kinds and permissions
    user = User.objects.create(username="flushed")
    user.user_permissions.add(Permission.objects.all()[0])
    pending_row(name="flushed.txt")

    case = TransactionTestCase()
    case._fixture_teardown()  # type: ignore[attr-defined]

    assert not User.objects.exists()
    assert not PendingTransfer.objects.exists()
    assert not User.user_permissions.through.objects.exists()
    assert sorted(ContentType.objects.values_list("pk", "app_label", "model")) == kinds
    assert sorted(Permission.objects.values_list("pk", "codename")) == permissions
