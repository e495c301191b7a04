"""The Storage API of QueuedStorage, as an application sees it."""

from __future__ import annotations

import importlib.util
import os
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured, SuspiciousFileOperation
from django.core.files.storage import FileSystemStorage, storages
from django.db import transaction

from queued_storage import backends, registry
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.signals import file_transferred
from queued_storage.worker import drain
from tests.helpers import FS, content, drained, read_bytes, root_of, row_by_name_column

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status
MakeStorage = Callable[..., QueuedStorage]


def rows_of(storage: QueuedStorage) -> list[PendingTransfer]:
    return list(PendingTransfer.objects.filter(storage_key=storage.key))


# Saving


def test_save_writes_locally_and_returns_the_local_name(
    storage: QueuedStorage,
) -> None:
    name = storage.save("docs/report.txt", content("first"))

    assert name == "docs/report.txt"
    assert read_bytes(storage.local, name) == b"first"
    assert not storage.remote.exists(name)
    row = row_by_name_column(storage, name)
    assert row.status == Status.QUEUED
    assert row.size == len(b"first")


def test_save_with_delayed_writes_a_held_row(make_storage: MakeStorage) -> None:
    storage = make_storage(delayed=True)

    name = storage.save("a.txt", content())

    assert row_by_name_column(storage, name).status == Status.HELD
    drained(storage)
    assert row_by_name_column(storage, name).status == Status.HELD
    assert not storage.remote.exists(name)


def test_save_writes_its_row_in_the_callers_transaction(
    storage: QueuedStorage,
) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        storage.save("a.txt", content())
        assert row_by_name_column(storage, "a.txt").status == Status.QUEUED
        raise RuntimeError("the caller's transaction fails")

    assert rows_of(storage) == []


def test_save_open_exists_size_url_make_no_remote_call(
    make_storage: MakeStorage,
) -> None:
    storage = make_storage(remote="tests.storages.ExplodingStorage")

    name = storage.save("a.txt", content("local bytes"))

    assert read_bytes(storage, name) == b"local bytes"
    assert storage.exists(name)
    assert storage.size(name) == len(b"local bytes")
    assert storage.url(name) == "/media/a.txt"
    assert row_by_name_column(storage, name).status == Status.QUEUED


def test_name_taken_locally_gets_an_alternative_name(storage: QueuedStorage) -> None:
    first = storage.save("a.txt", content("first"))
    second = storage.save("a.txt", content("second"))

    assert first == "a.txt"
    assert second != first
    assert second.startswith("a_") and second.endswith(".txt")
    assert read_bytes(storage, first) == b"first"
    assert read_bytes(storage, second) == b"second"


def test_name_of_a_local_file_without_a_row_gets_an_alternative_name(
    storage: QueuedStorage,
) -> None:
    storage.local.save("a.txt", content("legacy"))

    name = storage.save("a.txt", content("new"))

    assert name != "a.txt"
    assert read_bytes(storage, "a.txt") == b"legacy"


def test_name_taken_only_in_the_ledger_gets_an_alternative_name(
    storage: QueuedStorage,
) -> None:
    first = storage.save("a.txt", content("first"))
    drained(storage)
    assert row_by_name_column(storage, first).status == Status.DONE
    storage.local.delete(first)  # e.g. TransferAndDelete, or another host's disk

    second = storage.save("a.txt", content("second"))

    assert second != first
    assert read_bytes(storage, first) == b"first"
    assert read_bytes(storage, second) == b"second"
    drained(storage)
    assert read_bytes(storage.remote, first) == b"first"
    assert read_bytes(storage.remote, second) == b"second"


def test_resave_with_allow_overwrite_keeps_the_name_and_bumps_the_generation(
    make_storage: MakeStorage,
) -> None:
    storage = make_storage(local_options={"allow_overwrite": True})
    name = storage.save("a.txt", content("first"))
    drained(storage)
    before = row_by_name_column(storage, name)

    again = storage.save("a.txt", content("second version"))

    after = row_by_name_column(storage, name)
    assert again == name == "a.txt"
    assert after.pk == before.pk
    assert after.generation > before.generation
    assert after.status == Status.QUEUED
    assert after.size == len(b"second version")
    assert read_bytes(storage, name) == b"second version"
    drained(storage)
    assert read_bytes(storage.remote, name) == b"second version"
    assert storage.remote.listdir("")[1] == ["a.txt"]


# Reading: local before the drain, remote after


def test_reads_come_from_local_before_the_drain_and_from_remote_after(
    storage: QueuedStorage,
) -> None:
    name = storage.save("docs/a.txt", content("hello"))
    local_file = pathlib.Path(storage.local.path(name))
    os.utime(local_file, (1_000_000_000, 1_000_000_000))

    assert storage.url(name) == "/media/docs/a.txt"
    assert storage.path(name) == str(local_file)
    assert storage.get_modified_time(name) == storage.local.get_modified_time(name)
    assert storage.size(name) == 5
    assert storage.exists(name)
    assert read_bytes(storage, name) == b"hello"

    drained(storage)
    remote_file = pathlib.Path(storage.remote.path(name))
    os.utime(remote_file, (1_500_000_000, 1_500_000_000))
    # A stale local copy must not be what the application gets any more.
    local_file.write_bytes(b"a stale local copy")

    assert storage.url(name) == "https://remote.example/docs/a.txt"
    assert storage.path(name) == str(remote_file)
    assert storage.get_modified_time(name) == storage.remote.get_modified_time(name)
    assert storage.get_modified_time(name).timestamp() == 1_500_000_000
    assert storage.size(name) == 5
    assert read_bytes(storage, name) == b"hello"

    local_file.unlink()
    assert storage.exists(name)
    assert storage.size(name) == 5
    assert read_bytes(storage, name) == b"hello"


def test_exists_and_url_of_a_transferred_file_ask_no_remote(
    storage: QueuedStorage, django_assert_num_queries: Any
) -> None:
    name = storage.save("a.txt", content())
    drained(storage)
    remote: Any = storage.remote
    exists_calls = remote.calls("exists")

    with django_assert_num_queries(1):
        url = storage.url(name)

    assert url == "https://remote.example/a.txt"
    assert storage.exists(name)
    assert remote.calls("exists") == exists_calls


def test_a_name_without_a_row_is_served_from_local_else_remote(
    storage: QueuedStorage,
) -> None:
    storage.local.save("old/local.txt", content("on local"))
    storage.remote.save("old/remote.txt", content("on remote"))

    assert storage.using_local("old/local.txt")
    assert storage.url("old/local.txt") == "/media/old/local.txt"
    assert read_bytes(storage, "old/local.txt") == b"on local"
    assert storage.using_remote("old/remote.txt")
    assert storage.url("old/remote.txt") == "https://remote.example/old/remote.txt"
    assert read_bytes(storage, "old/remote.txt") == b"on remote"
    assert storage.size("old/local.txt") == len(b"on local")
    assert storage.size("old/remote.txt") == len(b"on remote")
    assert storage.exists("old/local.txt")
    assert storage.exists("old/remote.txt")
    assert not storage.exists("old/nowhere.txt")
    assert rows_of(storage) == []


def test_open_in_a_write_mode_raises_value_error(storage: QueuedStorage) -> None:
    name = storage.save("a.txt", content("keep me"))

    for mode in ("wb", "w", "ab", "r+b", "xb"):
        with pytest.raises(ValueError, match="save"):
            storage.open(name, mode)

    assert read_bytes(storage, name) == b"keep me"
    assert read_bytes(storage.local, name) == b"keep me"


# Deleting and listing


def test_delete_removes_local_copy_remote_copy_and_row(
    storage: QueuedStorage, django_capture_on_commit_callbacks: Any
) -> None:
    name = storage.save("a.txt", content())
    drained(storage)
    assert storage.local.exists(name)
    assert storage.remote.exists(name)

    with django_capture_on_commit_callbacks(execute=True):
        storage.delete(name)
        assert not storage.exists(name)

    assert not storage.exists(name)
    assert not storage.local.exists(name)
    assert not storage.remote.exists(name)
    assert rows_of(storage) == []


def test_delete_of_a_pending_file_removes_it_and_its_row(
    storage: QueuedStorage, django_capture_on_commit_callbacks: Any
) -> None:
    name = storage.save("a.txt", content())

    with django_capture_on_commit_callbacks(execute=True):
        storage.delete(name)

    assert not storage.exists(name)
    assert not storage.local.exists(name)
    assert rows_of(storage) == []
    drained(storage)
    assert not storage.remote.exists(name)


@pytest.mark.django_db(transaction=True)
def test_failed_cleanup_after_commit_does_not_break_the_callers_commit(
    storage: QueuedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = storage.save("a.txt", content())

    def disk_error(name: str) -> None:
        raise OSError("disk unavailable")

    with monkeypatch.context() as patch:
        patch.setattr(storage.local, "delete", disk_error)
        with transaction.atomic():
            storage.delete(name)

    assert not storage.exists(name)
    drained(storage)
    assert not storage.local.exists(name)
    assert rows_of(storage) == []


@pytest.mark.django_db(transaction=True)
def test_failing_receiver_after_transfer_does_not_break_the_callers_commit(
    storage: QueuedStorage, settings: Any
) -> None:
    settings.QUEUED_STORAGE_WORKER = "immediate"

    def broken_receiver(**kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    file_transferred.connect(broken_receiver)
    try:
        with transaction.atomic():
            name = storage.save("a.txt", content())
    finally:
        file_transferred.disconnect(broken_receiver)

    assert row_by_name_column(storage, name).status == Status.DONE
    assert read_bytes(storage.remote, name) == b"hello world"


def test_listdir_is_the_union_without_duplicates(
    make_storage: MakeStorage, django_capture_on_commit_callbacks: Any
) -> None:
    storage = make_storage(task="queued_storage.tasks.TransferAndDelete")
    storage.save("d/both.txt", content())
    storage.save("d/sub/deep.txt", content())
    with django_capture_on_commit_callbacks(execute=True):
        drained(storage)
    assert not storage.local.exists("d/both.txt")
    storage.local.save("d/both.txt", content())  # a copy on both sides
    storage.save("d/pending.txt", content())

    dirs, files = storage.listdir("d")

    assert dirs == ["sub"]
    assert files == ["both.txt", "pending.txt"]
    assert storage.listdir("")[0] == ["d"]


def test_listdir_shows_a_pending_file_next_to_a_transferred_one(
    storage: QueuedStorage,
) -> None:
    storage.save("d/done.txt", content())
    drained(storage)
    storage.save("d/pending.txt", content())

    assert storage.listdir("d") == ([], ["done.txt", "pending.txt"])


def test_listdir_hides_a_name_deleted_in_this_transaction(
    storage: QueuedStorage,
) -> None:
    storage.save("d/a.txt", content())
    storage.save("d/b.txt", content())

    storage.delete("d/a.txt")  # files go after commit, the name goes now

    assert storage.listdir("d") == ([], ["b.txt"])


# transfer()


def test_transfer_queues_a_held_file(make_storage: MakeStorage) -> None:
    storage = make_storage(delayed=True)
    name = storage.save("a.txt", content())

    assert storage.transfer(name) is True

    assert row_by_name_column(storage, name).status == Status.QUEUED
    drained(storage)
    assert row_by_name_column(storage, name).status == Status.DONE
    assert read_bytes(storage.remote, name) == b"hello world"


def test_transfer_requeues_a_failed_file_with_attempts_reset(
    make_storage: MakeStorage, settings: Any
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 0
    storage = make_storage(remote="tests.storages.FlakyStorage")
    name = storage.save("a.txt", content())
    drain(keys=[storage.key])
    failed = row_by_name_column(storage, name)
    assert failed.status == Status.FAILED
    assert failed.attempts == 1

    assert storage.transfer(name) is True

    row = row_by_name_column(storage, name)
    assert row.status == Status.QUEUED
    assert row.attempts == 0
    drained(storage)
    assert row_by_name_column(storage, name).status == Status.DONE
    assert read_bytes(storage.remote, name) == b"hello world"


def test_transfer_leaves_a_transferred_file_alone(storage: QueuedStorage) -> None:
    name = storage.save("a.txt", content())
    drained(storage)
    remote: Any = storage.remote
    saves = remote.calls("save")
    before = row_by_name_column(storage, name)

    assert storage.transfer(name) is False

    drained(storage)
    after = row_by_name_column(storage, name)
    assert after.status == Status.DONE
    assert after.generation == before.generation
    assert after.transferred_at == before.transferred_at
    assert remote.calls("save") == saves


def test_using_local_using_remote_and_get_storage_follow_the_ledger(
    storage: QueuedStorage,
) -> None:
    name = storage.save("a.txt", content())

    assert storage.using_local(name)
    assert not storage.using_remote(name)
    assert storage.get_storage(name) is storage.local

    drained(storage)

    assert storage.using_remote(name)
    assert not storage.using_local(name)
    assert storage.get_storage(name) is storage.remote


def test_get_cache_key_is_the_seeds(make_storage: MakeStorage) -> None:
    assert make_storage().get_cache_key("a b.txt") == "queued_storage_a%20b.txt"
    custom = make_storage(cache_prefix="mine")
    assert custom.cache_prefix == "mine"
    assert custom.get_cache_key("dir/x.txt") == "mine_dir/x.txt"


# Bad names


BAD_NAMES = [
    "../x",
    "docs/../../x",
    "/etc/passwd",
    "nul\x00byte.txt",
    "new\nline.txt",
    "bell\x07.txt",
    "del\x7f.txt",
    "x" * 1025,
    "d/" + "x" * 1023,
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda name: repr(name[:20]))
def test_bad_name_raises_and_changes_nothing(storage: QueuedStorage, name: str) -> None:
    with pytest.raises((SuspiciousFileOperation, ValueError)):
        storage.save(name, content())

    assert rows_of(storage) == []
    local_root = root_of(storage.local)
    assert not local_root.exists() or not any(local_root.rglob("*"))
    assert not (local_root.parent / "x").exists()


# Construction


@pytest.mark.parametrize(
    ("which", "value"),
    [
        ("local", FileSystemStorage()),
        ("remote", FileSystemStorage()),
        ("local", FileSystemStorage),
        ("remote", FileSystemStorage),
        ("local", None),
        ("remote", None),
    ],
    ids=str,
)
def test_bad_local_or_remote_is_improperly_configured_naming_the_argument(
    which: str, value: Any
) -> None:
    arguments: dict[str, Any] = {"local": FS, "remote": FS, which: value}
    with pytest.raises(ImproperlyConfigured) as raised:
        QueuedStorage(**arguments, key="never-built")

    assert which in str(raised.value)
    other = "remote" if which == "local" else "local"
    assert f"{other}=" not in str(raised.value)
    assert registry.get("never-built") is None


@pytest.mark.parametrize(
    ("which", "value"),
    [
        ("local", "no.such.module.Storage"),
        ("remote", "django.core.files.storage.NoSuchStorage"),
        ("local", "collections.OrderedDict"),
        ("remote", "django.core.files.base.ContentFile"),
        ("remote", "queued_storage.backends.QueuedStorage"),
    ],
    ids=str,
)
def test_a_path_to_no_usable_storage_fails_at_first_use_naming_the_argument(
    which: str, value: str, forget_keys: list[str]
) -> None:
    """A migration may have frozen a path that is gone since: it must import."""
    arguments: dict[str, Any] = {"local": FS, "remote": FS, which: value}
    storage = QueuedStorage(**arguments, key="unusable")
    forget_keys.append(storage.key)

    with pytest.raises(ImproperlyConfigured) as raised:
        storage.save("a.txt", content())
    with pytest.raises(ImproperlyConfigured) as built:
        getattr(storage, which)

    for error in (raised.value, built.value):
        assert f"{which}={value!r}" in str(error)
        other = "remote" if which == "local" else "local"
        assert f"{other}=" not in str(error)
    assert storage.configuration_problems() == [str(built.value)]
    assert rows_of(storage) == []


@pytest.mark.parametrize(
    "task",
    ["no.such.Transfer", "queued_storage.tasks.NoSuchTask", "collections.OrderedDict"],
)
def test_bad_task_fails_at_first_use(task: str, forget_keys: list[str]) -> None:
    storage = QueuedStorage(FS, FS, task=task, key="unusable-task")
    forget_keys.append(storage.key)

    with pytest.raises(ImproperlyConfigured, match="task"):
        storage.save("a.txt", content())
    with pytest.raises(ImproperlyConfigured, match="Transfer"):
        storage.task  # noqa: B018 - building the hook raises


@pytest.mark.parametrize("task", [dict, 42])
def test_a_task_of_the_wrong_type_is_improperly_configured(task: Any) -> None:
    with pytest.raises(ImproperlyConfigured, match="task"):
        QueuedStorage(FS, FS, task=task, key="never-built")

    assert registry.get("never-built") is None


def test_task_names_a_transfer_subclass(make_storage: MakeStorage) -> None:
    from queued_storage.tasks import TransferAndDelete

    storage = make_storage(task="queued_storage.tasks.TransferAndDelete")

    assert isinstance(storage.task, TransferAndDelete)


def test_storages_aliases_as_local_and_remote(
    fresh_storages: dict[str, pathlib.Path], forget_keys: list[str]
) -> None:
    storage = QueuedStorage("queued_local", "queued_remote", key="aliases")
    forget_keys.append(storage.key)

    name = storage.save("a.txt", content("via aliases"))

    assert (fresh_storages["local"] / name).read_bytes() == b"via aliases"
    drained(storage)
    assert (fresh_storages["remote"] / name).read_bytes() == b"via aliases"
    assert storage.url(name) == "https://remote.example/a.txt"


def test_alias_with_options_is_improperly_configured() -> None:
    with pytest.raises(ImproperlyConfigured, match="local"):
        QueuedStorage(
            "queued_local", FS, local_options={"location": "/tmp"}, key="never-built"
        )


def test_queued_storage_configured_in_settings_storages(
    settings: Any,
    fresh_storages: dict[str, pathlib.Path],
    forget_keys: list[str],
) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "queued": {
            "BACKEND": "queued_storage.backends.QueuedStorage",
            "OPTIONS": {
                "local": "queued_local",
                "remote": "queued_remote",
                "key": "from-settings",
            },
        },
    }
    forget_keys.append("from-settings")

    storage = storages["queued"]
    name = storage.save("a.txt", content("configured"))

    assert isinstance(storage, QueuedStorage)
    assert registry.get("from-settings") is storage
    assert row_by_name_column(storage, name).status == Status.QUEUED
    drained(storage)
    assert (fresh_storages["remote"] / name).read_bytes() == b"configured"
    assert storages["queued"].url(name) == "https://remote.example/a.txt"


# Convenience classes


CONVENIENCE = [
    ("QueuedS3Storage", "storages.backends.s3.S3Storage"),
    ("QueuedAzureStorage", "storages.backends.azure_storage.AzureStorage"),
    ("QueuedGoogleCloudStorage", "storages.backends.gcloud.GoogleCloudStorage"),
    ("QueuedSFTPStorage", "storages.backends.sftpstorage.SFTPStorage"),
    # django-storages' FTPStorage, made to carry any name (queued_storage.ftp).
    ("QueuedFTPStorage", "queued_storage.ftp.FTPStorage"),
    ("QueuedDropboxStorage", "storages.backends.dropbox.DropboxStorage"),
    (
        "QueuedLibCloudStorage",
        "storages.backends.apache_libcloud.LibCloudStorage",
    ),
]


@pytest.mark.parametrize(("class_name", "remote"), CONVENIENCE)
def test_convenience_class_defaults_to_a_django_storages_backend(
    class_name: str, remote: str
) -> None:
    queued_class = getattr(backends, class_name)

    assert issubclass(queued_class, backends.QueuedFileSystemStorage)
    assert queued_class.default_local == FS
    assert queued_class.default_remote == remote
    # The class must exist in the django-storages installed today, without
    # importing the vendor SDK it needs.
    module, _dot, upstream = remote.rpartition(".")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    assert f"class {upstream}(" in pathlib.Path(spec.origin).read_text()


def test_queued_file_system_storage_defaults_local(
    tmp_path: pathlib.Path, forget_keys: list[str]
) -> None:
    storage = backends.QueuedFileSystemStorage(
        remote=FS,
        local_options={"location": str(tmp_path / "l")},
        remote_options={"location": str(tmp_path / "r")},
        key="fs-convenience",
    )
    forget_keys.append(storage.key)

    name = storage.save("a.txt", content())
    drained(storage)

    assert storage.local_path == FS
    assert (tmp_path / "r" / name).read_bytes() == b"hello world"


def test_queued_s3_storage_builds_without_touching_s3(forget_keys: list[str]) -> None:
    storage = backends.QueuedS3Storage(key="s3-convenience")
    forget_keys.append(storage.key)

    assert storage.local_path == FS
    assert storage.remote_path == "storages.backends.s3.S3Storage"


def test_queued_s3_boto_storage_is_deprecated(forget_keys: list[str]) -> None:
    with pytest.warns(DeprecationWarning, match="QueuedS3Storage"):
        storage = backends.QueuedS3BotoStorage(key="s3boto-convenience")
    forget_keys.append(storage.key)

    assert isinstance(storage, backends.QueuedS3Storage)
    assert storage.remote_path == "storages.backends.s3.S3Storage"


@pytest.mark.parametrize(
    "class_name",
    [
        "QueuedCouchDBStorage",
        "QueuedDatabaseStorage",
        "QueuedMogileFSStorage",
        "QueuedGridFSStorage",
        "QueuedCloudFilesStorage",
    ],
)
def test_removed_backend_builds_and_names_its_replacement_at_first_use(
    class_name: str, forget_keys: list[str]
) -> None:
    storage = getattr(backends, class_name)(key="removed")
    forget_keys.append(storage.key)

    with pytest.raises(ImproperlyConfigured) as raised:
        storage.exists("a.txt")

    message = str(raised.value)
    assert class_name in message
    assert "QueuedStorage(" in message
    assert "remote=" in message
