"""QueuedFTPStorage against a real FTP server (pyftpdlib) on loopback."""

from __future__ import annotations

import ftplib
import os
import threading
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.db.models import F

from queued_storage import registry
from queued_storage.backends import QueuedFTPStorage
from queued_storage.ftp import FTPStorage, parse_list
from queued_storage.models import PendingTransfer
from queued_storage.tasks import Transfer
from queued_storage.worker import drain
from tests.real_names import check_real_names
from tests.servers import (
    FTPServerInfo,
    configure_ftp,
    disconnect_ftp,
    ftp_read,
    ftp_server,
)

pytestmark = pytest.mark.django_db


def test_ftp_login_error_is_kept_without_the_password(
    ftp: FTPServerInfo, tmp_path: Path, settings: Any
) -> None:
    """A wrong password is a retryable error on the row, and the row, whose
    error text django-storages builds from the parsed location, never holds
    the password."""
    password = "wrong-passw0rd"
    storage = configure_ftp(
        settings,
        tmp_path,
        f"ftp://{ftp.user}:{password}@127.0.0.1:{ftp.port}/",
    )
    try:
        name = storage.save("a.txt", ContentFile(b"abc"))
        drain(keys=["ftp"])
    finally:
        registry.forget("ftp")

    row = PendingTransfer.objects.get(storage_key="ftp", name=name)
    assert row.status == PendingTransfer.Status.QUEUED
    assert row.attempts == 1
    assert "FTPStorageException" in row.last_error
    assert password not in row.last_error
    assert password not in str(row.error_history)
    assert storage.url(name) == "/media/a.txt"
    assert ftp_read(ftp, name) is None


def files_on(ftp: FTPServerInfo) -> list[str]:
    """Every file on the FTP server, as the server's disk names it."""
    return sorted(
        str(path.relative_to(ftp.root))
        for path in ftp.root.rglob("*")
        if path.is_file()
    )


def test_ftp_real_names(
    ftp_storage: QueuedFTPStorage,
    ftp: FTPServerInfo,
    django_capture_on_commit_callbacks: Any,
) -> None:
    """Names with spaces and characters outside latin-1 reach a UTF-8 server under
    their own names, are verified, served from it and deleted from it; a name
    with a space does not break the listing of its folder for its neighbours."""
    assert isinstance(ftp_storage.remote, FTPStorage)

    check_real_names(
        ftp_storage,
        lambda name: ftp_read(ftp, name),
        django_capture_on_commit_callbacks,
    )

    assert files_on(ftp) == []
    name = "dir with space/été ü 文件.txt"
    assert ftp_storage.remote.url(name) == (
        "https://files.example.com/dir%20with%20space/"
        "%C3%A9t%C3%A9%20%C3%BC%20%E6%96%87%E4%BB%B6.txt"
    )


def test_ftp_upload_dropped_mid_way_leaves_nothing(
    ftp_storage: QueuedFTPStorage, ftp: FTPServerInfo
) -> None:
    """The server drops the session after the first chunk of an upload and keeps
    the partial file: the attempt removes it, and the next one uploads it all."""
    payload = os.urandom(300_000)
    name = ftp_storage.save("big/part one.bin", ContentFile(payload))
    ftp.faults.drop_next_upload = True

    drain(keys=["ftp"])

    row = PendingTransfer.objects.get(storage_key="ftp", name=name)
    assert (row.status, row.attempts) == (PendingTransfer.Status.QUEUED, 1)
    assert "Error writing file" in row.last_error
    assert files_on(ftp) == []

    row.retry_now()
    drain(keys=["ftp"])

    row.refresh_from_db()
    assert row.status == PendingTransfer.Status.DONE, row.last_error
    assert ftp_read(ftp, name) == payload
    assert files_on(ftp) == [name]


class ResavedDuringUpload(Transfer):
    """A save of the name lands while the upload runs: the worker's claim on the
    generation it uploads is lost."""

    resaves = 1

    def transfer(self, name: str, local: Any, remote: Any, **kwargs: Any) -> bool:
        if ResavedDuringUpload.resaves:
            ResavedDuringUpload.resaves -= 1
            PendingTransfer.objects.filter(storage_key="ftp", name=name).update(
                generation=F("generation") + 1
            )
        return super().transfer(name, local, remote, **kwargs)


def test_ftp_partial_upload_is_kept_once_the_lease_is_lost(
    ftp: FTPServerInfo, tmp_path: Path, settings: Any
) -> None:
    """A worker that lost its claim removes nothing, not even what its own failed
    upload left: the name may be another worker's by now (invariant 3). The
    ledger owns what is there, for the newer version's upload to replace."""
    storage = configure_ftp(
        settings,
        tmp_path,
        ftp.location,
        task="tests.test_backend_ftp.ResavedDuringUpload",
    )
    try:
        name = storage.save("kept.bin", ContentFile(os.urandom(300_000)))
        ftp.faults.drop_next_upload = True
        ResavedDuringUpload.resaves = 1
        drain(keys=["ftp"], limit=1)

        assert 0 < (ftp.root / name).stat().st_size < 300_000
        row = PendingTransfer.objects.get(storage_key="ftp", name=name)
        assert row.remote_owned
        assert row.status == PendingTransfer.Status.QUEUED

        drain(keys=["ftp"])
    finally:
        disconnect_ftp(storage)
        registry.forget("ftp")

    row.refresh_from_db()
    assert row.status == PendingTransfer.Status.DONE, row.last_error
    assert (ftp.root / name).stat().st_size == 300_000


@pytest.fixture
def latin1_ftp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FTPServerInfo]:
    with ftp_server(tmp_path_factory.mktemp("latin1-root"), encoding="latin-1") as info:
        yield info


def test_ftp_server_without_utf8_refuses_non_ascii_names(
    latin1_ftp: FTPServerInfo, tmp_path: Path, settings: Any
) -> None:
    """A server that does not announce UTF-8 would store a non-ASCII name under
    another one: the transfer fails at once, saying so, and sends nothing; ASCII
    names with spaces still go."""
    storage = configure_ftp(settings, tmp_path, latin1_ftp.location)
    try:
        accented = storage.save("été.txt", ContentFile(b"abc"))
        spaced = storage.save("a b/c d.txt", ContentFile(b"abcd"))
        drain(keys=["ftp"])
    finally:
        disconnect_ftp(storage)
        registry.forget("ftp")

    row = PendingTransfer.objects.get(storage_key="ftp", name=accented)
    assert (row.status, row.attempts) == (PendingTransfer.Status.FAILED, 1)
    assert "does not announce UTF-8" in row.last_error
    assert "set encoding" in row.last_error
    done = PendingTransfer.objects.get(storage_key="ftp", name=spaced)
    assert done.status == PendingTransfer.Status.DONE, done.last_error
    assert files_on(latin1_ftp) == ["a b/c d.txt"]


def test_ftp_encoding_set_to_the_servers(
    latin1_ftp: FTPServerInfo,
    tmp_path: Path,
    settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    """With ``encoding`` set to the server's, latin-1 names go under their own
    names; one the encoding cannot spell fails at once and sends nothing."""
    storage = configure_ftp(settings, tmp_path, latin1_ftp.location, encoding="latin-1")
    try:
        accented = storage.save("dossier/été.txt", ContentFile(b"abc"))
        chinese = storage.save("文件.txt", ContentFile(b"abcd"))
        drain(keys=["ftp"])
        assert files_on(latin1_ftp) == ["dossier/été.txt"]
        with django_capture_on_commit_callbacks(execute=True):
            storage.delete(accented)
    finally:
        disconnect_ftp(storage)
        registry.forget("ftp")

    row = PendingTransfer.objects.get(storage_key="ftp", name=chinese)
    assert (row.status, row.attempts) == (PendingTransfer.Status.FAILED, 1)
    assert "cannot be sent in latin-1" in row.last_error
    assert not PendingTransfer.objects.filter(storage_key="ftp", name=accented).exists()
    assert files_on(latin1_ftp) == []


def test_ftp_list_output_with_spaces_and_other_formats() -> None:
    """The ``LIST`` fallback (servers without ``MLSD``) keeps names whole."""
    lines = [
        "total 12",
        "drwxr-xr-x   2 ftp  ftp      4096 Dec  1 12:00 dir with space",
        "-rw-r--r--   1 ftp  ftp         3 Dec  1 12:00 a b.txt",
        "-rw-r--r--   1 1001 1001  1234567 Jan 31  2025  leading space.txt",
        "-rw-r--r--   1 ftp  ftp        42 Dec  1 12:00 été 12 Dec 01 12:00 x",
        "lrwxrwxrwx   1 ftp  ftp         9 Dec  1 12:00 link -> a b.txt",
        "-rw-r--r--   1 owner         17 Dec  1 12:00 no group.txt",
        "-rw-r--r--   1 ftp  ftp         5 juil. 15  2025 juillet.txt",
        "-rw-r--r--   1 ftp  ftp         6 15. Juli 12:00 Juli.txt",
        "-rw-r--r--   1 ftp  20      2024 Jan 31  2025 ftp 20 2024.txt",
        "-rw-r--r--   1 ftp  domain users 8 Dec  1 12:00 group with space.txt",
        "-rw-r--r--  ftp  ftp   9 Dec  1 12:00 no links.txt",
        "12-01-26  12:00PM       <DIR>          Windows dir",
        "12-01-26  12:00PM                  7 Windows file.txt",
        "something unexpected",
    ]

    dirs, files = parse_list(lines)

    assert dirs == {"dir with space": 0, "Windows dir": 0}
    assert files == {
        "a b.txt": 3,
        " leading space.txt": 1234567,
        "été 12 Dec 01 12:00 x": 42,
        "no group.txt": 17,
        "juillet.txt": 5,
        "Juli.txt": 6,
        "ftp 20 2024.txt": 2024,
        "group with space.txt": 8,
        "no links.txt": 9,
        "Windows file.txt": 7,
    }


def test_ftp_failed_read_leaves_later_uploads_where_they_belong(
    ftp_storage: QueuedFTPStorage, ftp: FTPServerInfo
) -> None:
    """A read that fails (the remote copy removed behind the ledger's back) does
    not leave the connection in the file's folder: the next upload on it still
    lands at its own name, not inside that folder (invariant 1)."""
    first = ftp_storage.save("first/a.txt", ContentFile(b"abc"))
    drain(keys=["ftp"])
    (ftp.root / first).unlink()
    with pytest.raises(Exception, match="Error reading file"):
        ftp_storage.open(first).read()

    second = ftp_storage.save("second/b.txt", ContentFile(b"abcd"))
    drain(keys=["ftp"])

    row = PendingTransfer.objects.get(storage_key="ftp", name=second)
    assert row.status == PendingTransfer.Status.DONE, row.last_error
    assert files_on(ftp) == [second]
    assert ftp_read(ftp, second) == b"abcd"


def nfd_filesystem() -> Any:
    """pyftpdlib's disk as macOS (HFS+) keeps it: every name stored, and so
    listed, in Unicode NFD."""
    from pyftpdlib.filesystems import AbstractedFS

    class NFDFilesystem(AbstractedFS):
        def ftp2fs(self, ftppath: str) -> str:
            return unicodedata.normalize("NFD", super().ftp2fs(ftppath))

    return NFDFilesystem


@pytest.fixture
def nfd_ftp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FTPServerInfo]:
    with ftp_server(
        tmp_path_factory.mktemp("nfd-root"), filesystem=nfd_filesystem()
    ) as info:
        yield info


def test_ftp_server_that_lists_names_in_nfd(
    nfd_ftp: FTPServerInfo, tmp_path: Path, settings: Any
) -> None:
    """A server that stores names decomposed (NFD) lists an accented name in
    another spelling than the ledger's (NFC): the upload is still verified, and a
    foreign file under such a spelling is not overwritten (invariant 4)."""
    foreign = unicodedata.normalize("NFD", "déjà.txt")
    (nfd_ftp.root / foreign).write_bytes(b"not ours")
    storage = configure_ftp(settings, tmp_path, nfd_ftp.location)
    try:
        name = storage.save("été/ü.txt", ContentFile(b"abc"))
        taken = storage.save("déjà.txt", ContentFile(b"ours"))
        drain(keys=["ftp"])
    finally:
        disconnect_ftp(storage)
        registry.forget("ftp")

    row = PendingTransfer.objects.get(storage_key="ftp", name=name)
    assert row.status == PendingTransfer.Status.DONE, row.last_error
    refused = PendingTransfer.objects.get(storage_key="ftp", name=taken)
    assert refused.status == PendingTransfer.Status.FAILED
    assert "did not put there" in refused.last_error
    assert (nfd_ftp.root / foreign).read_bytes() == b"not ours"


def japanese_list_filesystem() -> Any:
    """pyftpdlib's disk listed by ``LIST`` with dates as ``ls`` writes them under
    ``LANG=ja_JP`` (``7月 15  2025``), a format the parser does not read."""
    from pyftpdlib.filesystems import AbstractedFS

    months = [
        "Jan",
        "Feb",
        "Mar",
        "Apr",
        "May",
        "Jun",
        "Jul",
        "Aug",
        "Sep",
        "Oct",
        "Nov",
        "Dec",
    ]

    class JapaneseFilesystem(AbstractedFS):
        def format_list(self, *args: Any, **kwargs: Any) -> Iterator[bytes]:
            for line in super().format_list(*args, **kwargs):
                text = line.decode("utf-8")
                for number, month in enumerate(months, 1):
                    text = text.replace(f" {month} ", f" {number}月 ", 1)
                yield text.encode("utf-8")

    return JapaneseFilesystem


@pytest.mark.parametrize("filesystem", [None, japanese_list_filesystem()])
def test_ftp_list_only_server_never_overwrites_what_it_cannot_read(
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    settings: Any,
    filesystem: Any,
) -> None:
    """On a server without ``MLSD``, a foreign entry whose ``LIST`` line is a
    symbolic link, or in a format the parser does not read, is there all the
    same: the upload of its name is refused instead of writing through it
    (invariant 4)."""
    root = tmp_path_factory.mktemp("list-root")
    (root / "target.txt").write_bytes(b"not ours")
    (root / "link.txt").symlink_to("target.txt")
    (root / "plain.txt").write_bytes(b"not ours either")
    for name in ("target.txt", "plain.txt"):
        os.utime(root / name, (1752537600, 1752537600))  # July 2025
    with ftp_server(root, mlsd=False, filesystem=filesystem) as server:
        storage = configure_ftp(settings, tmp_path, server.location)
        try:
            link = storage.save("link.txt", ContentFile(b"ours"))
            plain = storage.save("plain.txt", ContentFile(b"ours too"))
            drain(keys=["ftp"])
        finally:
            disconnect_ftp(storage)
            registry.forget("ftp")

    assert (root / "target.txt").read_bytes() == b"not ours"
    assert (root / "plain.txt").read_bytes() == b"not ours either"
    for name in (link, plain):
        row = PendingTransfer.objects.get(storage_key="ftp", name=name)
        assert row.status == PendingTransfer.Status.FAILED, (name, row.last_error)
        assert "did not put there" in row.last_error


def test_ftp_folder_that_cannot_be_made_leaves_later_uploads_in_place(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, settings: Any
) -> None:
    """An upload whose folder cannot be created (a file has its name; ``LIST``
    of a file lists it, so the existence check lets it through) does not leave
    the connection in the folder above it: the next upload lands at its own name
    (invariant 1)."""
    root = tmp_path_factory.mktemp("blocked-root")
    (root / "ok").mkdir()
    (root / "ok" / "blocker").write_bytes(b"a file")
    with ftp_server(root, mlsd=False) as server:
        storage = configure_ftp(settings, tmp_path, server.location)
        try:
            blocked = storage.save("ok/blocker/x.txt", ContentFile(b"abc"))
            drain(keys=["ftp"], limit=1)
            other = storage.save("c/d.txt", ContentFile(b"abcd"))
            drain(keys=["ftp"], limit=1)
        finally:
            disconnect_ftp(storage)
            registry.forget("ftp")

        assert files_on(server) == ["c/d.txt", "ok/blocker"]
    row = PendingTransfer.objects.get(storage_key="ftp", name=blocked)
    assert "Cannot create directory chain" in row.last_error
    row = PendingTransfer.objects.get(storage_key="ftp", name=other)
    assert row.status == PendingTransfer.Status.DONE, row.last_error


#: Names that FTP's text protocol and listings could get wrong.
AWKWARD_NAMES = (
    "deep dir/with space/and more/ leading space.txt",
    "trailing space .txt",
    "100% #1 ?.txt",
    "📷 photos/🎉 party.txt",
    "-rw-r--r--   1 ftp  ftp  5 Dec  1 12:00 y.txt",
    "12-01-26  12:00PM  7 dos.txt",
    "Case.txt",
    "case.txt",
)


@pytest.mark.parametrize("mlsd", [True, False], ids=["mlsd", "list"])
def test_ftp_awkward_names(
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    settings: Any,
    django_capture_on_commit_callbacks: Any,
    mlsd: bool,
) -> None:
    """Names with spaces at either end of a part, URL delimiters, 4-byte UTF-8
    (the ledger's column too), listing-like text and case variants reach the
    server whole, through ``MLSD`` or ``LIST``, and are served and deleted."""
    with ftp_server(tmp_path_factory.mktemp("awkward-root"), mlsd=mlsd) as server:
        storage = configure_ftp(settings, tmp_path, server.location)
        try:
            check_real_names(
                storage,
                lambda name: ftp_read(server, name),
                django_capture_on_commit_callbacks,
                names=AWKWARD_NAMES,
            )
        finally:
            disconnect_ftp(storage)
            registry.forget("ftp")
        assert files_on(server) == []


def case_insensitive_filesystem() -> Any:
    """pyftpdlib's disk as Windows (NTFS) keeps it: a name reaches the entry that
    differs from it only by case, and a new entry keeps the case it was given."""
    from pyftpdlib.filesystems import AbstractedFS

    class CaseInsensitiveFilesystem(AbstractedFS):
        def ftp2fs(self, ftppath: str) -> str:
            path = Path(self.root)
            relative = Path(super().ftp2fs(ftppath)).relative_to(self.root)
            for part in relative.parts:
                found = [
                    entry.name
                    for entry in (path.iterdir() if path.is_dir() else ())
                    if entry.name.casefold() == part.casefold()
                ]
                path /= found[0] if found else part
            return str(path)

    return CaseInsensitiveFilesystem


@pytest.mark.parametrize("mlsd", [True, False], ids=["mlsd", "list"])
def test_ftp_case_insensitive_server_keeps_both_versions_of_a_name(
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    settings: Any,
    mlsd: bool,
) -> None:
    """On a server that does not tell names apart by case, a name that differs
    from a transferred one only by case is refused, not uploaded over it: the
    first one keeps its bytes (invariants 1 and 4). A case-sensitive server
    takes both (``test_ftp_awkward_names``)."""
    root = tmp_path_factory.mktemp("nocase-root")
    with ftp_server(
        root, mlsd=mlsd, filesystem=case_insensitive_filesystem()
    ) as server:
        storage = configure_ftp(settings, tmp_path, server.location)
        try:
            first = storage.save("Docs/Report.txt", ContentFile(b"first"))
            drain(keys=["ftp"])
            second = storage.save("docs/report.TXT", ContentFile(b"second"))
            drain(keys=["ftp"])
        finally:
            disconnect_ftp(storage)
            registry.forget("ftp")
        assert files_on(server) == ["Docs/Report.txt"]
        assert ftp_read(server, first) == b"first"

    row = PendingTransfer.objects.get(storage_key="ftp", name=first)
    assert row.status == PendingTransfer.Status.DONE, row.last_error
    refused = PendingTransfer.objects.get(storage_key="ftp", name=second)
    assert refused.status == PendingTransfer.Status.FAILED
    assert "did not put there" in refused.last_error


def test_ftp_list_of_a_folder_named_like_an_option(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, settings: Any
) -> None:
    """``LIST -l`` is ``ls -l`` to a server, which lists the working folder: a
    folder named ``-l`` is listed as itself, so a file at the top with the same
    base name is neither taken for the upload's nor checked in its place."""
    root = tmp_path_factory.mktemp("option-root")
    (root / "report.txt").write_bytes(b"not ours")
    with ftp_server(root, mlsd=False) as server:
        storage = configure_ftp(settings, tmp_path, server.location)
        try:
            name = storage.save("-l/report.txt", ContentFile(b"ours"))
            drain(keys=["ftp"])
        finally:
            disconnect_ftp(storage)
            registry.forget("ftp")
        assert ftp_read(server, name) == b"ours"
        assert (root / "report.txt").read_bytes() == b"not ours"

    row = PendingTransfer.objects.get(storage_key="ftp", name=name)
    assert row.status == PendingTransfer.Status.DONE, row.last_error


def test_ftp_threads_do_not_share_a_connection(
    ftp_storage: QueuedFTPStorage, ftp: FTPServerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read in one thread (a request) while another thread's read is in flight
    on the same storage (a worker's, a request's) gets its own file's bytes, and
    so does the first: ftplib's connection is not thread-safe, so each thread
    has its own."""
    first, second = os.urandom(300_000), os.urandom(200_000)
    ftp_storage.save("first.bin", ContentFile(first))
    ftp_storage.save("second.bin", ContentFile(second))
    drain(keys=["ftp"])
    remote = ftp_storage.remote
    in_flight, second_read = threading.Event(), threading.Event()
    retrbinary = ftplib.FTP.retrbinary

    def pausing_retrbinary(
        self: ftplib.FTP, cmd: str, callback: Any, *args: Any, **kwargs: Any
    ) -> Any:
        def write(chunk: bytes) -> None:
            if cmd.endswith("first.bin") and not in_flight.is_set():
                in_flight.set()
                second_read.wait(10)
            callback(chunk)

        return retrbinary(self, cmd, write, *args, **kwargs)

    monkeypatch.setattr(ftplib.FTP, "retrbinary", pausing_retrbinary)
    read: dict[str, Any] = {}

    def read_first() -> None:
        try:
            read["first.bin"] = remote.open("first.bin").read()
        except Exception as exc:
            read["first.bin"] = exc
        finally:
            remote.disconnect()  # type: ignore[attr-defined]

    thread = threading.Thread(target=read_first)
    thread.start()
    try:
        assert in_flight.wait(10)
        try:
            read["second.bin"] = remote.open("second.bin").read()
        except Exception as exc:
            read["second.bin"] = exc
    finally:
        second_read.set()
        thread.join(10)

    assert read == {"first.bin": first, "second.bin": second}
