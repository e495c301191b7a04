"""Attacks on 0.8's ways of configuring a storage (see tests/test_legacy_config.py):
class attributes set by mixins or to None, positional arguments, storages that
cannot be used yet or any more, and migration files that froze deprecated ones."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import FileSystemStorage
from django.core.files.storage import storages as storages_
from django.urls import reverse

from queued_storage import backends, configuration, registry
from queued_storage.backends import QueuedStorage
from queued_storage.checks import check_storages
from queued_storage.fields import QueuedFieldFile, QueuedFileField
from queued_storage.models import PendingTransfer
from queued_storage.tasks import TransferAndDelete
from queued_storage.worker import drain
from tests.helpers import FS, S3, content, deconstructed
from tests.test_legacy_config import (
    GONE_SINCE,
    QS,
    S3BOTO,
    _now_in_settings,
    _passed,
    legacy_app,
)

COUNTING = "tests.storages.CountingStorage"
GONE = "myproject.gone.Storage"
TRANSFER_AND_DELETE = "queued_storage.tasks.TransferAndDelete"

__all__ = ["legacy_app"]  # a fixture of test_legacy_config, used here


# Class attributes: where Python finds them


class RemoteMixin:
    """0.8's attributes kept in a mixin shared by several storages."""

    remote = COUNTING
    remote_options = {"location": "/srv/mixin/remote"}
    task = TRANSFER_AND_DELETE


class StorageWithMixin(RemoteMixin, QueuedStorage):  # type: ignore[misc]
    local = FS  # type: ignore[assignment]


class StorageBeforeMixin(QueuedStorage, RemoteMixin):  # type: ignore[override]
    """The queued storage first: its own (empty) defaults win, as Python has it."""

    local = FS  # type: ignore[assignment]
    remote = FS  # type: ignore[assignment]


def test_a_mixins_class_attributes_are_the_defaults_of_the_arguments(
    forget_keys: list[str],
) -> None:
    storage = StorageWithMixin(key="mixin")
    forget_keys.append(storage.key)

    assert (storage.local_path, storage.remote_path) == (FS, COUNTING)
    assert storage.remote_options == {"location": "/srv/mixin/remote"}
    assert storage.task_path == TRANSFER_AND_DELETE
    # local, remote and task are still the built storages and hook, not the text.
    assert isinstance(storage.remote, FileSystemStorage)
    assert storage.remote.location == "/srv/mixin/remote"
    assert type(storage.task).__name__ == "TransferAndDelete"

    after = StorageBeforeMixin(key="before-mixin")
    forget_keys.append(after.key)
    assert (after.remote_path, after.remote_options) == (FS, {})
    assert after.task_path == configuration.DEFAULT_TASK


class RemoteSet(backends.QueuedFileSystemStorage):
    remote = COUNTING  # type: ignore[assignment]
    task = TRANSFER_AND_DELETE


INHERITED = {
    "local": (lambda s: s.local_path, FS),
    "remote": (lambda s: s.remote_path, COUNTING),
    "task": (lambda s: s.task_path, TRANSFER_AND_DELETE),
}


@pytest.mark.parametrize("attribute", sorted(INHERITED))
def test_a_class_attribute_set_to_none_inherits(
    attribute: str, forget_keys: list[str]
) -> None:
    """0.8's QueuedFileSystemStorage and QueuedS3BotoStorage took local and
    remote as arguments: a subclass's ``local = None`` (0.8's documented value)
    left them as they were."""
    child = type("Child", (RemoteSet,), {attribute: None})
    storage = child(key=f"none-{attribute}")
    forget_keys.append(storage.key)
    read, inherited = INHERITED[attribute]

    assert read(storage) == inherited
    assert storage.describe() == RemoteSet(key="parent").describe().replace(
        "RemoteSet", "Child"
    )


BUILT = {
    "local": (lambda s: s.local, FileSystemStorage),
    "remote": (lambda s: s.remote, FileSystemStorage),
    "task": (lambda s: s.task, TransferAndDelete),
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("attribute", sorted(BUILT))
def test_a_class_attribute_set_to_none_keeps_the_built_storage(
    attribute: str, tmp_path: pathlib.Path, forget_keys: list[str]
) -> None:
    """On an instance of such a subclass ``local``, ``remote`` and ``task`` are
    the built storages and hook, so that it saves and transfers."""
    child = type("Child", (RemoteSet,), {attribute: None})
    storage = child(
        local_options={"location": str(tmp_path / "local")},
        remote_options={"location": str(tmp_path / "remote")},
        key=f"none-built-{attribute}",
    )
    forget_keys.append(storage.key)
    read, built = BUILT[attribute]

    assert isinstance(read(storage), built)
    name = storage.save("report.txt", content("q4"))
    drain()
    assert storage.using_remote(name)
    assert (tmp_path / "remote" / name).read_text() == "q4"


class Delayed(RemoteSet):
    """A subclass of a subclass that changes one attribute."""

    delayed = True


class ConfiguredInInit(RemoteSet):
    """A 0.8 subclass that sets an argument in ``__init__``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("remote_options", {"location": "/srv/init/remote"})
        super().__init__(*args, **kwargs)


class S3BotoSubclass(QueuedStorage):
    local = FS  # type: ignore[assignment]
    remote = S3BOTO  # type: ignore[assignment]


def test_subclasses_of_subclasses_inherit_what_they_do_not_set(
    forget_keys: list[str],
) -> None:
    delayed = Delayed(key="delayed-child")
    configured = ConfiguredInInit(None, None, {"location": "/srv/init/local"})
    forget_keys.extend([delayed.key, configured.key])

    assert (delayed.local_path, delayed.remote_path) == (FS, COUNTING)
    assert (delayed.task_path, delayed.delayed) == (TRANSFER_AND_DELETE, True)
    assert configured.local_options == {"location": "/srv/init/local"}
    assert configured.remote_options == {"location": "/srv/init/remote"}
    assert deconstructed(configured)[1:] == (
        (None, None, {"location": "/srv/init/local"}),
        {},
    )
    with pytest.warns(DeprecationWarning, match=S3) as warned:
        s3boto = S3BotoSubclass()
    forget_keys.append(s3boto.key)
    assert [w.filename for w in warned] == [__file__]
    assert (s3boto.remote_path, s3boto.key) == (S3, f"{FS}>{S3}")
    assert deconstructed(s3boto)[1:] == ((), {})


def test_options_changed_after_construction_change_no_storage(
    forget_keys: list[str],
) -> None:
    """Each storage has its own copy of the options it was given or inherited."""
    given = {"location": "/srv/given"}
    storage = ConfiguredInInit(None, None, given, key="given")
    other = ConfiguredInInit(key="other")
    forget_keys.extend([storage.key, other.key])

    given["location"] = "/srv/changed"
    storage.remote_options["location"] = "/srv/changed"

    assert storage.local_options == {"location": "/srv/given"}
    assert other.remote_options == {"location": "/srv/init/remote"}
    assert RemoteMixin.remote_options == {"location": "/srv/mixin/remote"}
    assert StorageWithMixin(key="mixin-again").remote_options == {
        "location": "/srv/mixin/remote"
    }
    forget_keys.append("mixin-again")


# Positional arguments as a 0.8 user passes them


POSITIONAL = [name for name in backends.__all__ if name.startswith("Queued")]


@pytest.mark.filterwarnings("ignore:QueuedS3BotoStorage is deprecated")
@pytest.mark.parametrize("class_name", sorted(set(POSITIONAL) - {"QueuedStorage"}))
def test_every_convenience_class_takes_every_argument_by_position(
    class_name: str, forget_keys: list[str]
) -> None:
    cls = getattr(backends, class_name)
    first, second = (
        (FS, COUNTING) if class_name == "QueuedFileSystemStorage" else (COUNTING, FS)
    )
    storage = cls(
        first,
        second,
        {"location": "/srv/pos/local"},
        {"location": "/srv/pos/remote"},
        "prefix",
        True,
        TRANSFER_AND_DELETE,
        f"positional-{class_name}",
    )
    forget_keys.append(storage.key)

    assert (storage.local_path, storage.remote_path) == (FS, COUNTING)
    assert storage.local_options == {"location": "/srv/pos/local"}
    assert storage.remote_options == {"location": "/srv/pos/remote"}
    assert (storage.cache_prefix, storage.delayed) == ("prefix", True)
    assert (storage.task_path, storage.key) == (TRANSFER_AND_DELETE, storage.key)
    assert storage.configuration_problems() == []
    _path, args, kwargs = storage.deconstruct()
    assert cls(*args, **kwargs).describe() == storage.describe()
    with pytest.raises(TypeError):
        cls(first, second, local=second)
    with pytest.raises(TypeError):
        cls(first, **{"remote" if second == FS else "local": first})


# Storages that cannot be used


@pytest.mark.django_db
def test_every_method_of_a_storage_that_cannot_be_used_raises_and_writes_nothing(
    tmp_path: pathlib.Path, forget_keys: list[str]
) -> None:
    storage = QueuedStorage(
        FS, GONE, local_options={"location": str(tmp_path / "local")}, key="gone"
    )
    forget_keys.append(storage.key)
    calls: dict[str, Callable[[], Any]] = {
        "save": lambda: storage.save("a.txt", content()),
        "open": lambda: storage.open("a.txt"),
        "exists": lambda: storage.exists("a.txt"),
        "url": lambda: storage.url("a.txt"),
        "base url": lambda: storage.url(""),
        "size": lambda: storage.size("a.txt"),
        "path": lambda: storage.path("a.txt"),
        "listdir": lambda: storage.listdir(""),
        "delete": lambda: storage.delete("a.txt"),
        "transfer": lambda: storage.transfer("a.txt"),
        "get_available_name": lambda: storage.get_available_name("a.txt"),
        "is_name_available": lambda: storage.is_name_available("a.txt"),
        "generate_filename": lambda: storage.generate_filename("a.txt"),
        "get_valid_name": lambda: storage.get_valid_name("a.txt"),
        "get_accessed_time": lambda: storage.get_accessed_time("a.txt"),
        "get_created_time": lambda: storage.get_created_time("a.txt"),
        "get_modified_time": lambda: storage.get_modified_time("a.txt"),
        "get_storage": lambda: storage.get_storage("a.txt"),
        "using_local": lambda: storage.using_local("a.txt"),
        "using_remote": lambda: storage.using_remote("a.txt"),
        "remote": lambda: storage.remote,
        # No model instance: the file of an unsaved form, say.
        "QueuedFieldFile.transfer": lambda: QueuedFieldFile(
            None,  # type: ignore[arg-type]
            QueuedFileField(storage=storage),
            "a.txt",
        ).transfer(),
    }
    for method, call in calls.items():
        with pytest.raises(ImproperlyConfigured, match=f"remote={GONE!r}"):
            call()
        assert not PendingTransfer.objects.filter(storage_key="gone").exists(), method
    assert list(tmp_path.rglob("*.txt")) == []


@pytest.mark.django_db
def test_a_storage_usable_once_settings_have_its_alias_recovers(
    settings: Any, tmp_path: pathlib.Path, forget_keys: list[str]
) -> None:
    """Built before ``STORAGES`` had its alias (a test's override_settings, a
    module built early), the storage works once they have it, under its key."""
    storage = QueuedStorage("later_local", "queued_remote", key=None)
    forget_keys.append(storage.key)
    assert storage.configuration_problems() != []
    with pytest.raises(ImproperlyConfigured, match="later_local"):
        storage.save("a.txt", content())

    settings.STORAGES = {
        **settings.STORAGES,
        "later_local": {"BACKEND": FS, "OPTIONS": {"location": str(tmp_path / "l")}},
    }

    assert storage.configuration_problems() == []
    name = storage.save("a.txt", content("later"))
    assert (tmp_path / "l" / name).read_bytes() == b"later"
    assert storage.key == "later_local>queued_remote"
    assert PendingTransfer.objects.filter(storage_key=storage.key).count() == 1

    with_options = QueuedStorage(
        "later_alias", "queued_remote", {"location": "/srv/x"}, key="with-options"
    )
    forget_keys.append(with_options.key)
    settings.STORAGES = {**settings.STORAGES, "later_alias": {"BACKEND": FS}}
    assert with_options.configuration_problems() == [
        "QueuedStorage local='later_alias' is a STORAGES alias; put its options in "
        "settings.STORAGES['later_alias']['OPTIONS'], not in local_options."
    ]


def test_a_storage_configuration_error_quotes_no_option(settings: Any) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "leaky": {
            "BACKEND": "queued_storage.backends.QueuedStorage",
            "OPTIONS": {
                "local": "queued_local",
                "remote": GONE,
                "remote_options": {
                    "password": "hunter2-hunter2",
                    "endpoint": "ftp://user:pw-12345@ftp.example/",
                },
            },
        },
    }

    errors = [e for e in check_storages() if e.id == "queued_storage.E001"]

    assert len(errors) == 1
    shown = f"{errors[0].msg} {errors[0].hint}"
    assert GONE in shown
    assert "hunter2-hunter2" not in shown and "pw-12345" not in shown


@pytest.mark.django_db
@pytest.mark.parametrize("argument", sorted(GONE_SINCE))
def test_a_worker_purges_the_deleted_row_of_a_storage_that_cannot_be_used(
    argument: str,
    make_storage: Callable[..., QueuedStorage],
    forget_keys: list[str],
    settings: Any,
    admin_client: Any,
) -> None:
    """The name was deleted while its storage worked; the code the worker runs
    now cannot use that storage. The error is recorded on the tombstone, the
    name stays deleted, and the purge finishes once the code is fixed. A hook
    that cannot be built stops no purge: a purge runs none."""
    before = make_storage()
    name = before.save("a.txt", content())
    assert drain(keys=[before.key]).done == 1
    remote_copy = pathlib.Path(before.remote.path(name))
    before.delete(name)  # its purge waits for a commit that never comes
    registry.forget(before.key)
    now = _now_in_settings(settings, before, **{argument: GONE_SINCE[argument]})
    forget_keys.append(now.key)

    stats = drain(keys=[now.key])

    if argument == "task":
        assert stats.purged == 1
        assert not PendingTransfer.objects.filter(storage_key=now.key).exists()
        assert not remote_copy.exists()
        return
    assert stats.retried == 1
    row = PendingTransfer.objects.get(storage_key=now.key, name=name)
    assert row.deleted
    assert row.last_error.startswith("ImproperlyConfigured: ")
    assert f"{argument}={GONE_SINCE[argument]!r}" in row.last_error
    assert remote_copy.exists()
    # The admin shows the tombstone and its error.
    for page, args in (("changelist", []), ("change", [row.pk])):
        url = reverse(f"admin:queued_storage_pendingtransfer_{page}", args=args)
        assert admin_client.get(url).status_code == 200, page

    fixed = _now_in_settings(settings, before)
    row.retry_now()
    assert drain(keys=[fixed.key]).purged == 1
    assert not remote_copy.exists()


# Migration files that froze deprecated storages


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_migrations_that_froze_deprecated_storages_migrate_with_warnings_as_errors(
    legacy_app: Callable[..., Callable[..., Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The site's code no longer uses s3boto (it followed the warning); its old
    migration files still build QueuedS3BotoStorage, the s3boto path and a
    class of a removed backend, which it cannot change. Run with warnings as errors (``pytest -W error``), the
    loading of those files warns of nothing: migrate and makemigrations work."""
    frozen = {
        "s3boto": f"{QS}.QueuedS3BotoStorage()",
        "readme": f"{QS}.QueuedStorage('{FS}', '{S3BOTO}')",
        "couchdb": f"{QS}.QueuedCouchDBStorage()",
    }
    current = {
        "couchdb": f"{QS}.QueuedStorage('queued_local', 'queued_remote', key='c')",
        "s3boto": f"{QS}.QueuedS3Storage()",
        "readme": f"{QS}.QueuedStorage('{FS}', '{S3}', key='readme')",
    }
    manage = legacy_app("legacy_site_warned", current, [frozen, current])
    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")

    migrated = _passed(manage("migrate", "legacy_site_warned"))
    unchanged = _passed(
        manage("makemigrations", "legacy_site_warned", "--check", "--dry-run")
    )
    # Code still on the deprecated name is told, as an error here.
    warned = manage("shell", "-c", f"import {QS}; {QS}.QueuedS3BotoStorage()")

    assert "Applying legacy_site_warned.0002_legacy... OK" in migrated
    assert "No changes detected" in unchanged
    assert warned.returncode != 0
    assert "DeprecationWarning: QueuedS3BotoStorage is deprecated" in warned.stderr


@pytest.mark.django_db
def test_a_storage_check_redacts_the_options_an_import_error_quotes(
    settings: Any,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    forget_keys: list[str],
) -> None:
    """A remote's module that fails to import quoting a setting (a token it
    checked at import) which the storage's options hold too: ``manage.py
    check`` shows what the first use raises, the token redacted in both."""
    token = "tok-3f9a8b7c6d5e"
    (tmp_path / "failing_remote.py").write_text(
        "from django.conf import settings\n"
        "from django.core.exceptions import ImproperlyConfigured\n"
        "raise ImproperlyConfigured(f'the service refused {settings.REMOTE_TOKEN}')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    settings.REMOTE_TOKEN = token
    settings.STORAGES = {
        **settings.STORAGES,
        "refused": {
            "BACKEND": "queued_storage.backends.QueuedStorage",
            "OPTIONS": {
                "local": "queued_local",
                "remote": "failing_remote.Storage",
                "remote_options": {"token": token},
                "key": "refused",
            },
        },
    }
    forget_keys.append("refused")

    errors = [e for e in check_storages() if e.id == "queued_storage.E001"]
    with pytest.raises(ImproperlyConfigured) as raised:
        storages_["refused"].save("a.txt", content())

    assert "the service refused [redacted]" in str(raised.value)
    assert [e.msg for e in errors] == [
        f"STORAGES['refused'] cannot be used: {raised.value}"
    ]
