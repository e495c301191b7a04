"""Attacks on the mirrors engine (see REDTEAM.md), each kept as a regression
test. Generations come from the clock of the host that saves, and a web host's
clock may be behind another's: a re-save's row takes the next generation after
its own then, but a mirror's copy is of the version the storage's row records
only at an equal generation, never a newer one or an older."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.files.base import ContentFile

from queued_storage.backends import QueuedStorage
from queued_storage.migration import progress
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import NEW_URL, GenerationClock, read_bytes, row_of

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status
Pair = tuple[QueuedStorage, QueuedStorage]
FS = "django.core.files.storage.FileSystemStorage"


def mirrored_then_resaved(pair: Pair, clock: GenerationClock) -> str:
    """``a.txt`` saved, done on the storage and on its serving mirror, then saved
    again (other bytes) by a host whose clock is ten seconds behind."""
    storage, mirror = pair
    name = storage.save("a.txt", ContentFile(b"first"))
    drain(keys=[storage.key])
    drain(keys=[mirror.key])
    done = row_of(mirror, name)
    assert (done.status, done.generation) == (
        Status.DONE,
        row_of(storage, name).generation,
    )
    clock.another_host(behind=10_000_000_000)
    assert storage.save(name, ContentFile(b"second!")) == name
    resaved = row_of(storage, name)
    assert resaved.status == Status.QUEUED
    # Its clock gave a smaller number; the row took the next one after its own.
    assert clock.time_ns() < done.generation < resaved.generation
    return name


def test_a_resave_on_a_host_whose_clock_is_behind_is_not_served_from_the_mirror(
    migrating: Pair, generation_clock: GenerationClock
) -> None:
    storage, _mirror = migrating
    name = mirrored_then_resaved(migrating, generation_clock)

    # save() returned: the new version is what every read gets (invariant 1),
    # not the mirror's copy of the first one.
    assert not storage.url(name).startswith(NEW_URL)
    assert read_bytes(storage, name) == b"second!"
    assert storage.size(name) == len(b"second!")


def test_a_resave_on_a_host_whose_clock_is_behind_is_not_ready_to_switch(
    migrating: Pair, generation_clock: GenerationClock
) -> None:
    storage, mirror = migrating
    mirrored_then_resaved(migrating, generation_clock)

    # Switching now would serve the first version from the new remote and lose
    # the second.
    found = progress(storage.key, mirror.key)
    assert (found.files, found.verified_files, found.ready) == (1, 0, False)
    assert found.on_its_way == 1


SPELLINGS = {
    "a trailing slash": lambda remote: {"location": remote + "/"},
    "a dot in the path": lambda remote: {"location": remote + "/../remote/."},
    "a symlink": lambda remote: {"location": _symlink_to(remote)},
}


def _symlink_to(remote: str) -> str:
    link = Path(remote).parent / "link"
    link.symlink_to(remote, target_is_directory=True)
    return str(link)


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize(
    "path", [FS, "django.core.files.storage.filesystem.FileSystemStorage"]
)
def test_a_mirror_that_is_the_remote_under_another_spelling_is_refused(
    tmp_path: Path, spelling: str, path: str
) -> None:
    remote = str(tmp_path / "remote")
    Path(remote).mkdir()
    options = SPELLINGS[spelling](remote)
    with pytest.raises(ImproperlyConfigured, match="is the remote storage itself"):
        QueuedStorage(
            local=FS,
            remote=FS,
            local_options={"location": str(tmp_path / "local")},
            remote_options={"location": remote},
            key="spelled-otherwise",
            mirrors={"same": {"storage": path, "options": options}},
        )


def test_a_mirror_that_is_the_remote_through_an_alias_is_refused(
    tmp_path: Path, settings: Any
) -> None:
    remote = str(tmp_path / "remote")
    settings.STORAGES = {
        **settings.STORAGES,
        "backup": {"BACKEND": FS, "OPTIONS": {"location": remote + "/"}},
    }
    with pytest.raises(ImproperlyConfigured, match="is the remote storage itself"):
        QueuedStorage(
            local=FS,
            remote=FS,
            local_options={"location": str(tmp_path / "local")},
            remote_options={"location": remote},
            key="through-an-alias",
            mirrors={"same": "backup"},
        )


def test_a_mirror_of_the_local_directory_by_default_is_refused(
    tmp_path: Path, settings: Any
) -> None:
    """No location is MEDIA_ROOT, for a mirror as for the local side."""
    settings.MEDIA_ROOT = str(tmp_path / "media")
    with pytest.raises(ImproperlyConfigured, match="is the local storage itself"):
        QueuedStorage(
            local=FS,
            remote=FS,
            remote_options={"location": str(tmp_path / "remote")},
            key="media-root",
            mirrors={
                "same": {"storage": FS, "options": {"location": settings.MEDIA_ROOT}}
            },
        )


def test_a_mirror_in_another_directory_is_accepted(tmp_path: Path) -> None:
    storage = QueuedStorage(
        local=FS,
        remote=FS,
        local_options={"location": str(tmp_path / "local")},
        remote_options={"location": str(tmp_path / "remote")},
        key="elsewhere",
        mirrors={
            "b": {"storage": FS, "options": {"location": str(tmp_path / "remote2/")}}
        },
    )
    assert list(storage.mirror_targets) == ["b"]
