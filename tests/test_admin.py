"""The ledger in the Django admin: what an operator sees, and what each kind of
staff user can change."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from django.contrib.auth.models import Permission
from django.core.files.storage import FileSystemStorage
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer, name_hash
from tests.factories import pending_row, pending_rows
from tests.helpers import content, remote_calls

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status
CHANGELIST = "admin:queued_storage_pendingtransfer_changelist"


def column_of(field: Any) -> str:
    """A concrete field's column name."""
    column = field.column
    assert isinstance(column, str), field
    return column


def changelist_url(**params: str) -> str:
    url = reverse(CHANGELIST)
    if params:
        url += "?" + "&".join(f"{key}={value}" for key, value in params.items())
    return url


def change_url(row: PendingTransfer) -> str:
    return reverse("admin:queued_storage_pendingtransfer_change", args=[row.pk])


def requeue_url(query: str = "") -> str:
    return reverse("admin:queued_storage_pendingtransfer_requeue") + query


def file_url(row: PendingTransfer, side: str) -> str:
    return reverse("admin:queued_storage_pendingtransfer_file", args=[row.pk, side])


def staff_client(django_user_model: Any, *codenames: str) -> Client:
    user = django_user_model.objects.create_user(
        username="-".join(codenames) or "staff", password="x", is_staff=True
    )
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def viewer(django_user_model: Any) -> Client:
    """Staff with only the view permission on the ledger."""
    return staff_client(django_user_model, "view_pendingtransfer")


@pytest.fixture
def operator(django_user_model: Any) -> Client:
    """Staff with the change permission (not a superuser)."""
    return staff_client(django_user_model, "change_pendingtransfer")


def act(client: Client, action: str, rows: list[PendingTransfer], **extra: str) -> Any:
    return client.post(
        changelist_url(),
        {"action": action, "_selected_action": [row.pk for row in rows], **extra},
        follow=True,
    )


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def fresh(row: PendingTransfer) -> PendingTransfer:
    return PendingTransfer.objects.get(pk=row.pk)


def test_changelist_shows_each_row_with_a_status_badge_and_counts(
    admin_client: Client,
) -> None:
    now = timezone.now()
    pending_row(name="a/queued.txt", size=2048)
    pending_row(
        name="a/failed.txt",
        status=Status.FAILED,
        attempts=6,
        last_error="ConnectionError: remote unreachable " + "x" * 200,
    )
    pending_row(
        name="a/done.txt",
        status=Status.DONE,
        transferred_at=now - timedelta(hours=3),
    )
    pending_row(
        name="a/stuck.txt",
        status=Status.TRANSFERRING,
        lease_expires_at=now - timedelta(minutes=10),
    )

    response = admin_client.get(changelist_url())

    assert response.status_code == 200
    page = response.content.decode()
    for name in ("a/queued.txt", "a/failed.txt", "a/done.txt", "a/stuck.txt"):
        assert name in page
    assert "qs-status-failed" in page
    assert "2.0\xa0KB" in page
    assert "ConnectionError: remote unreachable" in page
    # The error is cut short in the list, whole in the tooltip.
    assert ">ConnectionError: remote unreachable " + "x" * 23 + "…</span>" in page
    assert 'title="ConnectionError: remote unreachable ' + "x" * 200 + '"' in page
    assert "done 3\xa0hours ago" in page
    assert "stuck for 10\xa0minutes" in page
    counts = response.context["status_counts"]
    by_query = {item["query"]: item["count"] for item in counts}
    assert by_query["?status__exact=queued"] == 1
    assert by_query["?status__exact=failed"] == 1
    assert by_query["?status__exact=done"] == 1
    assert by_query["?status__exact=transferring"] == 1
    assert by_query["?status__exact=held"] == 0
    assert by_query["?stuck=yes"] == 1
    assert 'id="queued-storage-status-counts"' in page


def test_newest_rows_come_first(admin_client: Client) -> None:
    rows = [pending_row() for _ in range(3)]

    response = admin_client.get(changelist_url())

    shown = [row.pk for row in response.context["cl"].result_list]
    assert shown == [row.pk for row in reversed(rows)]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"status__exact": "failed"}, {"failed", "failing-failed"}),
        ({"storage_key": "other"}, {"other"}),
        ({"stuck": "yes"}, {"stuck"}),
        ({"failing": "yes"}, {"failing-queued", "failing-failed"}),
        ({"q": "failing-"}, {"failing-queued", "failing-failed"}),
        # The name compares exactly (a binary collation on MariaDB); search not.
        ({"q": "FAILING-Q"}, {"failing-queued"}),
    ],
)
def test_filters_and_search(
    admin_client: Client, params: dict[str, str], expected: set[str]
) -> None:
    now = timezone.now()
    pending_row(name="fresh")
    pending_row(name="failed", status=Status.FAILED)
    pending_row(name="other", storage_key="other")
    pending_row(
        name="stuck",
        status=Status.TRANSFERRING,
        attempts=1,
        lease_expires_at=now - timedelta(seconds=1),
    )
    # A first attempt in progress is not failing, however many claims it took.
    pending_row(
        name="leased",
        status=Status.TRANSFERRING,
        attempts=1,
        lease_expires_at=now + timedelta(minutes=5),
    )
    pending_row(
        name="failing-queued", attempts=2, last_error="ConnectionError: timeout"
    )
    pending_row(
        name="failing-failed",
        status=Status.FAILED,
        attempts=6,
        last_error="ConnectionError: timeout",
    )
    pending_row(
        name="done-after-retries", status=Status.DONE, attempts=3, last_error=""
    )

    response = admin_client.get(changelist_url(**params))

    assert response.status_code == 200
    assert {row.name for row in response.context["cl"].result_list} == expected


def test_detail_page_is_read_only_with_history_links_and_file_facts(
    admin_client: Client,
) -> None:
    row = pending_row(
        name="docs/report.pdf",
        status=Status.QUEUED,
        attempts=2,
        size=5_000_000,
        checksum="ab" * 32,
        host="web-3",
        last_error="SizeMismatch: the remote copy has 10 bytes",
        error_history=[
            {
                "attempt": 1,
                "at": "2026-01-01T10:00:00+00:00",
                "error": "ConnectionError",
                "message": "remote unreachable",
                "text": "ConnectionError: remote unreachable",
            },
            {
                "attempt": 2,
                "at": "2026-01-01T10:01:00+00:00",
                "error": "SizeMismatch",
                "message": "the remote copy has 10 bytes",
                "text": "SizeMismatch: the remote copy has 10 bytes",
            },
        ],
    )

    response = admin_client.get(change_url(row))

    assert response.status_code == 200
    page = response.content.decode()
    assert "remote unreachable" in page
    # Times as the admin shows them (the active time zone and format), not ISO.
    assert "Jan. 1, 2026, 10:01 a.m." in page
    assert "2026-01-01T10:01:00" not in page
    assert "4.8\xa0MB (5000000 bytes)" in page
    assert "ab" * 32 in page
    assert "web-3" in page
    # Not transferred yet: the ledger says the file is local only.
    assert f'href="{file_url(row, "local")}"' in page
    assert f'href="{file_url(row, "remote")}"' not in page
    # Nothing to save, nothing to delete.
    assert 'name="_save"' not in page
    assert "deletelink" not in page


def test_a_post_to_the_detail_page_changes_nothing(admin_client: Client) -> None:
    row = pending_row(status=Status.FAILED, attempts=6)

    response = admin_client.post(
        change_url(row), {"status": "done", "attempts": "0", "_save": "Save"}
    )

    assert response.status_code == 403
    assert fresh(row).status == Status.FAILED
    assert fresh(row).attempts == 6


def test_rows_cannot_be_added_or_deleted(admin_client: Client) -> None:
    row = pending_row()

    add = admin_client.get(reverse("admin:queued_storage_pendingtransfer_add"))
    delete = admin_client.post(
        reverse("admin:queued_storage_pendingtransfer_delete", args=[row.pk]),
        {"post": "yes"},
    )
    bulk = act(admin_client, "delete_selected", [row], post="yes")

    assert add.status_code == 403
    assert delete.status_code == 403
    assert "No action selected." in messages_of(bulk)
    assert PendingTransfer.objects.filter(pk=row.pk).exists()


def test_file_links_redirect_to_the_local_and_the_remote_url(
    admin_client: Client, storage: QueuedStorage
) -> None:
    name = storage.save("docs/a b.txt", content())
    row = PendingTransfer.objects.get(storage_key=storage.key)

    local = admin_client.get(file_url(row, "local"))
    remote = admin_client.get(file_url(row, "remote"))

    assert local.status_code == 302
    assert local["Location"] == storage.local.url(name) == "/media/docs/a%20b.txt"
    assert remote.status_code == 302
    assert remote["Location"] == "https://remote.example/docs/a%20b.txt"
    assert admin_client.get(file_url(row, "elsewhere")).status_code == 404


def test_retry_now_makes_failed_and_waiting_rows_due_with_attempts_reset(
    operator: Client,
) -> None:
    later = timezone.now() + timedelta(hours=1)
    failed = pending_row(status=Status.FAILED, attempts=6, last_error="E")
    waiting = pending_row(attempts=2, next_attempt_at=later)
    done = pending_row(status=Status.DONE, attempts=1)

    response = act(operator, "retry_now", [failed, waiting, done])

    assert "2 transfers queued." in messages_of(response)
    for row in (failed, waiting):
        row = fresh(row)
        assert row.status == Status.QUEUED
        assert row.attempts == 0
        assert row.next_attempt_at is not None
        assert row.next_attempt_at <= timezone.now()
        assert row in PendingTransfer.objects.due()
    assert fresh(done).status == Status.DONE


def test_hold_parks_queued_and_failed_rows_and_nothing_else(operator: Client) -> None:
    queued = pending_row()
    failed = pending_row(status=Status.FAILED, attempts=6)
    leased = pending_row(
        status=Status.TRANSFERRING,
        lease_expires_at=timezone.now() + timedelta(minutes=5),
    )
    tombstone = pending_row(deleted=True)

    response = act(operator, "hold", [queued, failed, leased, tombstone])

    assert "2 transfers held; Retry now releases them." in messages_of(response)
    assert fresh(queued).status == Status.HELD
    assert fresh(failed).status == Status.HELD
    assert fresh(leased).status == Status.TRANSFERRING
    assert fresh(tombstone).status == Status.QUEUED
    assert not PendingTransfer.objects.due().filter(pk=queued.pk).exists()


def test_transfer_now_runs_the_engine_for_the_selected_rows(
    operator: Client,
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 60
    good = make_storage()
    flaky = make_storage(
        remote="tests.storages.FlakyStorage", remote_options={"failures": 100}
    )
    moved = good.save("a.txt", content("moved"))
    good.save("untouched.txt", content())
    stuck = flaky.save("b.txt", content())
    PendingTransfer.objects.filter(storage_key=flaky.key).update(
        status=Status.FAILED, attempts=6
    )
    selected = list(
        PendingTransfer.objects.filter(
            name_hash__in=[name_hash(moved), name_hash(stuck)]
        )
    )

    response = act(operator, "transfer_now", selected)

    shown = messages_of(response)
    assert "1 transferred; 1 to retry; 0 failed." in shown
    assert "b.txt: ConnectionError: remote unreachable" in shown
    assert Path(good.remote.path(moved)).read_bytes() == b"moved"
    assert PendingTransfer.objects.get(storage_key=good.key, name=moved).status == (
        Status.DONE
    )
    # The failed row was retried now, with fresh attempts, and waits again.
    retried = PendingTransfer.objects.get(storage_key=flaky.key)
    assert retried.status == Status.QUEUED
    assert retried.attempts == 1
    assert (
        PendingTransfer.objects.get(storage_key=good.key, name="untouched.txt").status
        == Status.QUEUED
    )


def test_transfer_now_refuses_more_rows_than_it_runs_inline(
    operator: Client, storage: QueuedStorage
) -> None:
    for i in range(21):
        storage.save(f"f{i}.txt", content())
    rows = list(PendingTransfer.objects.filter(storage_key=storage.key))

    response = act(operator, "transfer_now", rows)

    assert any("at most 20 rows" in message for message in messages_of(response))
    assert set(
        PendingTransfer.objects.filter(storage_key=storage.key).values_list(
            "status", flat=True
        )
    ) == {Status.QUEUED}
    assert remote_calls(storage, "save") == 0


def test_requeue_matching_asks_first_then_requeues_only_the_filtered_rows(
    operator: Client,
) -> None:
    mine = [
        pending_row(status=Status.FAILED, attempts=6, storage_key="mine")
        for _ in range(3)
    ]
    done = pending_row(status=Status.DONE, storage_key="mine")
    other = pending_row(status=Status.FAILED, attempts=6, storage_key="other")
    query = "?storage_key=mine"
    listing = operator.get(changelist_url(storage_key="mine"))
    assert requeue_url(query) in listing.content.decode()

    confirm = operator.get(requeue_url(query))

    assert confirm.status_code == 200
    assert confirm.context["matching"] == 4
    assert confirm.context["requeueable"] == 3
    assert "Yes, re-queue 3 transfers" in confirm.content.decode()
    assert fresh(mine[0]).status == Status.FAILED  # asking changes nothing

    response = operator.post(requeue_url(query), {"confirm": "yes"}, follow=True)

    assert "3 transfers re-queued." in messages_of(response)
    assert response.redirect_chain[-1][0] == changelist_url(storage_key="mine")
    for row in mine:
        assert fresh(row).status == Status.QUEUED
        assert fresh(row).attempts == 0
    assert fresh(done).status == Status.DONE
    assert fresh(other).status == Status.FAILED


def test_view_only_staff_sees_the_ledger_but_cannot_change_it(
    viewer: Client,
) -> None:
    failed = pending_row(status=Status.FAILED, attempts=6)
    queued = pending_row()

    listing = viewer.get(changelist_url())
    detail = viewer.get(change_url(failed))

    assert listing.status_code == 200
    assert failed.name in listing.content.decode()
    assert (
        listing.context["action_form"] is None
        or not listing.context["cl"].show_admin_actions
    )
    assert requeue_url() not in listing.content.decode()
    assert detail.status_code == 200
    # Viewing includes the file links (this row's storage is not configured here).
    opened = viewer.get(file_url(failed, "local"), follow=True)
    assert opened.redirect_chain == [(change_url(failed), 302)]
    assert messages_of(opened) == ["No storage with key factory in this process."]

    # The POSTs themselves are refused, not just the buttons hidden.
    for action in ("retry_now", "hold", "transfer_now"):
        response = act(viewer, action, [failed, queued])
        assert response.status_code == 403
    assert viewer.get(requeue_url()).status_code == 403
    assert viewer.post(requeue_url(), {"confirm": "yes"}).status_code == 403
    assert viewer.post(change_url(failed), {"status": "queued"}).status_code == 403

    assert fresh(failed).status == Status.FAILED
    assert fresh(failed).attempts == 6
    assert fresh(queued).status == Status.QUEUED


def test_staff_without_any_permission_on_the_ledger_gets_nothing(
    django_user_model: Any,
) -> None:
    client = staff_client(django_user_model)
    row = pending_row()

    assert client.get(changelist_url()).status_code == 403
    assert client.get(change_url(row)).status_code == 403
    assert client.get(file_url(row, "remote")).status_code == 403


def test_admin_pages_never_show_a_storage_credential(
    admin_client: Client, make_storage: Callable[..., QueuedStorage], settings: Any
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 0
    storage = make_storage(
        remote="tests.storages.KeyedRemote",
        remote_options={
            "secret_key": "sk-live-0123456789",
            "url": "https://admin:hunter2hunter2@remote.example/",
        },
    )
    name = storage.save("secret.txt", content())
    row = PendingTransfer.objects.get(storage_key=storage.key)
    response = act(admin_client, "transfer_now", [row])
    assert "0 transferred; 0 to retry; 1 failed." in messages_of(response)

    pages = [
        admin_client.get(changelist_url()).content.decode(),
        admin_client.get(change_url(row)).content.decode(),
        admin_client.get(requeue_url()).content.decode(),
        " ".join(messages_of(response)),
    ]

    assert name in pages[0]
    assert "PermissionError" in pages[1]
    for page in pages:
        assert "sk-live-0123456789" not in page
        assert "hunter2hunter2" not in page


class AtomicProbeStorage(FileSystemStorage):
    """Records, at each upload, whether the worker's connection is in a
    transaction."""

    in_transaction: ClassVar[list[bool]] = []

    def _save(self, name: str, content: Any) -> str:
        type(self).in_transaction.append(connection.in_atomic_block)
        return super()._save(name, content)  # type: ignore[misc, no-any-return]


@pytest.mark.django_db(transaction=True)
def test_transfer_now_commits_as_it_goes_under_atomic_requests(
    operator: Client,
    make_storage: Callable[..., QueuedStorage],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    AtomicProbeStorage.in_transaction.clear()
    storage = make_storage(
        remote="tests.test_admin.AtomicProbeStorage",
        remote_options={"location": str(tmp_path / "probe")},
    )
    storage.save("a.txt", content())
    row = PendingTransfer.objects.get(storage_key=storage.key)

    response = act(operator, "transfer_now", [row])

    assert "1 transferred; 0 to retry; 0 failed." in messages_of(response)
    # The claim was committed before the upload started: no request-wide
    # transaction that could roll it back after the remote object exists.
    assert AtomicProbeStorage.in_transaction == [False]


# The changelist of a big ledger: a bounded number of queries.

BIG_LEDGER = 100_000
#: MariaDB takes ~15 s to load 100,000 rows through PyMySQL and ~2 s a page to
#: count them inside the test's transaction; the query count is pinned all the same.
BIG_LEDGER_MARIADB = 25_000


def insert_rows(rows: list[dict[str, Any]]) -> None:
    """INSERT ``rows`` (plain str/int column values, the same columns in each; the
    other columns get the model's defaults) the fastest way each database has:
    bulk_create spends tens of seconds preparing 100,000 model instances."""
    fields = [
        field
        for field in PendingTransfer._meta.concrete_fields
        if not field.primary_key
    ]
    defaults = PendingTransfer(next_attempt_at=timezone.now())
    given = list(rows[0])
    constant = [field for field in fields if field.attname not in given]
    prepared = [
        field.get_db_prep_save(getattr(defaults, field.attname), connection)
        for field in constant
    ]
    table = connection.ops.quote_name(PendingTransfer._meta.db_table)
    columns = ", ".join(
        connection.ops.quote_name(column_of(PendingTransfer._meta.get_field(name)))
        for name in given
    )
    constant_columns = ", ".join(
        connection.ops.quote_name(column_of(field)) for field in constant
    )
    connection.ensure_connection()
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # Django's psycopg cursors bind parameters on the client, tens of
            # seconds for 100,000 rows; COPY on the same connection (and
            # transaction) takes a second.
            with cursor.cursor.copy(
                f"COPY {table} ({columns}, {constant_columns}) FROM STDIN"
            ) as copy:
                for row in rows:
                    copy.write_row([*row.values(), *prepared])
            return
        # SQLite runs executemany in C; PyMySQL turns it into multi-row INSERTs.
        placeholders = ", ".join(["%s"] * (len(given) + len(constant)))
        params = [[*row.values(), *prepared] for row in rows]
        cursor.executemany(
            f"INSERT INTO {table} ({columns}, {constant_columns}) "
            f"VALUES ({placeholders})",
            params,
        )


@pytest.fixture
def big_ledger() -> int:
    size = BIG_LEDGER_MARIADB if connection.vendor == "mysql" else BIG_LEDGER
    statuses = [Status.QUEUED, Status.DONE, Status.DONE, Status.DONE, Status.FAILED]
    insert_rows(
        [
            {
                "storage_key": "big" if i % 2 else "bigger",
                "name": f"big/{i:06d}.bin",
                "name_hash": name_hash(f"big/{i:06d}.bin"),
                "status": statuses[i % len(statuses)],
                "attempts": i % 3,
                "last_error": "ConnectionError: reset" if i % 5 == 4 else "",
                "size": i,
            }
            for i in range(size)
        ]
    )
    assert PendingTransfer.objects.count() == size
    return size


def test_changelist_of_a_big_ledger_costs_a_fixed_number_of_queries(
    admin_client: Client,
    operator: Client,
    big_ledger: int,
    django_assert_num_queries: Any,
) -> None:
    admin_client.get(changelist_url())  # warms the session and the permissions

    # The session, the user, the paginator's count, the page's rows, the counts
    # per status and the stuck count; the storage filter lists the configured
    # storages without reading the ledger.
    for params in (
        {},
        {"status__exact": "failed"},
        {"storage_key": "big"},
        {"failing": "yes"},
        {"stuck": "yes"},
        {"q": "0999"},
        {"p": "200"},
    ):
        with django_assert_num_queries(6):
            response = admin_client.get(changelist_url(**params))
        assert response.status_code == 200, params

    # Staff who are not superusers: two more, for their permissions.
    with django_assert_num_queries(8):
        response = operator.get(changelist_url(failing="yes"))
    assert response.status_code == 200

    response = admin_client.get(changelist_url())
    assert len(response.context["cl"].result_list) == 100
    assert response.context["cl"].result_list[0].name == f"big/{big_ledger - 1:06d}.bin"
    counts = {
        item["query"]: item["count"] for item in response.context["status_counts"]
    }
    assert counts["?status__exact=done"] == big_ledger * 3 // 5
    assert counts["?status__exact=failed"] == big_ledger // 5


def test_transfer_now_skips_rows_that_are_not_due_and_says_so(
    operator: Client, storage: QueuedStorage
) -> None:
    name = storage.save("a.txt", content())
    PendingTransfer.objects.filter(storage_key=storage.key).update(status=Status.DONE)
    row = PendingTransfer.objects.get(storage_key=storage.key)

    response = act(operator, "transfer_now", [row])

    (message,) = messages_of(response)
    assert message.startswith("0 transferred; 0 to retry; 0 failed; 1 skipped")
    assert fresh(row).status == Status.DONE
    assert remote_calls(storage, "save") == 0
    assert storage.local.exists(name)


def test_requeue_matching_with_a_filter_it_cannot_apply(operator: Client) -> None:
    pending_row(status=Status.FAILED)

    response = operator.get(requeue_url("?attempts__nonsense=1"))

    assert response.status_code == 302
    assert response["Location"] == changelist_url() + "?e=1"
    assert PendingTransfer.objects.failed().count() == 1


def test_actions_are_logged_with_the_user(
    operator: Client, caplog: pytest.LogCaptureFixture
) -> None:
    rows = pending_rows(2, status=Status.FAILED)

    with caplog.at_level("INFO", logger="queued_storage"):
        act(operator, "retry_now", rows)

    assert "admin action=retry_now user=change_pendingtransfer count=2" in (
        caplog.messages
    )
