"""The ``mirrors`` argument: what it accepts, what it refuses (at construction,
naming the argument), what ``manage.py check`` says of a target that cannot be
used, how a migration freezes it, and the registry's view of each mirror's key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core.checks import CheckMessage
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import FileSystemStorage, storages
from django.db.migrations.writer import MigrationWriter
from django.test import override_settings

from queued_storage import registry
from queued_storage.backends import MirrorStorage, QueuedStorage
from queued_storage.checks import check_storages
from queued_storage.mirror_config import MAX_MIRRORS, mirror_key
from queued_storage.models import PendingTransfer
from tests.helpers import (
    BACKEND,
    FS,
    content,
    deconstructed,
    queued,
    queued_alias,
)

SECRET = "mirror-secret-3f9a1c"


def errors_with(check_id: str) -> list[CheckMessage]:
    return [message for message in check_storages() if message.id == check_id]


def fs_target(tmp_path: Path, folder: str = "mirror", **fields: Any) -> dict[str, Any]:
    return {"storage": FS, "options": {"location": str(tmp_path / folder)}, **fields}


def build(tmp_path: Path, mirrors: Any, key: str = "media") -> QueuedStorage:
    """A storage whose mirrors may be the ``queued_remote`` alias: its remote is
    a directory of its own (the alias writes to ``tmp_path / "remote"``)."""
    return QueuedStorage(
        FS,
        FS,
        local_options={"location": str(tmp_path / "local")},
        remote_options={"location": str(tmp_path / "primary")},
        key=key,
        mirrors=mirrors,
    )


def test_a_storage_without_mirrors_has_only_its_primary_destination(
    storage: QueuedStorage,
) -> None:
    assert storage.mirror_targets == {}
    assert storage.mirrors == {}
    assert storage.destinations == [("", storage.key, storage)]
    assert storage.serving_mirror is None


def test_mirrors_by_alias_path_and_dict_with_their_keys(
    settings: Any, tmp_path: Path
) -> None:
    storage = build(
        tmp_path,
        {
            "alias": "queued_remote",
            "path": "tests.storages.CountingStorage",
            "full": fs_target(tmp_path, key="media-new", serve=True),
        },
    )

    assert [t.key for t in storage.mirror_targets.values()] == [
        "media@alias",
        "media@path",
        "media-new",
    ]
    assert (
        storage.mirror_key("full")
        == "media-new"
        == mirror_key("m", "full", "media-new")
    )
    assert storage.serving_mirror == "full"
    names = [(name, key) for name, key, _storage in storage.destinations]
    assert names == [
        ("", "media"),
        ("alias", "media@alias"),
        ("path", "media@path"),
        ("full", "media-new"),
    ]
    full = storage.mirrors["full"]
    assert isinstance(full, MirrorStorage)
    assert full.primary is storage and full.mirror_name == "full"
    assert full.key == "media-new"
    assert isinstance(full.remote, FileSystemStorage)
    assert full.remote.location == str(tmp_path / "mirror")
    assert full.local is storage.local
    assert storage.mirrors["alias"].remote is storages["queued_remote"]
    assert full.mirrors == {}


def test_a_mirror_takes_the_primarys_arguments_but_never_held(tmp_path: Path) -> None:
    storage = QueuedStorage(
        FS,
        FS,
        local_options={"location": str(tmp_path / "local")},
        remote_options={"location": str(tmp_path / "remote")},
        key="args",
        delayed=True,
        task="queued_storage.tasks.TransferAndDelete",
        verify_checksum=True,
        overwrite_remote=True,
        local_shared=False,
        create_only_uploads=False,
        mirrors={"m": fs_target(tmp_path)},
    )
    mirror = storage.mirrors["m"]

    assert mirror.task_class is storage.task_class
    assert (mirror.verify_checksum, mirror.overwrite_remote) == (True, True)
    assert (mirror.local_shared, mirror.create_only_uploads) == (False, False)
    assert mirror.delayed is False  # its rows are queued by the primary's completion


@pytest.mark.parametrize(
    ("mirrors", "says"),
    [
        ("queued_remote", "must be a dict"),
        ({f"m{i}": FS for i in range(MAX_MIRRORS + 1)}, f"at most {MAX_MIRRORS}"),
        ({"": FS}, "a name is 1 to 64"),
        ({"a b": FS}, "a name is 1 to 64"),
        ({"x" * 65: FS}, "a name is 1 to 64"),
        ({3: FS}, "a name is 1 to 64"),
        ({"m": None}, "not NoneType"),
        ({"m": FileSystemStorage}, "not type"),
        ({"m": {"options": {}}}, "names nothing"),
        ({"m": {"storage": FileSystemStorage}}, "names a class"),
        ({"m": {"storage": FS, "colour": "blue"}}, "unknown field(s) colour"),
        ({"m": {"storage": FS, "options": "x"}}, "options must be a dict"),
        ({"m": {"storage": FS, "key": ""}}, "key must be a non-empty string"),
        ({"m": {"storage": FS, "key": 5}}, "key must be a non-empty string"),
        ({"m": {"storage": FS, "key": "k" * 256}}, "longer than 255"),
        ({"m": {"storage": FS, "key": "media"}}, "of the storage itself"),
        (
            {"a": {"storage": FS, "key": "k"}, "b": {"storage": FS, "key": "k"}},
            "key 'k' of mirror 'a'",
        ),
        ({"m": {"storage": FS, "serve": "yes"}}, "serve must be True or False"),
        (
            {"m": "queued_remote", "n": "queued_remote"},
            "mirror 'n' is mirror 'm' itself",
        ),
        (
            {
                "a": {"storage": FS, "serve": True},
                "b": {"storage": "queued_remote", "serve": True},
            },
            "at most one may",
        ),
        (
            {"m": {"storage": "queued_remote", "options": {"location": "/x"}}},
            "is a STORAGES alias",
        ),
    ],
)
def test_a_bad_mirrors_argument_is_refused_at_construction_naming_it(
    tmp_path: Path, mirrors: Any, says: str
) -> None:
    with pytest.raises(ImproperlyConfigured) as raised:
        build(tmp_path, mirrors)

    assert "mirrors" in str(raised.value)
    assert says in str(raised.value)


@pytest.mark.parametrize("which", ["local", "remote"])
def test_a_mirror_that_is_the_storages_own_local_or_remote_is_refused(
    tmp_path: Path, which: str
) -> None:
    folder = {"local": "local", "remote": "primary"}[which]
    options = {"location": str(tmp_path / folder)}

    with pytest.raises(ImproperlyConfigured, match=f"is the {which} storage itself"):
        build(tmp_path, {"m": {"storage": FS, "options": options}})


def test_a_default_key_too_long_with_the_mirrors_name_is_refused(
    tmp_path: Path,
) -> None:
    with pytest.raises(ImproperlyConfigured, match="give it a shorter key"):
        build(tmp_path, {"backup": FS}, key="k" * 250)


@pytest.mark.django_db
def test_a_target_that_cannot_be_imported_builds_fails_first_use_and_check(
    settings: Any, tmp_path: Path
) -> None:
    options = {"key": "unusable", "mirrors": {"m": "no.such.Storage"}}
    settings.STORAGES = {**settings.STORAGES, "broken": queued_alias(**options)}
    storage = queued(storages["broken"])  # builds: old migrations import

    with pytest.raises(ImproperlyConfigured, match=r"mirrors\['m'\] storage 'no.such"):
        storage.save("a.txt", content())

    assert not PendingTransfer.objects.exists()
    (error,) = errors_with("queued_storage.E001")
    assert "mirrors['m']" in error.msg


def test_a_target_that_is_a_queued_storage_is_reported(settings: Any) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "nested": queued_alias(key="nested", mirrors={"m": BACKEND}),
    }

    (error,) = errors_with("queued_storage.E001")

    assert "is itself a QueuedStorage" in error.msg


@pytest.mark.django_db
def test_a_target_alias_declared_after_the_storage_was_built_is_used(
    tmp_path: Path, forget_keys: list[str]
) -> None:
    forget_keys.append("late")
    storage = build(tmp_path, {"m": "late_alias"}, key="late")
    assert storage.configuration_problems()
    late = {"BACKEND": FS, "OPTIONS": {"location": str(tmp_path / "late")}}

    with override_settings(STORAGES={**storages.backends, "late_alias": late}):
        assert storage.configuration_problems() == []
        storage.save("a.txt", content())
        assert storage.mirrors["m"].remote is storages["late_alias"]


def test_an_08_style_class_attribute_sets_the_default(tmp_path: Path) -> None:
    class Mirrored(QueuedStorage):
        local = FS  # type: ignore[assignment]
        remote = FS  # type: ignore[assignment]
        mirrors = {"backup": fs_target(tmp_path)}  # type: ignore[dict-item]

    storage = Mirrored(local_options={"location": str(tmp_path / "l")}, key="cls")
    overridden = Mirrored(key="cls2", mirrors={})

    assert list(storage.mirror_targets) == ["backup"]
    assert isinstance(storage.mirrors["backup"], MirrorStorage)
    assert overridden.mirrors == {}


def test_deconstruct_freezes_the_mirrors_for_makemigrations(tmp_path: Path) -> None:
    mirrors = {"backup": fs_target(tmp_path, key="media-b", serve=True)}
    storage = build(tmp_path, mirrors)

    _path, _args, kwargs = deconstructed(storage)

    assert kwargs["mirrors"] == mirrors
    text, _imports = MigrationWriter.serialize(storage)
    assert "mirrors=" in text and "'serve': True" in text


# The registry


@pytest.mark.django_db
def test_a_mirror_key_stands_for_its_mirror_after_the_primarys_first_use(
    tmp_path: Path, forget_keys: list[str]
) -> None:
    forget_keys.append("media")
    storage = build(tmp_path, {"backup": fs_target(tmp_path)})
    assert registry.get("media@backup") is None

    storage.save("a.txt", content())

    assert registry.get("media@backup") is storage.mirrors["backup"]
    assert "media@backup" in registry.known_keys()


def test_a_mirror_of_a_storage_in_settings_is_found_without_use(
    settings: Any, tmp_path: Path
) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "mirrored": queued_alias(key="declared", mirrors={"b": fs_target(tmp_path)}),
    }
    registry.discover()

    mirror = registry.get("declared@b")

    assert isinstance(mirror, MirrorStorage)
    assert mirror.primary is storages["mirrored"]


@pytest.mark.django_db
def test_a_mirror_key_that_is_another_storages_key_conflicts_and_writes_nothing(
    settings: Any, tmp_path: Path
) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "other": queued_alias(key="taken", local_options={"location": str(tmp_path)}),
    }
    storage = build(tmp_path, {"b": fs_target(tmp_path, key="taken")}, key="mine")

    with pytest.raises(registry.KeyConflict) as raised:
        storage.save("a.txt", content())

    assert "'taken'" in str(raised.value) and "MirrorStorage('b' of 'mine'" in str(
        raised.value
    )
    assert not PendingTransfer.objects.exists()
    assert not (tmp_path / "local").exists()
    registry.forget("mine")


def test_storages_of_one_key_with_other_mirrors_conflict(
    settings: Any, tmp_path: Path
) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "one": queued_alias(key="same", mirrors={"b": fs_target(tmp_path)}),
        "two": queued_alias(key="same", mirrors={"b": fs_target(tmp_path, "other")}),
    }
    registry.discover()

    conflicts = registry.conflicts()

    assert set(conflicts) == {"same", "same@b"}
    problem, _fix = registry.conflict_text("same", conflicts["same"])
    assert "differ in mirrors" in problem
    assert [e.id for e in errors_with("queued_storage.E002")] == [
        "queued_storage.E002"
    ] * 2


def test_two_primaries_never_share_a_mirror_key(settings: Any, tmp_path: Path) -> None:
    target = fs_target(tmp_path, key="shared")
    settings.STORAGES = {
        **settings.STORAGES,
        "one": queued_alias(key="one", mirrors={"b": target}),
        "two": queued_alias(key="two", mirrors={"b": target}),
    }
    registry.discover()

    problem, _fix = registry.conflict_text("shared", registry.conflicts()["shared"])

    assert "differ in mirror_of" in problem


@pytest.mark.parametrize("method", ["save", "delete", "transfer"])
def test_a_mirror_refuses_writes_of_its_own(tmp_path: Path, method: str) -> None:
    mirror = build(tmp_path, {"b": fs_target(tmp_path)}).mirrors["b"]

    with pytest.raises(ImproperlyConfigured, match="through that one"):
        getattr(mirror, method)("a.txt", *([content()] if method == "save" else []))


def test_a_mirrors_options_are_redacted_in_the_primarys_errors(tmp_path: Path) -> None:
    storage = build(
        tmp_path,
        {"b": {"storage": FS, "options": {"location": str(tmp_path), "t": SECRET}}},
    )

    text = storage.redact(f"client failed with token {SECRET}")

    assert SECRET not in text
    assert SECRET not in storage.describe()
