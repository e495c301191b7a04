"""One file, one spelling: every entry point reads a name the same way, and a
spelling of another file's name never reaches that file's row or copies."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import SuspiciousFileOperation
from django.core.management import call_command
from django.core.management.base import CommandError

from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import content, read_bytes, root_of

pytestmark = pytest.mark.django_db

NAME = "docs/caf\u00e9.txt"
DATA = b"the file itself"

#: Spellings that are not a name (empty, "." or ".." components, absolute): each
#: entry point refuses them, whatever file they seem to point at.
NOT_NAMES = [
    "./docs/caf\u00e9.txt",
    "docs/./caf\u00e9.txt",
    "a/../docs/caf\u00e9.txt",
    "docs/x/../caf\u00e9.txt",
    "docs/caf\u00e9.txt/",
    "docs//caf\u00e9.txt",
    "/docs/caf\u00e9.txt",
    "docs/caf\u00e9.txt/.",
    ".\\docs\\caf\u00e9.txt",
    "docs\\\\caf\u00e9.txt",
]
#: Other spellings of NAME itself (``\`` as ``/``, Unicode NFD): they act on it.
SAME_NAME = ["docs\\caf\u00e9.txt", unicodedata.normalize("NFD", NAME)]


def _read(storage: QueuedStorage, name: str) -> Any:
    return read_bytes(storage, name)


#: Every entry point that takes a file name, called as an application calls it.
ENTRY_POINTS: dict[str, Callable[[QueuedStorage, str], Any]] = {
    "save": lambda storage, name: storage.save(name, content("another file")),
    "delete": QueuedStorage.delete,
    "transfer": QueuedStorage.transfer,
    "exists": QueuedStorage.exists,
    "open": _read,
    "size": QueuedStorage.size,
    "url": QueuedStorage.url,
    "path": QueuedStorage.path,
    "get_accessed_time": QueuedStorage.get_accessed_time,
    "get_created_time": QueuedStorage.get_created_time,
    "get_modified_time": QueuedStorage.get_modified_time,
    "get_storage": QueuedStorage.get_storage,
    "using_local": QueuedStorage.using_local,
    "using_remote": QueuedStorage.using_remote,
    "get_available_name": QueuedStorage.get_available_name,
    "is_name_available": QueuedStorage.is_name_available,
}


@pytest.fixture
def transferred(storage: QueuedStorage) -> QueuedStorage:
    """``storage`` with NAME saved and transferred: a done row, both copies."""
    from django.core.files.base import ContentFile

    assert storage.save(NAME, ContentFile(DATA)) == NAME
    stats = drain(keys=[storage.key])
    assert stats.failed == stats.retried == 0
    assert_untouched(storage)
    return storage


def copies(storage: QueuedStorage) -> dict[str, bytes | None]:
    """What each side holds at NAME, read from disk."""
    found: dict[str, bytes | None] = {}
    for side in ("local", "remote"):
        path = Path(getattr(storage, side).location) / NAME
        found[side] = path.read_bytes() if path.is_file() else None
    return found


def assert_untouched(storage: QueuedStorage) -> None:
    rows = list(
        PendingTransfer.objects.filter(storage_key=storage.key).values_list(
            "name", "status", "deleted"
        )
    )
    assert rows == [(NAME, PendingTransfer.Status.DONE, False)]
    assert copies(storage) == {"local": DATA, "remote": DATA}


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_a_spelling_that_is_not_a_name_is_refused_by_every_entry_point(
    transferred: QueuedStorage,
    entry_point: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    call = ENTRY_POINTS[entry_point]
    for spelling in NOT_NAMES:
        refused = False
        try:
            with django_capture_on_commit_callbacks(execute=True):
                call(transferred, spelling)
        except SuspiciousFileOperation:
            refused = True
        assert_untouched(transferred)
        assert refused, f"{entry_point}({spelling!r}) was not refused"
    drain(keys=[transferred.key])
    assert_untouched(transferred)


@pytest.mark.parametrize(
    "directory", ["./docs", "docs//", "a/../docs", "/docs", "docs/.", "/", "."]
)
def test_listdir_refuses_a_directory_spelling_that_is_not_a_name(
    transferred: QueuedStorage, directory: str
) -> None:
    with pytest.raises(SuspiciousFileOperation):
        transferred.listdir(directory)


@pytest.mark.parametrize("directory", ["docs", "docs/", "docs\\"])
def test_listdir_takes_a_directory_with_or_without_its_trailing_slash(
    transferred: QueuedStorage, directory: str
) -> None:
    assert transferred.listdir(directory) == ([], ["caf\u00e9.txt"])
    assert transferred.listdir("") == (["docs"], [])


@pytest.mark.parametrize("spelling", SAME_NAME, ids=["backslash", "nfd"])
def test_another_spelling_of_a_name_reads_that_file(
    transferred: QueuedStorage, spelling: str
) -> None:
    storage = transferred
    assert storage.exists(spelling)
    assert read_bytes(storage, spelling) == DATA
    assert storage.size(spelling) == len(DATA)
    assert storage.url(spelling) == storage.url(NAME)
    assert storage.path(spelling) == storage.remote.path(NAME)
    assert storage.get_modified_time(spelling) == storage.get_modified_time(NAME)
    assert storage.using_remote(spelling)
    assert not storage.is_name_available(spelling)
    assert storage.get_available_name(spelling) != NAME
    assert storage.transfer(spelling) is False  # done already: left alone
    assert_untouched(storage)


@pytest.mark.parametrize("spelling", SAME_NAME, ids=["backslash", "nfd"])
def test_another_spelling_of_a_name_deletes_that_file_and_its_row(
    transferred: QueuedStorage,
    spelling: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        transferred.delete(spelling)

    assert not PendingTransfer.objects.filter(storage_key=transferred.key).exists()
    assert copies(transferred) == {"local": None, "remote": None}
    assert not transferred.exists(NAME)


def test_legacy_name_that_a_save_would_refuse_is_read_and_deleted(
    storage: QueuedStorage, django_capture_on_commit_callbacks: Any
) -> None:
    """A file from before the name rules (a trailing dot, a device name) is still
    served and can be removed: only new saves need names every remote keeps."""
    for legacy in ("docs/report.", "docs/CON.txt"):
        with pytest.raises(SuspiciousFileOperation):
            storage.save(legacy, content())
        storage.local.save(legacy, content())  # saved by 0.8, without a row

        assert storage.exists(legacy)
        assert read_bytes(storage, legacy) == b"hello world"
        assert storage.transfer(legacy) is True
        drain(keys=[storage.key])
        assert read_bytes(storage.remote, legacy) == b"hello world"

        with django_capture_on_commit_callbacks(execute=True):
            storage.delete(legacy)
        assert not storage.exists(legacy)
        assert not storage.local.exists(legacy)
        assert not storage.remote.exists(legacy)
    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()


def test_queue_transfers_skips_a_local_file_whose_name_reads_as_another_file(
    transferred: QueuedStorage,
) -> None:
    """On a POSIX disk ``docs\\café.txt`` and the NFD spelling are files of their
    own; a row for either would be a second row of ``docs/café.txt``."""
    root = root_of(transferred.local)
    for spelling in SAME_NAME:
        (root / spelling).write_bytes(b"a look-alike")
    out, err = StringIO(), StringIO()

    call_command(
        "queue_transfers", "--storage", transferred.key, stdout=out, stderr=err
    )

    assert "invalid=2" in out.getvalue()
    assert "the storage reads this name as 'docs/caf\u00e9.txt'" in err.getvalue()
    assert_untouched(transferred)


@pytest.mark.parametrize("prefix", ["./docs", "docs//", "a/../docs", "/docs"])
def test_queue_transfers_refuses_a_prefix_that_is_not_a_name(
    transferred: QueuedStorage, prefix: str
) -> None:
    with pytest.raises(CommandError, match="--prefix"):
        call_command(
            "queue_transfers", "--storage", transferred.key, "--prefix", prefix
        )
    assert_untouched(transferred)


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_c1_controls_and_line_separators_are_refused_like_c0_controls(
    storage: QueuedStorage, entry_point: str
) -> None:
    for name in ("x\x85.txt", "x\x9b.txt", "x\u2028.txt", "x\u2029.txt", "x\n.txt"):
        with pytest.raises(SuspiciousFileOperation, match="control character"):
            ENTRY_POINTS[entry_point](storage, name)
    assert not PendingTransfer.objects.exists()


def test_url_of_the_empty_name_is_still_the_base_url(storage: QueuedStorage) -> None:
    assert storage.url("") == storage.local.url("") == "/media/"
    assert not PendingTransfer.objects.exists()


@pytest.mark.parametrize("small", [True, False], ids=["small-file", "large-file"])
def test_a_name_with_a_lone_surrogate_is_refused_before_anything_is_written(
    storage: QueuedStorage, monkeypatch: pytest.MonkeyPatch, small: bool
) -> None:
    """Not Unicode text: the database's driver raised a UnicodeEncodeError, the
    disk took it as the byte it escapes; now it is refused like other bad names."""
    if not small:
        monkeypatch.setattr("queued_storage.saving.SMALL_FILE", 1)
    for name in ("a\udc80.txt", "docs/\ud800.txt"):
        with pytest.raises(SuspiciousFileOperation, match="surrogate"):
            storage.save(name, content())
        for entry_point in ENTRY_POINTS.values():
            with pytest.raises(SuspiciousFileOperation, match="surrogate"):
                entry_point(storage, name)
    assert not PendingTransfer.objects.exists()
    root = root_of(storage.local)
    assert not root.exists() or not any(p.is_file() for p in root.rglob("*"))


def test_transfer_of_a_directory_that_holds_other_names_queues_nothing(
    transferred: QueuedStorage,
) -> None:
    """``docs`` is a directory of ``docs/café.txt``, no file: ``exists()`` says
    so of a directory, but a row for it would only fail at the worker."""
    assert transferred.transfer("docs") is False
    assert_untouched(transferred)


#: Rows that versions which did not canonicalise names wrote: transfer("./x")
#: and delete("a/../x") wrote a row under the spelling they were given.
LEGACY_SPELLINGS = [
    "./docs/caf\u00e9.txt",
    "a/../docs/caf\u00e9.txt",
    "docs//caf\u00e9.txt",
]


@pytest.mark.parametrize("deleted", [True, False], ids=["tombstone", "queued"])
def test_a_ledger_row_under_another_spelling_never_reaches_that_files_copies(
    make_storage: Callable[..., QueuedStorage], deleted: bool
) -> None:
    """A tombstone ``./x`` left by an old ``delete("./x")`` purged ``x``'s local
    and remote copies while ``x``'s row stayed done; a queued ``./x`` with
    TransferAndDelete removed ``x``'s local copy. Such a row fails with a clear
    error and touches nothing."""
    storage = make_storage(task="queued_storage.tasks.TransferAndDelete")
    from django.core.files.base import ContentFile
    from django.utils import timezone

    assert storage.save(NAME, ContentFile(DATA)) == NAME
    drain(keys=[storage.key])
    # TransferAndDelete removed NAME's local copy: one is there again, as after a
    # re-save, for the old row to reach.
    (root_of(storage.local) / NAME).write_bytes(DATA)
    for spelling in LEGACY_SPELLINGS:
        PendingTransfer.objects.create(
            storage_key=storage.key,
            name=spelling,
            size=len(DATA),
            deleted=deleted,
            remote_owned=True,
            next_attempt_at=timezone.now(),
        )

    stats = drain(keys=[storage.key])

    assert stats.failed == len(LEGACY_SPELLINGS)
    assert copies(storage) == {"local": DATA, "remote": DATA}
    assert read_bytes(storage, NAME) == DATA
    for spelling in LEGACY_SPELLINGS:
        row = PendingTransfer.objects.get(storage_key=storage.key, name=spelling)
        assert row.status == PendingTransfer.Status.FAILED
        assert "nothing was uploaded or removed" in row.last_error
    assert PendingTransfer.objects.get(storage_key=storage.key, name=NAME).status == (
        PendingTransfer.Status.DONE
    )


def test_clean_local_copies_keeps_the_file_a_row_under_another_spelling_reads_as(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    """A held file whose transfer an old ``transfer("./x")`` did under a row of
    its own: that row is done, its remote copy matches, and removing "its" local
    copy removed the only copy the held row serves."""
    from django.core.files.base import ContentFile
    from django.utils import timezone

    storage = make_storage(delayed=True)
    assert storage.save(NAME, ContentFile(DATA)) == NAME
    storage.remote.save(NAME, ContentFile(DATA))
    PendingTransfer.objects.create(
        storage_key=storage.key,
        name="./" + NAME,
        size=len(DATA),
        status=PendingTransfer.Status.DONE,
        remote_owned=True,
        transferred_at=timezone.now(),
    )
    out = StringIO()

    with pytest.raises(CommandError):
        call_command("clean_local_copies", "--older-than", "0", "-v", "2", stdout=out)

    assert "nothing was uploaded or removed" in out.getvalue()
    assert copies(storage)["local"] == DATA
    assert read_bytes(storage, NAME) == DATA
