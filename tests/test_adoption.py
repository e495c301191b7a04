"""Adoption (DESIGN "Adoption", invariants 2 and 4): the files a remote held before
the ledger, as 0.8's TransferAndDelete left them (on the remote only, no rows),
are never handed to a new upload; ``adopt_remote_files`` records them, after
which no save asks the remote."""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Callable
from io import StringIO
from typing import Any

import pytest
from django.core.files import File
from django.core.management import CommandError, call_command
from django.db import connection, transaction

from queued_storage import adoption, registry
from queued_storage.adoption import remote_names
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer, StorageState
from queued_storage.worker import drain
from tests.helpers import content, read_bytes, remote_calls, row_of
from tests.storages import PausingStorage, RecordingStorage, SizeFailingStorage

pytestmark = [pytest.mark.django_db, pytest.mark.not_adopted]

Make = Callable[..., QueuedStorage]
Status = PendingTransfer.Status

LEGACY = {
    "a.txt": b"old a",
    "docs/b.txt": b"old b, longer",
    "docs/deep/c.txt": b"old c",
    "docs/d.txt": b"old d!",
    "z.txt": b"old z",
}


def legacy_site(
    make_storage: Make, files: dict[str, bytes] | None = None, **kwargs: Any
) -> QueuedStorage:
    """A 0.8 site after TransferAndDelete: its files on the remote only, no rows."""
    storage = make_storage(**kwargs)
    registry.register(storage)  # declared by the site: the commands know its key
    for name, data in (LEGACY if files is None else files).items():
        path = storage.remote.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            file.write(data)
    return storage


def adopt(storage: QueuedStorage, *args: str) -> tuple[dict[str, Any], str]:
    registry.register(storage)  # declared by the site: the command knows its key
    out, err = StringIO(), StringIO()
    call_command(
        "adopt_remote_files",
        "--storage",
        storage.key,
        "--json",
        *args,
        stdout=out,
        stderr=err,
    )
    return json.loads(out.getvalue()), err.getvalue()


def ledger(storage: QueuedStorage) -> dict[str, tuple[str, bool, int | None, bool]]:
    return {
        row.name: (row.status, row.deleted, row.size, row.remote_owned)
        for row in PendingTransfer.objects.filter(storage_key=storage.key)
    }


class UnsizedFile(File):  # type: ignore[type-arg]
    """Upload content that cannot tell its size: the save path for large files."""

    @property
    def size(self) -> int:
        raise AttributeError("size")


# The 0.8 scenario: before adoption


@pytest.mark.parametrize("how", ["small", "unsized", "get_available_name"])
def test_a_remote_only_name_is_never_handed_to_a_new_upload(
    make_storage: Make, how: str
) -> None:
    storage = legacy_site(make_storage)

    if how == "get_available_name":
        assert storage.get_available_name("docs/b.txt") != "docs/b.txt"
        assert not storage.is_name_available("docs/b.txt")
        name = storage.save("docs/b.txt", content("new bytes"))
    elif how == "small":
        name = storage.save("docs/b.txt", content("new bytes"))
    else:
        name = storage.save("docs/b.txt", UnsizedFile(io.BytesIO(b"new bytes")))

    assert name != "docs/b.txt"
    assert read_bytes(storage, "docs/b.txt") == b"old b, longer"
    assert read_bytes(storage, name) == b"new bytes"
    drain()
    # The new upload went to its own name, no conflict; the old file still serves.
    assert row_of(storage, name).status == Status.DONE
    assert read_bytes(storage, name) == b"new bytes"
    assert read_bytes(storage, "docs/b.txt") == b"old b, longer"
    assert row_of(storage, "docs/b.txt").status == Status.DONE


def test_a_name_the_ledger_has_never_seen_is_asked_of_the_remote_once(
    make_storage: Make,
) -> None:
    storage = legacy_site(make_storage)
    first = storage.save("a.txt", content("one"))
    second = storage.save("a.txt", content("two"))
    assert not storage.is_name_available("a.txt")
    storage.get_available_name("a.txt")

    assert remote_calls(storage, "exists a.txt") == 1
    assert len({first, second, "a.txt"}) == 3
    # A name the remote has not: asked once, then the save's row answers.
    assert storage.save("fresh.txt", content("new")) == "fresh.txt"
    assert remote_calls(storage, "exists fresh.txt") == 1
    assert storage.save("fresh.txt", content("again")) != "fresh.txt"
    assert remote_calls(storage, "exists fresh.txt") == 1


def test_a_rolled_back_answer_is_asked_again(make_storage: Make) -> None:
    storage = legacy_site(make_storage)

    with pytest.raises(RuntimeError), transaction.atomic():
        storage.save("a.txt", content("new"))
        raise RuntimeError("the view failed")

    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()
    assert storage.save("a.txt", content("new")) != "a.txt"
    assert read_bytes(storage, "a.txt") == b"old a"


def test_a_local_storage_that_overwrites_replaces_the_remote_file_it_adopted(
    make_storage: Make,
) -> None:
    storage = legacy_site(make_storage, local_options={"allow_overwrite": True})

    assert storage.save("a.txt", content("replaced")) == "a.txt"
    drain()

    assert row_of(storage, "a.txt").status == Status.DONE
    assert read_bytes(storage.remote, "a.txt") == b"replaced"


RECORDING = "tests.storages.RecordingStorage"


def test_the_request_path_asks_the_remote_nothing_new_before_adoption(
    make_storage: Make, django_capture_on_commit_callbacks: Any
) -> None:
    storage = make_storage(remote=RECORDING)
    RecordingStorage.calls = []
    name = storage.save("queued.txt", content("local"))
    assert RecordingStorage.calls == [("exists", "queued.txt")]  # asked once
    RecordingStorage.calls = []

    assert storage.exists(name)
    assert read_bytes(storage, name) == b"local"
    storage.url(name)
    storage.size(name)
    storage.path(name)
    storage.get_modified_time(name)
    storage.get_storage(name)
    assert not storage.is_name_available(name)
    assert storage.get_available_name(name) != name
    with django_capture_on_commit_callbacks(execute=False):
        storage.delete(name)

    # get_available_name asked about the alternative name it chose, nothing else.
    assert [call for call, _name in RecordingStorage.calls] == ["exists"]
    assert RecordingStorage.calls[0][1] != name


def test_an_adopted_storage_asks_the_remote_nothing_when_it_saves(
    make_storage: Make, django_assert_num_queries: Any
) -> None:
    storage = make_storage(remote=RECORDING)
    assert adopt(storage, "--new")[0] == {
        "storage": storage.key,
        "adopted": True,
        "new": True,
    }
    RecordingStorage.calls = []
    storage.save("warm.txt", content())  # reads the adoption once, then remembers

    # The row reserved in one statement, in a savepoint of the test's transaction:
    # what a save cost before adoption existed.
    with django_assert_num_queries(3) as queries, transaction.atomic():
        storage.save("a.txt", content())
    assert "SAVEPOINT" in queries.captured_queries[0]["sql"]
    assert "INSERT" in queries.captured_queries[1]["sql"]
    storage.save("big.bin", UnsizedFile(io.BytesIO(b"x" * 10)))
    storage.get_available_name("a.txt")
    storage.is_name_available("other.txt")

    assert RecordingStorage.calls == []


# The command


def test_adopt_remote_files_records_every_remote_file_and_adopts(
    make_storage: Make,
) -> None:
    storage = legacy_site(make_storage)
    mine = storage.save("docs/mine.txt", content("mine"))
    drain()
    before = row_of(storage, mine)

    summary, err = adopt(storage, "--batch-size", "2", "--progress")

    assert summary == {
        "storage": storage.key,
        "dry_run": False,
        "adopted": True,
        "resumed_after": None,
        "scanned": 6,
        "recorded": 5,
        "existing": 1,
        "vanished": 0,
        "invalid": 0,
    }
    assert "scanned=2" in err and "scanned=4" in err  # live progress, on stderr
    rows = ledger(storage)
    for name, data in LEGACY.items():
        assert rows[name] == (Status.DONE, False, len(data), True)
        assert storage.size(name) == len(data)
    mine_now = row_of(storage, mine)
    assert (mine_now.generation, mine_now.size) == (before.generation, before.size)
    state = StorageState.objects.get(storage_key=storage.key)
    assert state.adopted_at is not None and state.adoption_cursor == ""
    assert state.adoption_counts["recorded"] == 5


def test_after_adoption_no_save_asks_the_remote(make_storage: Make) -> None:
    storage = legacy_site(make_storage)
    adopt(storage)
    asked = remote_calls(storage, "exists")

    name = storage.save("a.txt", content("new"))
    storage.save("never-seen.txt", content("new"))
    storage.is_name_available("also-never-seen.txt")

    assert remote_calls(storage, "exists") == asked
    assert name != "a.txt"
    assert read_bytes(storage, "a.txt") == b"old a"


def test_adopt_remote_files_counts_adopted_files_in_its_text_summary(
    make_storage: Make,
) -> None:
    storage = legacy_site(make_storage)
    out = StringIO()
    call_command("adopt_remote_files", "--storage", storage.key, stdout=out)
    assert "recorded=5" in out.getvalue()
    assert "is adopted" in out.getvalue()


def test_a_dry_run_counts_and_writes_nothing(make_storage: Make) -> None:
    storage = legacy_site(make_storage)
    storage.save("docs/mine.txt", content("mine"))

    summary, _err = adopt(storage, "--dry-run")

    assert (summary["dry_run"], summary["adopted"]) == (True, False)
    assert (summary["scanned"], summary["recorded"], summary["existing"]) == (5, 5, 0)
    assert list(ledger(storage)) == ["docs/mine.txt"]
    assert not StorageState.objects.filter(adopted_at__isnull=False).exists()


def test_an_interrupted_adoption_resumes_and_ends_with_the_same_rows(
    make_storage: Make, tmp_path: Any
) -> None:
    files = {f"f{i}.txt": b"x" * i for i in range(1, 8)}
    clean = legacy_site(make_storage, files)
    adopt(clean, "--batch-size", "2")
    storage = legacy_site(
        make_storage, files, remote="tests.storages.SizeFailingStorage"
    )
    # Batches f1 f2 | f3 f4 | f5 f6 | f7: the third fails half-way through.
    SizeFailingStorage.fail_on = "f6.txt"
    SizeFailingStorage.error = KeyboardInterrupt()

    with pytest.raises(CommandError) as stopped:
        adopt(storage, "--batch-size", "2")

    assert stopped.value.returncode == 1
    assert "run the same command again to resume" in str(stopped.value)
    state = StorageState.objects.get(storage_key=storage.key)
    assert (state.adopted_at, state.adoption_cursor) == (None, "f4.txt")
    assert ledger(storage)["f6.txt"] == (Status.DONE, False, None, True)
    # Not adopted yet: a save still asks the remote.
    assert storage.save("f7.txt", content()) != "f7.txt"

    summary, err = adopt(storage, "--batch-size", "2", "-v", "1")

    assert summary["resumed_after"] == "f4.txt"
    assert "resuming after 'f4.txt'" in err
    # f7 was recorded, with its size, by the save that found it on the remote.
    assert {k: summary[k] for k in ("scanned", "existing", "vanished")} == {
        "scanned": 7,
        "existing": 1,
        "vanished": 0,
    }
    assert StorageState.objects.get(storage_key=storage.key).adoption_counts == (
        StorageState.objects.get(storage_key=clean.key).adoption_counts
        | {"recorded": 6, "existing": 1}
    )
    resumed = {n: r for n, r in ledger(storage).items() if n in files}
    assert resumed == ledger(clean)


def test_a_name_with_a_row_is_never_touched(make_storage: Make) -> None:
    storage = legacy_site(make_storage)
    # Deleted before the adoption, its remote copy not purged yet: it stays deleted.
    PendingTransfer.objects.record_delete(storage.key, "docs/d.txt")
    queued = storage.save("docs/new.txt", content("queued"))

    summary, _err = adopt(storage)

    assert summary["existing"] == 1
    assert ledger(storage)["docs/d.txt"][:2] == (Status.QUEUED, True)
    assert not storage.exists("docs/d.txt")
    assert row_of(storage, queued).status == Status.QUEUED


def test_names_the_storage_cannot_read_as_listed_are_skipped(
    make_storage: Make,
) -> None:
    storage = legacy_site(make_storage, {"ok.txt": b"1", "bad\x7f.txt": b"2"})

    summary, err = adopt(storage)

    assert (summary["recorded"], summary["invalid"]) == (1, 1)
    assert "skipped 'bad\\x7f.txt'" in err
    assert list(ledger(storage)) == ["ok.txt"]


def test_new_declares_a_storage_adopted_without_listing_it(
    make_storage: Make,
) -> None:
    storage = make_storage(remote="tests.storages.ExplodingStorage")

    adopt(storage, "--new")

    assert StorageState.objects.get(storage_key=storage.key).adopted_at is not None
    assert storage.save("a.txt", content()) == "a.txt"


def test_a_remote_that_cannot_list_is_declared_new_or_not_adopted(
    make_storage: Make,
) -> None:
    storage = make_storage(remote="tests.storages.UnlistedStorage")

    with pytest.raises(CommandError) as failed:
        adopt(storage)

    assert failed.value.returncode == 1
    assert "--new" in str(failed.value)


def test_new_and_dry_run_together_are_a_usage_error(make_storage: Make) -> None:
    with pytest.raises(CommandError) as failed:
        adopt(make_storage(), "--new", "--dry-run")
    assert failed.value.returncode == 2


def test_delete_of_an_adopted_file_removes_its_remote_copy(
    make_storage: Make, django_capture_on_commit_callbacks: Any
) -> None:
    storage = legacy_site(make_storage)
    adopt(storage)

    with django_capture_on_commit_callbacks(execute=True):
        storage.delete("docs/b.txt")

    assert not storage.exists("docs/b.txt")
    assert not storage.remote.exists("docs/b.txt")
    assert not PendingTransfer.objects.filter(
        storage_key=storage.key, name="docs/b.txt"
    )


def test_the_walk_resumes_after_any_name_in_walk_order(make_storage: Make) -> None:
    storage = legacy_site(
        make_storage,
        {
            name: b"."
            for name in ["a", "b/a", "b/b/a", "b/b/z", "b/c", "b/d/x", "c", "c-d/x"]
        },
    )
    walked = list(remote_names(storage.remote))

    assert walked == ["a", "c", "b/a", "b/c", "b/b/a", "b/b/z", "b/d/x", "c-d/x"]
    for index, name in enumerate(walked):
        assert list(remote_names(storage.remote, name)) == walked[index + 1 :]


# Races with the application


@pytest.mark.django_db(transaction=True)
def test_saves_and_deletes_during_an_adoption_keep_their_rows(
    make_storage: Make, pausing: type[PausingStorage]
) -> None:
    storage = legacy_site(make_storage, remote="tests.storages.PausingStorage")
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["summary"] = adopt(storage)[0]
        finally:
            connection.close()

    adopter = threading.Thread(target=run)
    pausing.arm("listdir", thread=adopter)
    adopter.start()
    assert pausing.paused.wait(10), "the adoption never listed the remote"
    # The remote is listed; nothing recorded yet. Meanwhile the application saves
    # a new file under a listed name and deletes another listed file.
    new_name = storage.save("a.txt", content("new upload"))
    recorded = row_of(storage, "a.txt").generation
    storage.delete("z.txt")
    assert not storage.remote.exists("z.txt")
    pausing.resume.set()
    adopter.join(10)

    summary = result["summary"]
    # a.txt was recorded, with its size, by the save that found it on the remote.
    assert (summary["recorded"], summary["existing"], summary["vanished"]) == (
        len(LEGACY) - 2,
        1,
        1,
    )
    a_row = row_of(storage, "a.txt")
    assert (a_row.generation, a_row.size) == (recorded, len(LEGACY["a.txt"]))
    assert read_bytes(storage, "a.txt") == b"old a"
    assert read_bytes(storage, new_name) == b"new upload"
    assert not storage.exists("z.txt")
    assert "z.txt" not in ledger(storage)


# transfer_status


def test_transfer_status_shows_whether_each_storage_is_adopted(
    make_storage: Make,
) -> None:
    storage = legacy_site(make_storage)

    def status(*args: str) -> str:
        out = StringIO()
        call_command("transfer_status", "--storage", storage.key, *args, stdout=out)
        return out.getvalue()

    assert json.loads(status("--json"))["adoption"] == {
        storage.key: {"adopted": False, "adopted_at": None, "adoption_cursor": None}
    }
    assert f"{storage.key}: not adopted" in status()
    assert f"adopt_remote_files --storage {storage.key}" in status()

    adopt(storage)

    found = json.loads(status("--json"))["adoption"][storage.key]
    assert found["adopted"] is True and found["adopted_at"]
    assert f"{storage.key}: adopted 20" in status()


def test_a_process_remembers_an_adoption_it_has_seen(make_storage: Make) -> None:
    storage = make_storage()
    assert not adoption.is_adopted("default", storage.key)
    adopt(storage, "--new")
    assert adoption.is_adopted("default", storage.key)
    StorageState.objects.filter(storage_key=storage.key).delete()
    assert adoption.is_adopted("default", storage.key)  # never goes back


def test_storage_keys_that_differ_only_in_case_or_spaces_have_states_of_their_own(
    make_storage: Make,
) -> None:
    for key in ["media", "Media", "média", "media "]:
        StorageState.objects.create(storage_key=key)
    for key in ["media", "Media", "média", "media "]:
        assert StorageState.objects.get(storage_key=key).storage_key == key
