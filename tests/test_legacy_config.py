"""0.8's ways of configuring a storage keep working: class attributes of a
subclass, ``remote`` first in the convenience classes, the 0.8 README's s3boto
example, and migration files that froze storages which cannot be built today."""

from __future__ import annotations

import pathlib
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import FileSystemStorage, storages
from django.urls import reverse

from queued_storage import backends, registry
from queued_storage.backends import QueuedStorage
from queued_storage.checks import check_storages
from queued_storage.models import PendingTransfer
from queued_storage.tasks import TransferAndDelete
from queued_storage.worker import drain
from tests.helpers import FS, S3, content, deconstructed, queued
from tests.s3 import S3_OPTIONS, make_bucket, s3_client
from tests.workers import run_command

Status = PendingTransfer.Status
COUNTING = "tests.storages.CountingStorage"
S3BOTO = "storages.backends.s3boto.S3BotoStorage"


class LegacySubclass(QueuedStorage):
    """A subclass as 0.8's documentation has them: configured by class
    attributes named as the constructor's arguments."""

    local = FS  # type: ignore[assignment]
    remote = COUNTING  # type: ignore[assignment]
    local_options = {"location": "/srv/legacy/local"}
    remote_options = {"location": "/srv/legacy/remote"}
    delayed = True
    task = "queued_storage.tasks.TransferAndDelete"
    cache_prefix = "legacy"


# Class attributes


@pytest.mark.django_db
def test_class_attributes_are_the_defaults_of_the_arguments(
    forget_keys: list[str],
) -> None:
    storage = LegacySubclass(key="legacy-subclass")
    forget_keys.append(storage.key)

    assert (storage.local_path, storage.remote_path) == (FS, COUNTING)
    assert storage.local_options == {"location": "/srv/legacy/local"}
    assert storage.remote_options == {"location": "/srv/legacy/remote"}
    assert storage.delayed is True
    assert storage.task_class is TransferAndDelete
    assert storage.cache_prefix == "legacy"
    # On the instance, local, remote and task are still the built storages and hook.
    assert isinstance(storage.local, FileSystemStorage)
    assert storage.local.location == "/srv/legacy/local"
    assert type(storage.remote).__name__ == "CountingStorage"
    assert isinstance(storage.task, TransferAndDelete)


ARGUMENTS: list[tuple[str, Any, Callable[[QueuedStorage], Any]]] = [
    ("local", COUNTING, lambda s: s.local_path),
    ("remote", FS, lambda s: s.remote_path),
    ("local_options", {"location": "/srv/x"}, lambda s: s.local_options),
    ("remote_options", {"location": "/srv/y"}, lambda s: s.remote_options),
    ("delayed", False, lambda s: s.delayed),
    ("task", "queued_storage.tasks.Transfer", lambda s: s.task_path),
    ("cache_prefix", "other", lambda s: s.cache_prefix),
]


@pytest.mark.parametrize(
    ("argument", "value", "read"), ARGUMENTS, ids=[a[0] for a in ARGUMENTS]
)
def test_an_argument_beats_the_class_attribute(
    argument: str,
    value: Any,
    read: Callable[[QueuedStorage], Any],
    forget_keys: list[str],
) -> None:
    defaults = LegacySubclass(key="legacy-defaults")
    storage = LegacySubclass(key="legacy-overridden", **{argument: value})
    forget_keys.extend([defaults.key, storage.key])

    assert read(storage) == value
    assert read(defaults) != value
    for other, _value, read_other in ARGUMENTS:
        if other != argument:
            assert read_other(storage) == read_other(defaults), other


@pytest.mark.django_db
def test_a_subclass_configured_by_class_attributes_holds_transfers_and_deletes(
    tmp_path: pathlib.Path,
    forget_keys: list[str],
    django_capture_on_commit_callbacks: Any,
) -> None:
    """``delayed`` holds the save, ``task`` is the hook that runs, the options
    say where the files go."""
    configured = type(
        "Configured",
        (QueuedStorage,),
        {
            "local": FS,
            "remote": FS,
            "local_options": {"location": str(tmp_path / "local")},
            "remote_options": {"location": str(tmp_path / "remote")},
            "delayed": True,
            "task": "queued_storage.tasks.TransferAndDelete",
        },
    )
    storage = configured(key="legacy-configured")
    forget_keys.append(storage.key)

    name = storage.save("a.txt", content("held"))
    assert PendingTransfer.objects.get(storage_key=storage.key).status == Status.HELD
    assert storage.transfer(name)
    with django_capture_on_commit_callbacks(execute=True):
        assert drain(keys=[storage.key]).done == 1

    assert (tmp_path / "remote" / name).read_bytes() == b"held"
    assert not (tmp_path / "local" / name).exists()  # TransferAndDelete ran


def test_a_subclass_deconstructs_as_itself_without_arguments(
    forget_keys: list[str],
) -> None:
    storage = LegacySubclass()
    forget_keys.append(storage.key)

    path, args, kwargs = deconstructed(storage)
    rebuilt = LegacySubclass(*args, **kwargs)

    assert (path, args, kwargs) == ("tests.test_legacy_config.LegacySubclass", (), {})
    assert rebuilt.describe() == storage.describe()
    assert rebuilt.key == storage.key == f"{FS}>{COUNTING}"


# The convenience classes: remote first


REMOTE_FIRST = [
    "QueuedS3Storage",
    "QueuedS3BotoStorage",
    "QueuedAzureStorage",
    "QueuedGoogleCloudStorage",
    "QueuedSFTPStorage",
    "QueuedFTPStorage",
    "QueuedDropboxStorage",
    "QueuedLibCloudStorage",
    "QueuedCouchDBStorage",
    "QueuedDatabaseStorage",
    "QueuedMogileFSStorage",
    "QueuedGridFSStorage",
    "QueuedCloudFilesStorage",
]


@pytest.mark.django_db
@pytest.mark.filterwarnings("ignore:QueuedS3BotoStorage is deprecated")
@pytest.mark.parametrize("class_name", REMOTE_FIRST)
def test_a_convenience_class_takes_remote_first_as_08_did(
    class_name: str, tmp_path: pathlib.Path, forget_keys: list[str]
) -> None:
    storage = getattr(backends, class_name)(
        COUNTING,
        local_options={"location": str(tmp_path / "local")},
        remote_options={"location": str(tmp_path / "remote")},
        key=f"remote-first-{class_name}",
    )
    forget_keys.append(storage.key)

    assert (storage.local_path, storage.remote_path) == (FS, COUNTING)
    name = storage.save("a.txt", content("remote first"))
    assert drain(keys=[storage.key]).done == 1
    assert (tmp_path / "remote" / name).read_bytes() == b"remote first"


def test_a_convenience_class_takes_local_second(forget_keys: list[str]) -> None:
    storage = backends.QueuedFTPStorage(COUNTING, FS, key="remote-then-local")
    forget_keys.append(storage.key)

    assert (storage.local_path, storage.remote_path) == (FS, COUNTING)
    other = backends.QueuedS3Storage(None, COUNTING, key="local-second")
    forget_keys.append(other.key)
    assert (other.local_path, other.remote_path) == (COUNTING, S3)


def test_queued_file_system_storage_keeps_local_first(forget_keys: list[str]) -> None:
    storage = backends.QueuedFileSystemStorage(COUNTING, FS, key="local-first")
    forget_keys.append(storage.key)

    assert (storage.local_path, storage.remote_path) == (COUNTING, FS)


# The 0.8 README's example: s3boto


@pytest.fixture
def s3_settings(s3_endpoint: str, settings: Any, tmp_media: pathlib.Path) -> str:
    """django-storages configured from settings, as a 0.8 site had it."""
    bucket = make_bucket(s3_endpoint)
    settings.AWS_ACCESS_KEY_ID = S3_OPTIONS["access_key"]
    settings.AWS_SECRET_ACCESS_KEY = S3_OPTIONS["secret_key"]
    settings.AWS_S3_REGION_NAME = S3_OPTIONS["region_name"]
    settings.AWS_S3_ADDRESSING_STYLE = S3_OPTIONS["addressing_style"]
    settings.AWS_S3_ENDPOINT_URL = s3_endpoint
    settings.AWS_STORAGE_BUCKET_NAME = bucket
    return bucket


@pytest.mark.django_db
def test_the_08_readme_example_warns_then_saves_and_transfers_to_s3(
    s3_settings: str, s3_endpoint: str, forget_keys: list[str]
) -> None:
    with pytest.warns(DeprecationWarning, match=S3) as warned:
        storage = QueuedStorage("django.core.files.storage.FileSystemStorage", S3BOTO)
    forget_keys.append(storage.key)

    # The warning points at the line above, not into the package.
    assert [w.filename for w in warned] == [__file__]
    assert storage.remote_path == S3
    # The key is made from the path that replaces s3boto: code that follows the
    # warning keeps its rows.
    assert storage.key == f"{FS}>{S3}"
    # Migrations keep the path as written: makemigrations sees no change.
    assert deconstructed(storage)[1] == (FS, S3BOTO)

    name = storage.save("photos/cat.jpg", content("meow"))
    assert drain(keys=[storage.key]).done == 1

    stored = s3_client(s3_endpoint).get_object(Bucket=s3_settings, Key=name)
    assert stored["Body"].read() == b"meow"
    assert storage.url(name).startswith(f"{s3_endpoint}/{s3_settings}/photos/cat")


def test_queued_s3_boto_storage_with_08s_remote_gets_the_same_key(
    forget_keys: list[str],
) -> None:
    with pytest.warns(DeprecationWarning) as warned:
        storage = backends.QueuedS3BotoStorage(remote=S3BOTO)
    forget_keys.append(storage.key)

    assert storage.remote_path == S3
    assert storage.key == backends.QueuedS3Storage().key == f"{FS}>{S3}"
    assert any(S3 in str(w.message) for w in warned)
    assert all(w.filename == __file__ for w in warned)


# Storages that cannot be built today fail at first use, not at construction


def _now_in_settings(
    settings: Any, before: QueuedStorage, **changed: str
) -> QueuedStorage:
    """``before``'s configuration in ``settings.STORAGES``, as the code that a
    worker runs has it now, with the arguments ``changed``."""
    options: dict[str, Any] = {
        "local": before.local_path,
        "remote": before.remote_path,
        "local_options": before.local_options,
        "remote_options": before.remote_options,
        "key": before.key,
        **changed,
    }
    settings.STORAGES = {
        **settings.STORAGES,
        "changed": {
            "BACKEND": "queued_storage.backends.QueuedStorage",
            "OPTIONS": options,
        },
    }
    storage = storages["changed"]
    assert isinstance(storage, QueuedStorage)
    return storage


GONE_SINCE = {
    "task": "myproject.celery_tasks.TransferToS3",
    "remote": "storages.backends.mosso.CloudFilesStorage",
    "local": "myproject.storage.OldLocalStorage",
}


@pytest.mark.django_db
@pytest.mark.parametrize("argument", sorted(GONE_SINCE))
def test_a_worker_records_why_the_storage_of_a_row_cannot_be_used(
    argument: str,
    make_storage: Callable[..., QueuedStorage],
    forget_keys: list[str],
    settings: Any,
) -> None:
    """The row was saved while the storage could be built; the code that the
    worker runs now names a path that cannot be imported."""
    before = make_storage()
    name = before.save("a.txt", content())
    registry.forget(before.key)
    now = _now_in_settings(settings, before, **{argument: GONE_SINCE[argument]})
    forget_keys.append(now.key)

    assert drain(keys=[now.key]).retried == 1

    row = PendingTransfer.objects.get(storage_key=now.key, name=name)
    assert row.status == Status.QUEUED
    assert row.last_error.startswith("ImproperlyConfigured: "), row.last_error
    assert f"{argument}={GONE_SINCE[argument]!r}" in row.last_error


@pytest.mark.django_db
def test_the_admin_says_the_storage_of_a_row_cannot_be_used(
    make_storage: Callable[..., QueuedStorage],
    forget_keys: list[str],
    admin_client: Any,
    settings: Any,
) -> None:
    before = make_storage()
    before.save("a.txt", content())
    registry.forget(before.key)
    now = _now_in_settings(settings, before, remote=GONE_SINCE["remote"])
    forget_keys.append(now.key)
    row = PendingTransfer.objects.get(storage_key=now.key)

    response = admin_client.get(
        reverse("admin:queued_storage_pendingtransfer_file", args=[row.pk, "remote"]),
        follow=True,
    )

    assert response.status_code == 200
    assert [str(m) for m in response.context["messages"]] == [
        "The remote storage has no URL for this file (ImproperlyConfigured)."
    ]


UNUSABLE_STORAGES = {
    "couchdb": ({"BACKEND": "queued_storage.backends.QueuedCouchDBStorage"}, "remote="),
    "mosso": (
        {
            "BACKEND": "queued_storage.backends.QueuedStorage",
            "OPTIONS": {
                "local": "queued_local",
                "remote": "storages.backends.mosso.CloudFilesStorage",
            },
        },
        "remote='storages.backends.mosso.CloudFilesStorage'",
    ),
    "celery_task": (
        {
            "BACKEND": "queued_storage.backends.QueuedStorage",
            "OPTIONS": {
                "local": "queued_local",
                "remote": "queued_remote",
                "task": "myproject.celery_tasks.TransferToS3",
                "key": "celery-task",
            },
        },
        "task='myproject.celery_tasks.TransferToS3'",
    ),
}


@pytest.mark.django_db
@pytest.mark.parametrize("alias", sorted(UNUSABLE_STORAGES))
def test_a_storages_entry_that_cannot_be_used_builds_fails_at_first_use_and_check(
    alias: str, settings: Any, forget_keys: list[str]
) -> None:
    config, named = UNUSABLE_STORAGES[alias]
    settings.STORAGES = {**settings.STORAGES, alias: config}

    storage = queued(storages[alias])
    forget_keys.append(storage.key)
    with pytest.raises(ImproperlyConfigured) as raised:
        storage.save("a.txt", content())
    errors = [e for e in check_storages() if e.id == "queued_storage.E001"]

    assert named in str(raised.value)
    assert [e.msg for e in errors] == [
        f"STORAGES[{alias!r}] cannot be used: {raised.value}"
    ]
    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()


# Migration files that froze 0.8 storages


def _app(
    root: pathlib.Path,
    label: str,
    model_fields: dict[str, str],
    migrations: list[dict[str, str]],
) -> None:
    """Write the app ``label`` under ``root``: a model ``Upload`` with a
    ``FileField`` per entry of ``model_fields`` (name -> storage expression), and
    one migration per entry of ``migrations``, the first creating the model, the
    others altering its fields, written as makemigrations writes them."""
    app = root / label
    (app / "migrations").mkdir(parents=True)
    (app / "__init__.py").write_text("")
    (app / "migrations" / "__init__.py").write_text("")
    (app / "storage.py").write_text(
        textwrap.dedent(
            """\
            from queued_storage.backends import QueuedStorage


            class LegacySubclass(QueuedStorage):
                local = "queued_local"
                remote = "queued_remote"
                delayed = True
                task = "queued_storage.tasks.TransferAndDelete"
                cache_prefix = "legacy"
            """
        )
    )
    fields = "".join(
        f"    {name} = models.FileField(storage={storage})\n"
        for name, storage in model_fields.items()
    )
    (app / "models.py").write_text(
        "from django.db import models\n\n"
        "import queued_storage.backends\n"
        f"import {label}.storage\n\n\n"
        f"class Upload(models.Model):\n{fields}"
    )
    for number, migration_fields in enumerate(migrations, start=1):
        previous = f"[({label!r}, '{number - 1:04d}_legacy')]" if number > 1 else "[]"
        if number == 1:
            columns = "".join(
                f"                ({name!r}, models.FileField(storage={storage}, "
                "upload_to='')),\n"
                for name, storage in migration_fields.items()
            )
            operations = (
                "        migrations.CreateModel(\n"
                "            name='Upload',\n"
                "            fields=[\n"
                "                ('id', models.BigAutoField(auto_created=True, "
                "primary_key=True, serialize=False, verbose_name='ID')),\n"
                f"{columns}"
                "            ],\n"
                "        ),\n"
            )
        else:
            operations = "".join(
                "        migrations.AlterField(\n"
                f"            model_name='upload', name={name!r},\n"
                f"            field=models.FileField(storage={storage}, upload_to=''),\n"
                "        ),\n"
                for name, storage in migration_fields.items()
            )
        (app / "migrations" / f"{number:04d}_legacy.py").write_text(
            "from django.db import migrations, models\n\n"
            "import queued_storage.backends\n"
            f"import {label}.storage\n\n\n"
            "class Migration(migrations.Migration):\n"
            f"    initial = {number == 1}\n"
            f"    dependencies = {previous}\n"
            f"    operations = [\n{operations}    ]\n"
        )


QS = "queued_storage.backends"
#: What 0.8's makemigrations wrote for the storages of its documentation and of
#: backends django-storages has removed since, and a Celery task that is gone.
FROZEN_08 = {
    "s3boto": f"{QS}.QueuedS3BotoStorage()",
    "readme": f"{QS}.QueuedStorage('{FS}', '{S3BOTO}')",
    "couchdb": f"{QS}.QueuedCouchDBStorage()",
    "database": f"{QS}.QueuedDatabaseStorage()",
    "mogilefs": f"{QS}.QueuedMogileFSStorage()",
    "gridfs": f"{QS}.QueuedGridFSStorage()",
    "cloudfiles": f"{QS}.QueuedCloudFilesStorage()",
    "couchdb_path": (
        f"{QS}.QueuedStorage(local='queued_local', "
        "remote='storages.backends.couchdb.CouchDBStorage')"
    ),
    "mosso_path": (
        f"{QS}.QueuedStorage(local='queued_local', "
        "remote='storages.backends.mosso.CloudFilesStorage', delayed=True)"
    ),
    "celery_task": (
        f"{QS}.QueuedStorage('{FS}', 'queued_remote', "
        "task='myproject.celery_tasks.TransferToS3')"
    ),
}
#: The storages that cannot be used today, and what their error names.
UNUSABLE = {
    "couchdb": "QueuedCouchDBStorage",
    "database": "QueuedDatabaseStorage",
    "mogilefs": "QueuedMogileFSStorage",
    "gridfs": "QueuedGridFSStorage",
    "cloudfiles": "QueuedCloudFilesStorage",
    "couchdb_path": "remote='storages.backends.couchdb.CouchDBStorage'",
    "mosso_path": "remote='storages.backends.mosso.CloudFilesStorage'",
    "celery_task": "task='myproject.celery_tasks.TransferToS3'",
}


@pytest.fixture
def legacy_app(  # type: ignore[misc]
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> Callable[..., Callable[..., Any]]:
    """Write an app with ``_app`` and return a runner of ``manage.py`` commands
    with the app installed; its tables are dropped afterwards."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    labels: list[str] = []

    def write(label: str, *args: Any) -> Callable[..., Any]:
        _app(tmp_path, label, *args)
        labels.append(label)
        installed = {"INSTALLED_APPS": [*settings.INSTALLED_APPS, label]}

        def manage(*command: str) -> Any:
            return run_command(*command, overrides=installed)

        return manage

    yield write
    for label in labels:
        installed = {"INSTALLED_APPS": [*settings.INSTALLED_APPS, label]}
        run_command("migrate", label, "zero", "--skip-checks", overrides=installed)


def _passed(result: Any) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return str(result.stdout + result.stderr)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_migrations_that_froze_08_storages_load_migrate_and_stay_quiet(
    legacy_app: Callable[..., Callable[..., Any]],
) -> None:
    """Old migration files import and run with the system checks on, once the
    models use storages that work (here the 0.8 subclass by class attributes)."""
    current = {
        name: f"{QS}.QueuedStorage('queued_local', 'queued_remote', key='legacy')"
        for name in FROZEN_08
    }
    current["subclass"] = "legacy_site_fixed.storage.LegacySubclass()"
    altered = dict(current)
    del altered["subclass"]
    created = {**FROZEN_08, "subclass": current["subclass"]}
    manage = legacy_app("legacy_site_fixed", current, [created, altered])

    migrated = _passed(manage("migrate", "legacy_site_fixed"))
    unchanged = _passed(
        manage("makemigrations", "legacy_site_fixed", "--check", "--dry-run")
    )
    checked = _passed(manage("check"))

    assert "Applying legacy_site_fixed.0002_legacy... OK" in migrated
    assert "No changes detected" in unchanged
    assert "queued_storage.E" not in checked


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_models_still_on_08_storages_load_and_fail_at_first_use_and_in_check(
    legacy_app: Callable[..., Callable[..., Any]],
) -> None:
    """The code has not been changed since 0.8: its migration imports and
    migrates, makemigrations sees no change, and each storage that cannot be
    built fails with a clear error at first use and in ``manage.py check``
    (which ``migrate`` runs first)."""
    frozen = {n: s for n, s in FROZEN_08.items() if n != "readme"}  # one S3 key
    manage = legacy_app("legacy_site_08", frozen, [frozen])

    migrated = _passed(manage("migrate", "legacy_site_08", "--skip-checks"))
    unchanged = _passed(
        manage(
            "makemigrations", "legacy_site_08", "--check", "--dry-run", "--skip-checks"
        )
    )
    checked = manage("check")
    blocked = manage("migrate")
    used = _passed(
        manage(
            "shell",
            "-c",
            textwrap.dedent(
                """\
                import io
                from django.core.files.base import ContentFile
                from django.core.management import call_command
                from django.db import transaction
                from legacy_site_08.models import Upload
                for field in Upload._meta.fields[1:]:
                    with transaction.atomic():  # rolled back: leaves no row
                        if not field.storage.configuration_problems():
                            # A new site: a save asks no remote (none runs here).
                            call_command(
                                "adopt_remote_files", "--storage",
                                field.storage.key, "--new", stdout=io.StringIO(),
                            )
                        try:
                            field.storage.save("a.txt", ContentFile(b"x"))
                        except Exception as exc:
                            print(f"{field.name}: {type(exc).__name__}: {exc}")
                        else:
                            print(f"{field.name}: saved")
                        transaction.set_rollback(True)
                """
            ),
        )
    )

    assert "Applying legacy_site_08.0001_legacy... OK" in migrated
    assert "No changes detected" in unchanged
    assert checked.returncode != 0
    assert blocked.returncode != 0
    assert "queued_storage.E001" in blocked.stderr
    outcomes = dict(
        line.split(": ", 1)
        for line in used.splitlines()
        if line.partition(": ")[0] in FROZEN_08
    )
    assert outcomes.pop("s3boto") == "saved"
    for name, named in UNUSABLE.items():
        outcome = outcomes.pop(name)
        assert outcome.startswith("ImproperlyConfigured: "), outcome
        assert named in outcome, outcome
        assert f"legacy_site_08.Upload.{name}: (queued_storage.E001)" in checked.stderr
    assert outcomes == {}
