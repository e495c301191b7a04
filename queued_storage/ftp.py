"""The FTP remote of ``QueuedFTPStorage``: django-storages' ``FTPStorage`` made to
carry any name a ``QueuedStorage`` accepts.

django-storages sends names in latin-1 and reads a file's size from ``LIST``
output split at spaces: a name outside latin-1 cannot be sent, one that a UTF-8
server stores under another name is never found again (so never deleted), and
a name with a space breaks the listing of its whole folder. This one speaks
UTF-8 (``OPTS UTF8 ON`` where the server announces it, RFC 2640), lists with
``MLSD`` (RFC 3659) where it can, refuses before sending anything a name the
server would store under another one, and removes what a failed upload left.
"""

from __future__ import annotations

import contextlib
import ftplib
import io
import logging
import posixpath
import re
import ssl
import threading
import unicodedata
from typing import Any
from urllib.parse import urljoin

from django.core.files.base import File
from django.utils.deconstruct import deconstructible
from django.utils.encoding import filepath_to_uri
from storages.backends import ftp
from storages.backends.ftp import FTPStorageException
from storages.utils import setting

from queued_storage.copying import check_lease
from queued_storage.errors import LeaseLost

logger = logging.getLogger("queued_storage")

#: A ``LIST`` line of a Unix server: mode, links, owner, group, size, date, name.
#: The name is all that follows the date (spaces included). The size follows one
#: field at least and the month is letters (``Dec``, ``déc.``, ``Juli``): the link
#: count, a short owner and a numeric group are not a size and a date.
_UNIX_LINE = re.compile(
    r"^(?P<kind>[-dlcbps])\S*\s+\S+\s+(?:.*?\s)?(?P<size>\d+)\s+"
    r"(?:[^\W\d_]{3,4}\.?\s+\d{1,2}|\d{1,2}\.?\s+[^\W\d_]{3,4}\.?)\s+"
    r"(?:\d{1,2}:\d{2}|\d{4})\s(?P<name>.+)$"
)
#: A ``LIST`` line of a Windows server: date, time, ``<DIR>`` or size, name.
_DOS_LINE = re.compile(
    r"^\d{2}-\d{2}-\d{2,4}\s+\d{1,2}:\d{2}(?:[AP]M)?\s+(?P<size><DIR>|\d+)\s+"
    r"(?P<name>.+)$"
)

Listing = tuple[dict[str, int], dict[str, int]]
#: What a connection attempt raises: ftplib's errors, and a location path that
#: the encoding cannot spell.
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*ftplib.all_errors, UnicodeError)


class UnsupportedName(FTPStorageException):  # type: ignore[misc]
    """The server would store a name under another one (or cannot be sent it);
    retrying does not help, so the transfer fails at once."""

    retry = False


def same_name(listed: str, name: str) -> bool:
    """Whether a listing's ``listed`` is ``name``: a server that stores names
    decomposed (macOS) lists an accented name in NFD, the ledger keeps NFC."""
    return listed == name or unicodedata.normalize("NFC", listed) == name


def _entry(entries: dict[str, int], name: str) -> str | None:
    """The key of ``entries`` that is ``name``, its own spelling first."""
    if name in entries:
        return name
    return next((listed for listed in entries if same_name(listed, name)), None)


def list_holds(lines: list[str], name: str) -> bool:
    """Whether ``LIST`` output may have an entry ``name`` of any kind: a file, a
    folder, a link (``name -> target``), or a line in no known format that ends
    with it. An existence check that missed one would let an upload overwrite
    it, or write through a link."""
    for line in lines:
        entry = _UNIX_LINE.match(line) or _DOS_LINE.match(line)
        if entry is None:
            if line.endswith(f" {name}") or f" {name} -> " in line:
                return True
            continue
        listed = entry["name"]
        if same_name(listed, name) or (
            entry.re is _UNIX_LINE
            and entry["kind"] == "l"
            and unicodedata.normalize("NFC", listed).startswith(f"{name} -> ")
        ):
            return True
    return False


def parse_list(lines: list[str]) -> Listing:
    """Directories and files (with sizes) of ``LIST`` output; lines in no known
    format (a total, a symlink, a device) are left out rather than misread."""
    dirs: dict[str, int] = {}
    files: dict[str, int] = {}
    for line in lines:
        unix = _UNIX_LINE.match(line)
        if unix is not None:
            if unix["kind"] == "d":
                dirs[unix["name"]] = 0
            elif unix["kind"] == "-":
                files[unix["name"]] = int(unix["size"])
            continue
        dos = _DOS_LINE.match(line)
        if dos is not None:
            if dos["size"] == "<DIR>":
                dirs[dos["name"]] = 0
            else:
                files[dos["name"]] = int(dos["size"])
    return dirs, files


@deconstructible
class FTPStorage(ftp.FTPStorage):  # type: ignore[misc]
    """django-storages' ``FTPStorage`` for any name: UTF-8 (unless ``encoding`` is
    set), ``MLSD`` listings, ``url()`` quoted, ``size()`` of a missing file a
    ``FileNotFoundError`` (not 0), and no partial upload left behind."""

    def __init__(self, **settings: Any) -> None:
        self._connections = threading.local()
        super().__init__(**settings)
        self._features: frozenset[str] = frozenset()

    # One connection per thread: ftplib's is not thread-safe, and requests served
    # in threads read files while a worker's threads (--concurrency) upload.
    @property
    def _connection(self) -> Any:
        return getattr(self._connections, "connection", None)

    @_connection.setter
    def _connection(self, connection: Any) -> None:
        self._connections.connection = connection

    def get_default_settings(self) -> dict[str, Any]:
        defaults: dict[str, Any] = super().get_default_settings()
        # None: UTF-8, and names outside ASCII only to a server that announces it.
        defaults["encoding"] = setting("FTP_STORAGE_ENCODING")
        return defaults

    # The connection

    def _start_connection(self) -> None:
        if self._connection is not None:
            try:
                self._connection.pwd()
                return
            except ftplib.all_errors:
                self._drop_connection()
        config = self._config
        connection = ftplib.FTP_TLS() if config["secure"] else ftplib.FTP()
        connection.encoding = self.encoding or "utf-8"
        try:
            connection.connect(config["host"], config["port"])
            connection.login(config["user"], config["passwd"])
            features = _negotiate(connection)
            if isinstance(connection, ftplib.FTP_TLS):
                connection.prot_p()
            if config["active"]:
                connection.set_pasv(False)
            if config["path"] != "":
                connection.cwd(config["path"])
        except _CONNECT_ERRORS as exc:
            connection.close()
            raise FTPStorageException(
                f"Connection or login error on {config['host']}:{config['port']}: {exc}"
            ) from exc
        self._connection = connection
        self._features = features

    def _drop_connection(self) -> None:
        """Close the connection without a ``QUIT``: after an aborted transfer it
        may be out of step with the server, or dead."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def disconnect(self) -> None:
        with contextlib.suppress(*ftplib.all_errors):
            self._connection.quit()
        self._drop_connection()

    def _check_name(self, name: str) -> None:
        """Refuse, before anything is sent, a name that the server would store
        under another one."""
        encoding = self.encoding or "utf-8"
        try:
            name.encode(encoding)
        except UnicodeEncodeError as exc:
            raise UnsupportedName(
                f"{name!r} cannot be sent in {encoding}, the encoding set for this "
                "FTP server; set encoding to one that has these characters (or "
                "leave it unset for UTF-8)"
            ) from exc
        if (
            self.encoding is None
            and not name.isascii()
            and "UTF8" not in self._features
        ):
            raise UnsupportedName(
                f"the FTP server does not announce UTF-8 (FEAT UTF8), so it may "
                f"store {name!r} under another name; set encoding to the one the "
                "server uses for names to send it anyway"
            )

    # Writing

    def _save(self, name: str, content: File[Any]) -> str:
        self._start_connection()
        content.open()
        try:
            self._put_file(name, content)
        finally:
            content.close()
        return name

    def _put_file(self, name: str, content: File[Any]) -> None:
        self._check_name(name)
        connection = self._connection
        directory = posixpath.dirname(name)
        opened = False
        try:
            if directory:
                self._mkremdirs(directory)
            connection.voidcmd("TYPE I")
            with connection.transfercmd(f"STOR {name}") as data:
                opened = True
                for chunk in content.chunks():
                    data.sendall(chunk)
                if isinstance(data, ssl.SSLSocket):
                    data.unwrap()
            connection.voidresp()
        except (*ftplib.all_errors, FTPStorageException) as exc:
            if opened:
                self._remove_partial(name)
            raise FTPStorageException(f"Error writing file {name}: {exc}") from exc

    def _remove_partial(self, name: str) -> None:
        """Remove what a failed upload left at ``name``: the server had opened the
        file for it. Not once the worker's lease ran out: another worker may have
        written the name since. A removal that fails is logged; the ledger owns
        the object, so the next attempt or the purge after ``delete()`` replaces
        or removes it."""
        self._drop_connection()
        try:
            self._start_connection()
            check_lease(f"removing its failed upload of {name!r}")
            self._connection.delete(name)
        except (*ftplib.all_errors, FTPStorageException, LeaseLost) as exc:
            logger.warning(
                "failed FTP upload left in place name=%s error=%s",
                name,
                type(exc).__name__,
            )

    # Reading

    def _read(self, name: str) -> Any:
        # By its whole name: django-storages' changes into the file's folder and
        # stays there when the read fails, where later names would be sent
        # relative to it (an upload then lands inside that folder).
        self._check_name(name)
        memory_file = io.BytesIO()
        try:
            self._connection.retrbinary(f"RETR {name}", memory_file.write)
        except ftplib.all_errors as exc:
            if not isinstance(exc, ftplib.error_perm):
                self._drop_connection()  # may be out of step after a broken read
            raise FTPStorageException(f"Error reading file {name}: {exc}") from exc
        memory_file.seek(0)
        return memory_file

    def _mkremdirs(self, path: str) -> None:
        # django-storages' stays in the last folder it reached when it cannot
        # create the next one: back to where names are relative to.
        pwd = self._connection.pwd()
        try:
            super()._mkremdirs(path)
        finally:
            self._connection.cwd(pwd)

    def _list_lines(self, path: str) -> list[str]:
        # Servers read an argument that starts with "-" as options of ls
        # ("LIST -l"), and list the working folder instead.
        if path.startswith("-"):
            path = f"./{path}"
        lines: list[str] = []
        self._connection.retrlines(f"LIST {path}" if path else "LIST", lines.append)
        return lines

    def _listing(self, path: str) -> Listing:
        """Directories and files (with sizes) at ``path``; raises ftplib's errors."""
        connection = self._connection
        if "MLST" not in self._features:
            return parse_list(self._list_lines(path))
        dirs: dict[str, int] = {}
        files: dict[str, int] = {}
        # The server's default facts (type and size among them): asking for facts
        # sends OPTS MLST, which some servers refuse.
        for entry, facts in connection.mlsd(path):
            kind = facts.get("type", "").lower()
            if kind == "dir":
                dirs[entry] = 0
            elif kind == "file":
                files[entry] = int(facts.get("size", 0))
        return dirs, files

    def _get_dir_details(self, path: str) -> Listing:
        self._check_name(path)
        try:
            return self._listing(path)
        except ftplib.all_errors as exc:
            raise FTPStorageException(f"Error getting listing for {path}") from exc

    def _holds(self, path: str, name: str) -> bool:
        """Whether the folder ``path`` has an entry ``name`` of any kind (a link, a
        type the server does not say), or one that differs only by case where the
        server finds it by ``name``; raises ftplib's errors."""
        if "MLST" in self._features:
            listed = [
                entry
                for entry, facts in self._connection.mlsd(path)
                if facts.get("type", "").lower() not in ("cdir", "pdir")
            ]
            if any(same_name(entry, name) for entry in listed):
                return True
        else:
            lines = self._list_lines(path)
            if list_holds(lines, name):
                return True
            dirs, files = parse_list(lines)
            listed = [*dirs, *files]
        folded = name.casefold()
        if any(
            unicodedata.normalize("NFC", entry).casefold() == folded for entry in listed
        ):
            return self._finds(posixpath.join(path, name))
        return False

    def _finds(self, name: str) -> bool:
        """Whether the server finds ``name`` itself, for a listing that has it only
        in another case: a server that ignores case (Windows) writes an upload of
        it over that entry. A server that cannot say is taken to find it."""
        connection = self._connection
        try:
            if "MLST" in self._features:
                connection.sendcmd(f"MLST {name}")
            else:
                connection.voidcmd("TYPE I")
                connection.size(name)
        except ftplib.error_perm as exc:
            return not str(exc).startswith("550")
        return True

    def exists(self, name: str) -> bool:
        if self.allow_overwrite:
            return False
        self._start_connection()
        self._check_name(name)
        directory, basename = posixpath.split(name)
        try:
            return self._holds(directory, basename)
        except ftplib.error_perm as exc:
            # Servers answer a listing of a missing folder with 550 or 501, and
            # other refusals with the same codes: ask whether the folder is there.
            if directory and not self.exists(directory):
                return False
            raise FTPStorageException(
                f"Error when testing existence of {name}: {exc}"
            ) from exc
        except ftplib.all_errors as exc:
            raise FTPStorageException(
                f"Error when testing existence of {name}"
            ) from exc

    def size(self, name: str) -> int:
        self._start_connection()
        directory, basename = posixpath.split(name)
        _dirs, files = self._get_dir_details(directory)
        listed = _entry(files, basename)
        if listed is None:
            raise FileNotFoundError(f"{name!r} is not on the FTP server")
        return files[listed]

    def url(self, name: str) -> str:
        if self.base_url is None:
            raise ValueError("This file is not accessible via a URL.")
        return str(urljoin(self.base_url, filepath_to_uri(name)))


def _negotiate(connection: ftplib.FTP) -> frozenset[str]:
    """The server's features (``FEAT``, RFC 2389), UTF-8 names switched on
    where it announces them (some servers want ``OPTS UTF8 ON`` first)."""
    try:
        reply = connection.sendcmd("FEAT")
    except ftplib.error_perm:  # a server from before RFC 2389
        return frozenset()
    features = frozenset(
        line.split()[0].upper() for line in reply.splitlines()[1:-1] if line.strip()
    )
    if "UTF8" in features:
        # Refused by servers that are always in UTF-8 (pyftpdlib answers 200).
        with contextlib.suppress(ftplib.error_perm):
            connection.sendcmd("OPTS UTF8 ON")
    return features
