"""Which storage a key stands for: the code as it is now, never a migration's
frozen arguments, and never two differently configured storages at once."""

from __future__ import annotations

import importlib
import itertools
import textwrap
import threading
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any, ClassVar

import pytest
from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import Storage, storages
from django.core.management import call_command
from django.db import connection
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.recorder import MigrationRecorder
from django.test import override_settings

from queued_storage import registry
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.tasks import Transfer
from queued_storage.worker import drain
from tests.helpers import FS, content, queued, queued_alias, saved_name
from tests.testapp.models import Document, HeldDocument

DELETE = "queued_storage.tasks.TransferAndDelete"
_packages = itertools.count()


class OldTransfer(Transfer):
    """The hook an old migration froze: it must never run."""

    calls: ClassVar[list[str]] = []

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        self.calls.append(name)
        return super().transfer(name, local, remote, **kwargs)


@pytest.fixture(autouse=True)
def no_old_transfers() -> Iterator[None]:
    OldTransfer.calls.clear()
    yield
    OldTransfer.calls.clear()


def declare(settings: Any, **aliases: dict[str, Any]) -> None:
    settings.STORAGES = {**settings.STORAGES, **aliases}


# Migrations that froze older arguments: testapp's history as a site would have
# it, the models' storages changed since. 0001 froze Document's storage under its
# key with another remote folder, task and delayed; HeldDocument's without a key
# and with TransferAndDelete, then 0002 without it (as a 0.8 site's would have,
# two storages of one default key); 0003 is the models as they are now.

HEADER = """\
import queued_storage.backends
import queued_storage.fields
from django.db import migrations, models

"""

ID = (
    "('id', models.BigAutoField(auto_created=True, primary_key=True, "
    "serialize=False, verbose_name='ID'))"
)


def old_storage(old_remote: Path) -> str:
    return (
        "queued_storage.backends.QueuedStorage('queued_local', "
        f"'{FS}', remote_options={{'location': {str(old_remote)!r}}}, "
        "delayed=True, task='tests.test_registry.OldTransfer', key='documents')"
    )


def keyless(old_local: Path, task: str | None) -> str:
    task_argument = f", task={task!r}" if task else ""
    return (
        f"queued_storage.backends.QueuedStorage('{FS}', '{FS}', "
        f"local_options={{'location': {str(old_local)!r}}}{task_argument})"
    )


CURRENT_DOCUMENT = (
    "queued_storage.backends.QueuedStorage('queued_local', 'queued_remote', "
    "key='documents')"
)
CURRENT_HELD = (
    "queued_storage.backends.QueuedStorage('queued_local', 'queued_remote', "
    "delayed=True, key='documents-held')"
)


def field(storage: str, upload_to: str) -> str:
    return (
        f"queued_storage.fields.QueuedFileField(storage={storage}, "
        f"upload_to={upload_to!r})"
    )


def alter(model: str, storage: str, upload_to: str) -> str:
    return (
        f"migrations.AlterField(model_name={model!r}, name='file', "
        f"field={field(storage, upload_to)})"
    )


def history(tmp_path: Path) -> dict[str, str]:
    old_local = tmp_path / "old-local"
    initial = f"""\
class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(name='Document', fields=[
            {ID},
            ('title', models.CharField(blank=True, max_length=100)),
            ('file', {field(old_storage(tmp_path / "old-remote"), "docs")}),
        ]),
        migrations.CreateModel(name='HeldDocument', fields=[
            {ID},
            ('file', {field(keyless(old_local, DELETE), "held")}),
        ]),
    ]
"""
    second = f"""\
class Migration(migrations.Migration):
    dependencies = [('testapp', '0001_initial')]
    operations = [{alter("helddocument", keyless(old_local, None), "held")}]
"""
    third = f"""\
class Migration(migrations.Migration):
    dependencies = [('testapp', '0002_keyless')]
    operations = [
        {alter("document", CURRENT_DOCUMENT, "docs")},
        {alter("helddocument", CURRENT_HELD, "held")},
    ]
"""
    return {
        "0001_initial": initial,
        "0002_keyless": second,
        "0003_current": third,
    }


@pytest.fixture
def old_migrations(
    tmp_path: Path, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[str]]:
    """testapp's migrations replaced by a history that froze older arguments, in a
    package of its own (imported afresh, as a process that starts would)."""
    package = f"registry_history_{next(_packages)}"
    root = tmp_path / "code"
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    migrations = history(tmp_path)
    for name, text in migrations.items():
        (root / package / f"{name}.py").write_text(HEADER + textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(root))
    settings.MIGRATION_MODULES = {"testapp": package}
    # Django imports an app's migration files in the order of a set of names,
    # which hash randomisation changes from one process to the next. Newest first
    # is the order in which the oldest arguments were built last: pinned here, so
    # that the storage a worker uses cannot depend on the order.
    for name in sorted(migrations, reverse=True):
        importlib.import_module(f"{package}.{name}")
    yield list(migrations)


def load_with_loader() -> None:
    # As migrate and makemigrations do: the files, then the historical models.
    MigrationLoader(None, ignore_no_migrations=True).project_state().apps  # noqa: B018


def load_with_migrate_plan() -> None:
    call_command("migrate", "--plan", stdout=StringIO())


def load_with_makemigrations_check() -> None:
    # The history ends at the models as they are: nothing to make.
    call_command("makemigrations", "testapp", "--check", "--dry-run", stdout=StringIO())


LOADERS = {
    "MigrationLoader": load_with_loader,
    "migrate --plan": load_with_migrate_plan,
    "makemigrations --check": load_with_makemigrations_check,
}


def transfers_with_the_current_storage(tmp_path: Path, remote: Path) -> None:
    document = Document.objects.create(title="a")
    document.file.save("a.txt", content("current"))
    name = saved_name(document.file)

    stats = drain(keys=["documents"])

    assert stats.done == 1
    assert (remote / name).read_bytes() == b"current"
    assert not (tmp_path / "old-remote").exists()
    # The current hook (Transfer, which keeps the local copy), not the frozen one.
    assert OldTransfer.calls == []
    assert queued(Document.objects.get().file.storage).local.exists(name)
    row = PendingTransfer.objects.get(storage_key="documents", name=name)
    assert row.status == PendingTransfer.Status.DONE


# Storages come from the code as it is now


@pytest.mark.django_db
@pytest.mark.parametrize("load", LOADERS.values(), ids=LOADERS.keys())
def test_a_worker_transfers_with_the_current_storage_after_loading_old_migrations(
    old_migrations: list[str],
    load: Callable[[], None],
    tmp_path: Path,
    fresh_storages: dict[str, Path],
) -> None:
    load()

    transfers_with_the_current_storage(tmp_path, fresh_storages["remote"])


@pytest.mark.django_db(transaction=True)
def test_a_worker_transfers_with_the_current_storage_after_migrate(
    old_migrations: list[str], tmp_path: Path, fresh_storages: dict[str, Path]
) -> None:
    recorder = MigrationRecorder(connection)
    applied = set(recorder.applied_migrations())
    try:
        call_command("migrate", "testapp", stdout=StringIO())
        assert ("testapp", "0003_current") in recorder.applied_migrations()

        transfers_with_the_current_storage(tmp_path, fresh_storages["remote"])
    finally:
        for migration in set(recorder.applied_migrations()) - applied:
            recorder.record_unapplied(*migration)


@pytest.mark.django_db
def test_check_reports_no_key_conflict_after_loading_old_migrations(
    old_migrations: list[str],
) -> None:
    load_with_loader()
    out = StringIO()

    call_command("check", stdout=out, stderr=out)

    assert "queued_storage.E002" not in out.getvalue()


def test_building_a_storage_registers_nothing(
    tmp_path: Path, forget_keys: list[str]
) -> None:
    forget_keys.append("built-only")

    QueuedStorage(FS, FS, local_options={"location": str(tmp_path)}, key="built-only")

    assert "built-only" not in registry.known_keys()
    assert registry.get("built-only") is None


@pytest.mark.django_db
def test_a_storage_used_only_from_code_is_found_by_the_worker_at_first_use(
    tmp_path: Path, forget_keys: list[str]
) -> None:
    forget_keys.append("from-code")
    storage = QueuedStorage(
        FS,
        FS,
        local_options={"location": str(tmp_path / "l")},
        remote_options={"location": str(tmp_path / "r")},
        key="from-code",
    )
    assert "from-code" not in registry.known_keys()

    name = storage.save("a.txt", content("code"))

    assert registry.get("from-code") is storage
    assert drain(keys=["from-code"]).done == 1
    assert (tmp_path / "r" / name).read_bytes() == b"code"


@pytest.mark.django_db
def test_settings_storages_take_precedence_over_an_identical_one_from_code(
    settings: Any, tmp_path: Path
) -> None:
    options: dict[str, Any] = {
        "local_options": {"location": str(tmp_path / "l")},
        "key": "twins",
    }
    declare(settings, twin=queued_alias(**options))
    twin = QueuedStorage(FS, FS, **options)

    twin.save("a.txt", content())  # the same storage built twice: fine

    assert registry.get("twins") is storages["twin"]
    assert registry.conflicts() == {}


def test_options_written_in_another_order_are_the_same_storage(
    settings: Any, tmp_path: Path
) -> None:
    location = str(tmp_path / "l")
    declare(
        settings,
        one=queued_alias(
            key="ordered",
            local_options={"location": location, "extra": {"a": 1, "b": [2, 3]}},
        ),
        two=queued_alias(
            key="ordered",
            local_options={"extra": {"b": [2, 3], "a": 1}, "location": location},
        ),
    )
    registry.discover()

    assert registry.conflicts() == {}
    assert registry.get("ordered") is storages["one"]


@pytest.mark.django_db
def test_a_storage_found_in_settings_is_forgotten_when_settings_change() -> None:
    passing = {**django_settings.STORAGES, "passing": queued_alias(key="passing")}
    with override_settings(STORAGES=passing):
        found = registry.get("passing")
        assert found is storages["passing"]

    assert registry.get("passing") is None
    assert "passing" not in registry.known_keys()


# Two storages never share rows silently


@pytest.mark.django_db
@pytest.mark.parametrize("use", ["save", "delete", "transfer"])
def test_storages_sharing_a_key_raise_at_first_use_naming_both_and_write_nothing(
    settings: Any, tmp_path: Path, use: str
) -> None:
    local = {"location": str(tmp_path / "local")}
    declare(
        settings,
        photos=queued_alias(local_options=local),
        thumbnails=queued_alias(local_options=local, task=DELETE),
    )
    storage = storages["photos"]

    with pytest.raises(ImproperlyConfigured) as raised:
        if use == "save":
            storage.save("a.txt", content())
        else:
            getattr(storage, use)("a.txt")

    message = str(raised.value)
    assert queued(storages["photos"]).describe() in message
    assert queued(storages["thumbnails"]).describe() in message
    assert "differ in task" in message
    assert "key=" in message
    assert str(tmp_path) not in message  # options may hold secrets
    assert not (tmp_path / "local").exists()
    assert not PendingTransfer.objects.exists()
    with pytest.raises(ImproperlyConfigured):
        storages["thumbnails"].save("a.txt", content())


@pytest.mark.django_db
def test_a_storage_from_code_that_takes_a_models_key_raises_and_the_model_saves(
    fresh_storages: dict[str, Path],
) -> None:
    other = QueuedStorage(
        "queued_local", "queued_remote", key="documents", delayed=True
    )

    with pytest.raises(ImproperlyConfigured, match="differ in delayed"):
        other.save("a.txt", content())
    assert not (fresh_storages["local"] / "a.txt").exists()
    assert not PendingTransfer.objects.exists()

    document = Document.objects.create()
    document.file.save("b.txt", content())
    assert drain(keys=["documents"]).done == 1
    assert registry.get("documents") is Document._meta.get_field("file").storage


@pytest.mark.django_db
def test_a_worker_never_runs_a_row_with_another_storages_hook(
    settings: Any, tmp_path: Path
) -> None:
    local = {"location": str(tmp_path / "local")}
    remote = {"location": str(tmp_path / "remote")}
    declare(settings, a=queued_alias(local_options=local, remote_options=remote))
    name = storages["a"].save("a.txt", content())
    # A deployment adds a storage of the same classes with another hook.
    declare(
        settings,
        b=queued_alias(
            local_options=local,
            remote_options=remote,
            task="tests.test_registry.OldTransfer",
        ),
    )

    stats = drain()

    assert stats.done == 0
    assert OldTransfer.calls == []
    assert not (tmp_path / "remote" / name).exists()
    assert (tmp_path / "local" / name).exists()
    row = PendingTransfer.objects.get(name=name)
    assert row.status != PendingTransfer.Status.DONE
    assert "shared by differently configured storages" in row.last_error
    assert "OldTransfer" in row.last_error
    assert str(tmp_path) not in row.last_error


@pytest.mark.django_db
def test_08_storages_of_the_same_classes_with_other_tasks_and_their_own_keys(
    old_migrations: list[str],
    settings: Any,
    tmp_path: Path,
    django_capture_on_commit_callbacks: Any,
) -> None:
    """The 0.8 docs' pattern (a storage and its TransferAndDelete twin), each
    with a key, in a process that loaded the migrations that froze them keyless."""
    local = {"location": str(tmp_path / "local")}
    remote = {"location": str(tmp_path / "remote")}
    both = {"local_options": local, "remote_options": remote}
    declare(
        settings,
        images=queued_alias(**both, key="images"),
        images_delete=queued_alias(**both, task=DELETE, key="images-delete"),
    )
    load_with_loader()
    call_command("check", stdout=StringIO())  # no E002

    kept = storages["images"].save("kept.txt", content("kept"))
    moved = storages["images_delete"].save("moved.txt", content("moved"))
    with django_capture_on_commit_callbacks(execute=True):
        assert drain().done == 2

    assert (tmp_path / "remote" / kept).read_bytes() == b"kept"
    assert (tmp_path / "remote" / moved).read_bytes() == b"moved"
    assert (tmp_path / "local" / kept).exists()
    assert not (tmp_path / "local" / moved).exists()  # TransferAndDelete's doing
    assert queued(HeldDocument._meta.get_field("file").storage).key == "documents-held"


# Attacks: the epoch, spellings, data migrations, secrets


class _Paused:
    """Holds a thread in ``register()`` between reading what settings declare and
    recording the storage, while the test changes settings."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.read = threading.Event()
        self.go = threading.Event()
        self.errors: list[BaseException] = []
        real = registry._discovered
        paused = self

        def discovered() -> registry.Storages:
            found = real()
            if threading.current_thread() is not threading.main_thread():
                paused.read.set()
                assert paused.go.wait(10)
            return found

        monkeypatch.setattr(registry, "_discovered", discovered)

    def run(self, action: Callable[[], Any]) -> threading.Thread:
        def target() -> None:
            try:
                action()
            except BaseException as exc:  # asserted by the test
                self.errors.append(exc)

        thread = threading.Thread(target=target)
        thread.start()
        assert self.read.wait(10)
        return thread


@pytest.mark.django_db
def test_a_storage_registering_while_settings_change_is_checked_against_the_new(
    tmp_path: Path, forget_keys: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    forget_keys.append("raced")
    local = {"location": str(tmp_path / "l")}
    storage = QueuedStorage(FS, FS, local_options=local, key="raced")
    paused = _Paused(monkeypatch)
    thread = paused.run(storage._registered)
    # A deployment's settings gain a differently configured storage of the key
    # while the first use of this one is under way.
    changed = {
        **django_settings.STORAGES,
        "raced": queued_alias(local_options=local, delayed=True, key="raced"),
    }
    with override_settings(STORAGES=changed):
        paused.go.set()
        thread.join()
        assert paused.errors == []  # it registered before the change: fine

        with pytest.raises(ImproperlyConfigured, match="differ in delayed"):
            storage.save("a.txt", content())
        assert not PendingTransfer.objects.exists()


def test_two_threads_registering_storages_of_one_key_one_raises(
    tmp_path: Path, forget_keys: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    forget_keys.append("both")
    local = {"location": str(tmp_path / "l")}
    first = QueuedStorage(FS, FS, local_options=local, key="both")
    second = QueuedStorage(FS, FS, local_options=local, key="both", delayed=True)
    paused = _Paused(monkeypatch)
    a = paused.run(first._registered)
    paused.read.clear()
    b = paused.run(second._registered)  # both read settings before either records
    paused.go.set()
    a.join()
    b.join()

    assert len(paused.errors) == 1
    assert isinstance(paused.errors[0], registry.KeyConflict)
    assert len(registry._storages_of("both")) == 1


@pytest.mark.django_db
@pytest.mark.parametrize("other", ["keys ", "Keys", "keys\u00a0"])
def test_keys_the_database_could_fold_together_stay_two_storages(
    tmp_path: Path,
    forget_keys: list[str],
    other: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    forget_keys.extend(["keys", other])
    one = QueuedStorage(
        FS,
        FS,
        local_options={"location": str(tmp_path / "l1")},
        remote_options={"location": str(tmp_path / "r1")},
        key="keys",
    )
    two = QueuedStorage(
        FS,
        FS,
        local_options={"location": str(tmp_path / "l2")},
        remote_options={"location": str(tmp_path / "r2")},
        key=other,
        task=DELETE,
    )

    one.save("a.txt", content("one"))
    two.save("a.txt", content("two"))

    assert PendingTransfer.objects.filter(storage_key="keys").count() == 1
    assert PendingTransfer.objects.filter(storage_key=other).count() == 1
    with django_capture_on_commit_callbacks(execute=True):
        assert drain(keys=["keys"]).done == 1
        assert drain(keys=[other]).done == 1
    assert (tmp_path / "r1" / "a.txt").read_bytes() == b"one"
    assert (tmp_path / "r2" / "a.txt").read_bytes() == b"two"
    assert (tmp_path / "l1" / "a.txt").exists()
    assert not (tmp_path / "l2" / "a.txt").exists()  # TransferAndDelete: its own


@pytest.mark.django_db
def test_a_conflicts_row_waits_with_backoff_and_its_error_has_no_secret(
    settings: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Zq9secretvalue"
    local = {"location": str(tmp_path / "local")}
    odd = {"location": str(tmp_path / "remote"), "zz": {"n": [f"x://u:{secret}@h"]}}
    declare(settings, a=queued_alias(local_options=local, remote_options=odd))
    name = storages["a"].save("a.txt", content())
    declare(
        settings,
        b=queued_alias(local_options=local, remote_options={**odd, "zz": secret}),
    )

    with caplog.at_level("DEBUG", logger="queued_storage"):
        assert drain().done == 0

    row = PendingTransfer.objects.get(name=name)
    assert row.status == PendingTransfer.Status.QUEUED
    assert row.attempts == 1
    assert row.next_attempt_at is not None and row.updated_at is not None
    assert row.next_attempt_at > row.updated_at
    assert "differ in remote_options" in row.last_error
    assert secret not in row.last_error
    assert secret not in caplog.text
    assert str(tmp_path) not in caplog.text


DATA_MIGRATION = f"""\
def save_through_history(apps, schema_editor):
    Document = apps.get_model('testapp', 'Document')
    storage = Document._meta.get_field('file').storage
    assert storage is not Document_now._meta.get_field('file').storage
    document = Document.objects.create(title='seeded')
    document.file.save('seed.txt', ContentFile(b'seeded'))


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(name='Document', fields=[
            {ID},
            ('title', models.CharField(blank=True, max_length=100)),
            ('file', {field(CURRENT_DOCUMENT, "docs")}),
        ]),
        migrations.CreateModel(name='HeldDocument', fields=[
            {ID},
            ('file', {field(CURRENT_HELD, "held")}),
        ]),
        migrations.RunPython(save_through_history, migrations.RunPython.noop),
    ]
"""


@pytest.mark.django_db(transaction=True)
def test_a_data_migration_saving_through_the_historical_storage_leaves_the_current(
    tmp_path: Path,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    fresh_storages: dict[str, Path],
) -> None:
    package = f"registry_data_{next(_packages)}"
    root = tmp_path / "code"
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    header = HEADER + (
        "from django.core.files.base import ContentFile\n"
        "from tests.testapp.models import Document as Document_now\n\n"
    )
    (root / package / "0001_initial.py").write_text(header + DATA_MIGRATION)
    monkeypatch.syspath_prepend(str(root))
    settings.MIGRATION_MODULES = {"testapp": package}
    recorder = MigrationRecorder(connection)
    applied = set(recorder.applied_migrations())
    try:
        call_command("migrate", "testapp", "zero", "--fake", stdout=StringIO())
        with connection.schema_editor() as editor:
            editor.delete_model(HeldDocument)
            editor.delete_model(Document)
        call_command("migrate", "testapp", stdout=StringIO())
        out = StringIO()
        call_command("check", stdout=out, stderr=out)
        assert "queued_storage.E002" not in out.getvalue()

        assert drain(keys=["documents"]).done == 1
        assert registry.get("documents") is Document._meta.get_field("file").storage
        assert (fresh_storages["remote"] / "docs" / "seed.txt").read_bytes() == (
            b"seeded"
        )
    finally:
        PendingTransfer.objects.all().delete()
        Document.objects.all().delete()
        for migration in set(recorder.applied_migrations()) - applied:
            recorder.record_unapplied(*migration)


@pytest.mark.django_db
def test_a_default_storage_never_built_yet_is_found_by_a_conflicting_first_use(
    settings: Any, tmp_path: Path, forget_keys: list[str]
) -> None:
    forget_keys.append("dflt")
    local = {"location": str(tmp_path / "l")}
    declare(settings, default=queued_alias(local_options=local, key="dflt"))
    other = QueuedStorage(FS, FS, local_options=local, key="dflt", delayed=True)

    with pytest.raises(ImproperlyConfigured, match="differ in delayed"):
        other.save("a.txt", content())

    assert not PendingTransfer.objects.exists()


@pytest.mark.django_db
def test_an_alias_whose_backend_cannot_load_its_sdk_stops_no_other_storage(
    settings: Any,
    tmp_path: Path,
    forget_keys: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """django-storages' S3, Google Cloud and libcloud modules raise
    ImproperlyConfigured, not ImportError, when their SDK is not installed: an
    alias that this process never uses must not fail every other storage."""
    forget_keys.append("sdk-less")
    package = f"registry_sdk_{next(_packages)}"
    (tmp_path / "code" / package).mkdir(parents=True)
    (tmp_path / "code" / package / "__init__.py").write_text(
        "from django.core.exceptions import ImproperlyConfigured\n"
        "raise ImproperlyConfigured('Could not load the SDK bindings.')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    declare(settings, backups={"BACKEND": f"{package}.Storage"})
    storage = QueuedStorage(
        FS,
        FS,
        local_options={"location": str(tmp_path / "l")},
        remote_options={"location": str(tmp_path / "r")},
        key="sdk-less",
    )

    name = storage.save("a.txt", content("kept"))

    assert drain(keys=["sdk-less"]).done == 1
    assert (tmp_path / "r" / name).read_bytes() == b"kept"
    out = StringIO()
    call_command("check", stdout=out, stderr=out)
    assert "queued_storage.E002" not in out.getvalue()
