"""Real servers for the backend tests, each on 127.0.0.1 with a free port (port 0),
started by a test and stopped after it.

A server whose tool is missing skips its tests with a loud reason; with
``CI=true`` it fails them instead, since CI installs every tool (``make tools``):
see ``tests.tools.missing``.
"""

from __future__ import annotations

import asyncio
import ftplib
import io
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from django.core.files.storage import storages

from queued_storage.backends import QueuedFTPStorage, QueuedSFTPStorage, QueuedStorage
from tests.helpers import FS
from tests.tools import missing, require_module

ROOT = Path(__file__).resolve().parent.parent
#: Where ``make tools`` installs the npm packages (git-ignored).
NODE_PREFIX = ROOT / ".cache" / "node"
START_TIMEOUT = 60.0

#: Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
    "K1SZFPTOtr/KBHBeksoGMGw=="
)


StorageT = TypeVar("StorageT")

#: The Azure container, GCS bucket and project, and libcloud container of the
#: backend tests.
AZURE_CONTAINER = "uploads"
GCS_BUCKET = "uploads"
GCS_PROJECT = "queued-storage-test"
LIBCLOUD_CONTAINER = "uploads"
#: Django's own storages as remotes.
MEMORY = "django.core.files.storage.InMemoryStorage"


def configure_storage(
    settings: Any,
    tmp_path: Path,
    backend: type[StorageT],
    *,
    key: str,
    remote_options: dict[str, Any],
    **options: Any,
) -> StorageT:
    """The README's STORAGES example for ``backend``, its remote pointed at a test
    server: alias ``<key>_queued``, local copies in ``tmp_path / "media"``;
    ``options``, other ``QueuedStorage`` arguments."""
    alias = f"{key}_queued"
    settings.STORAGES = {
        **settings.STORAGES,
        alias: {
            "BACKEND": f"queued_storage.backends.{backend.__name__}",
            "OPTIONS": {
                "local_options": {
                    "location": str(tmp_path / "media"),
                    "base_url": "/media/",
                },
                "remote_options": remote_options,
                "key": key,
                **options,
            },
        },
    }
    storage = storages[alias]
    assert isinstance(storage, backend)
    return storage


# FTP: pyftpdlib


@dataclass
class FTPFaults:
    """What the test FTP server does wrong, on purpose, once each."""

    #: Close the session once the next upload's first chunk is written: the
    #: server keeps the partial file, as pyftpdlib (and most servers) do.
    drop_next_upload: bool = False


@dataclass(frozen=True)
class FTPServerInfo:
    port: int
    user: str
    password: str
    root: Path
    faults: FTPFaults

    @property
    def location(self) -> str:
        """django-storages' ``FTPStorage`` location URL."""
        return f"ftp://{self.user}:{self.password}@127.0.0.1:{self.port}/"


@contextmanager
def ftp_server(
    root: Path,
    user: str = "uploader",
    password: str = "s3cr3t-ftp",
    *,
    encoding: str = "utf8",
    mlsd: bool = True,
    filesystem: Any = None,
) -> Iterator[FTPServerInfo]:
    """pyftpdlib serving ``root`` to one user, in a thread. It reads names in
    ``encoding``, and announces UTF-8 (``FEAT UTF8``) only for ``utf8``; without
    ``mlsd`` it lists with ``LIST`` only, as older servers do; ``filesystem``, a
    subclass of pyftpdlib's ``AbstractedFS``, stands for the server's disk."""
    with warnings.catch_warnings():
        # pyftpdlib is built on asyncore/asynchat, deprecated in Python 3.11.
        warnings.simplefilter("ignore", DeprecationWarning)
        require_module("pyftpdlib")
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import DTPHandler, FTPHandler
        from pyftpdlib.ioloop import IOLoop
        from pyftpdlib.servers import FTPServer

    root.mkdir(parents=True, exist_ok=True)
    authorizer = DummyAuthorizer()
    authorizer.add_user(user, password, str(root), perm="elradfmwMT")
    faults = FTPFaults()

    class FaultyDTPHandler(DTPHandler):
        def handle_read(self) -> None:
            super().handle_read()
            if self.receive and faults.drop_next_upload and self.tot_bytes_received:
                faults.drop_next_upload = False
                self.cmd_channel.close()

        handle_read_event = handle_read  # pyftpdlib calls the alias

    # A failed login answers at once instead of after pyftpdlib's 3 s penalty.
    handler = type(
        "TestFTPHandler",
        (FTPHandler,),
        {
            "authorizer": authorizer,
            "auth_failed_timeout": 0,
            "encoding": encoding,
            "dtp_handler": FaultyDTPHandler,
            **({"abstracted_fs": filesystem} if filesystem is not None else {}),
            **(
                {}
                if mlsd
                else {
                    "proto_cmds": {
                        cmd: info
                        for cmd, info in FTPHandler.proto_cmds.items()
                        if cmd not in ("MLSD", "MLST")
                    }
                }
            ),
        },
    )
    # A loop of its own: pyftpdlib's default is one per process, which two
    # servers in two threads would share.
    server = FTPServer(("127.0.0.1", 0), handler, ioloop=IOLoop())
    port = server.socket.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        try:
            while not stop.is_set():
                server.serve_forever(timeout=0.05, blocking=False, handle_exit=False)
        finally:
            server.close_all()

    thread = threading.Thread(target=serve, name="test-ftp-server", daemon=True)
    thread.start()
    try:
        yield FTPServerInfo(port, user, password, root, faults)
    finally:
        stop.set()
        thread.join(10)


# SFTP: asyncssh's SSH server with its SFTP subsystem, chrooted to a directory


@dataclass(frozen=True)
class SFTPServerInfo:
    port: int
    user: str
    root: Path
    client_key: Path
    known_hosts: Path

    @property
    def params(self) -> dict[str, Any]:
        """django-storages' ``SFTPStorage`` ``params`` (paramiko's ``connect()``)."""
        return {
            "port": self.port,
            "username": self.user,
            "key_filename": str(self.client_key),
            "allow_agent": False,
            "look_for_keys": False,
            "timeout": 10,
        }


@contextmanager
def sftp_server(
    root: Path, keys_dir: Path, user: str = "uploader"
) -> Iterator[SFTPServerInfo]:
    """An SSH server that accepts one client key and serves SFTP in ``root``.

    The host key goes into a known_hosts file, so the client verifies the server
    as a production configuration should."""
    asyncssh = require_module("asyncssh")
    root.mkdir(parents=True, exist_ok=True)
    keys_dir.mkdir(parents=True, exist_ok=True)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key_path = keys_dir / "id_ed25519"
    client_key.write_private_key(str(client_key_path), "openssh")
    client_key_path.chmod(0o600)
    authorized = asyncssh.import_authorized_keys(
        client_key.export_public_key("openssh").decode()
    )

    # Every connection the server accepted, for stop() to close: a client that
    # closed its socket may not have reached the server yet.
    connections: list[Any] = []

    class Server(asyncssh.SSHServer):  # type: ignore[name-defined]
        def connection_made(self, conn: Any) -> None:
            connections.append(conn)

        def begin_auth(self, username: str) -> bool:
            return True  # the key decides

    def sftp_factory(chan: Any) -> Any:
        return asyncssh.SFTPServer(chan, chroot=str(root).encode())

    loop = asyncio.new_event_loop()
    thread = threading.Thread(
        target=loop.run_forever, name="test-sftp-server", daemon=True
    )
    thread.start()

    async def start() -> Any:
        return await asyncssh.listen(
            "127.0.0.1",
            0,
            server_factory=Server,
            server_host_keys=[host_key],
            authorized_client_keys=authorized,
            sftp_factory=sftp_factory,
            allow_scp=False,
        )

    async def stop(acceptor: Any) -> None:
        acceptor.close()
        await acceptor.wait_closed()
        for conn in connections:
            conn.abort()
            await conn.wait_closed()

    acceptor = asyncio.run_coroutine_threadsafe(start(), loop).result(START_TIMEOUT)
    try:
        port = acceptor.sockets[0].getsockname()[1]
        known_hosts = keys_dir / "known_hosts"
        public = host_key.export_public_key("openssh").decode().strip()
        known_hosts.write_text(f"[127.0.0.1]:{port} {public}\n")
        yield SFTPServerInfo(port, user, root, client_key_path, known_hosts)
    finally:
        asyncio.run_coroutine_threadsafe(stop(acceptor), loop).result(START_TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# Azure Blob: Azurite, from the npm registry


def azurite_command() -> list[str]:
    """The azurite-blob executable: $AZURITE_BLOB, ``make tools``' copy, or PATH."""
    candidates = [
        os.environ.get("AZURITE_BLOB", ""),
        str(NODE_PREFIX / "node_modules" / ".bin" / "azurite-blob"),
        shutil.which("azurite-blob") or "",
    ]
    found = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if found is None:
        missing(
            "Azurite (npm package 'azurite') is not installed in "
            f"{NODE_PREFIX} nor on PATH; install it with `make tools`"
        )
    if shutil.which("node") is None:
        missing("Azurite needs Node.js, and `node` is not on PATH")
    return [found]


@contextmanager
def azurite_blob() -> Iterator[str]:
    """Azurite's blob service in memory; yields its connection string."""
    command = [
        *azurite_command(),
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        "0",
        "--inMemoryPersistence",
        "--extentMemoryLimit",
        "256",
        "--skipApiVersionCheck",
        "--loose",
        "--disableTelemetry",
        "--silent",
    ]
    with tempfile.TemporaryDirectory(prefix="azurite-") as workdir:
        endpoint = None
        with server_process(command, workdir) as lines:
            endpoint = wait_for(
                lines,
                re.compile(r"successfully listens on (http://127\.0\.0\.1:\d+)"),
                "Azurite",
            )
            yield (
                "DefaultEndpointsProtocol=http;"
                f"AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};"
            )


# Google Cloud Storage: gcp-storage-emulator (PyPI), in memory, in a thread


@contextmanager
def gcs_emulator() -> Iterator[str]:
    """The emulator's JSON API; yields the endpoint for ``STORAGE_EMULATOR_HOST``."""
    require_module("gcp_storage_emulator")
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    try:
        # The library takes the port but does not report the one port 0 got.
        port = server._api._httpd.server_address[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


# S3: moto in a child process, for tests that measure this process's memory


MOTO_CHILD = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("listening on http://%s:%s" % server.get_host_and_port(), flush=True)
sys.stdin.read()
server.stop()
"""


@contextmanager
def moto_s3_process() -> Iterator[str]:
    """moto's S3 API in a separate Python process; yields its endpoint URL."""
    require_module("moto")
    command = [sys.executable, "-c", MOTO_CHILD]
    with server_process(command, str(ROOT), stdin=True) as lines:
        yield wait_for(
            lines, re.compile(r"listening on (http://127\.0\.0\.1:\d+)"), "moto"
        )


# Child processes


@contextmanager
def server_process(
    command: list[str], cwd: str, *, stdin: bool = False
) -> Iterator[queue.Queue[str | None]]:
    """Run a server process; yield a queue of its output lines; stop it after."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, name="test-server-output", daemon=True)
    reader.start()
    try:
        yield lines
    finally:
        if process.stdin is not None:
            process.stdin.close()
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        reader.join(10)
        if process.stdout is not None:
            process.stdout.close()


def wait_for(
    lines: queue.Queue[str | None], pattern: re.Pattern[str], what: str
) -> str:
    seen: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        match = pattern.search(line)
        if match:
            return match.group(1)
    output = "\n".join(seen[-20:])
    raise RuntimeError(f"{what} did not start within {START_TIMEOUT:.0f} s:\n{output}")


# The remote backends as the shared backend tests see them


@dataclass
class Remote:
    """A queued storage whose remote is one backend on its test server, and how
    to check that backend from outside the package."""

    storage: QueuedStorage
    #: The object's bytes as the service's own client reads them (None: none).
    read: Callable[[str], bytes | None]
    #: The URL the remote serves ``name`` at, without its query.
    url_of: Callable[[str], str]
    #: The query parameter of a signed URL (None: URLs are not signed).
    signed_by: str | None = None
    #: Whether the test server itself serves ``url_of(name)`` over HTTP.
    served_over_http: bool = False


def django_storage_remote(
    settings: Any, tmp_path: Path, key: str, remote: str, options: dict[str, Any]
) -> Remote:
    """A QueuedStorage whose remote is one of Django's own storages."""
    storage = configure_storage(
        settings,
        tmp_path,
        QueuedStorage,
        key=key,
        local=FS,
        remote=remote,
        remote_options={"base_url": f"https://{key}.example/", **options},
    )

    def read(name: str) -> bytes | None:
        if not storage.remote.exists(name):
            return None
        with storage.remote.open(name) as stored:
            return bytes(stored.read())

    return Remote(storage, read, url_of=lambda name: f"https://{key}.example/{name}")


def configure_sftp(
    settings: Any, tmp_path: Path, sftp: SFTPServerInfo, known_hosts: Path
) -> QueuedSFTPStorage:
    """The README's QueuedSFTPStorage example on the test server, its host key
    pinned in ``known_hosts``."""
    return configure_storage(
        settings,
        tmp_path,
        QueuedSFTPStorage,
        key="sftp",
        remote_options={
            "host": "127.0.0.1",
            "params": sftp.params,
            "known_host_file": str(known_hosts),
            "root_path": "/uploads",
            "base_url": "https://files.example.com/",
        },
    )


def sftp_read(client: Any, path: str) -> bytes | None:
    """The file's bytes as paramiko's ``client`` reads them (None: no file)."""
    try:
        with client.open(path, "rb") as remote_file:
            return bytes(remote_file.read())
    except FileNotFoundError:
        return None


def configure_ftp(
    settings: Any,
    tmp_path: Path,
    location: str,
    task: str | None = None,
    **options: Any,
) -> QueuedFTPStorage:
    """The README's QueuedFTPStorage example on the FTP server at ``location``."""
    return configure_storage(
        settings,
        tmp_path,
        QueuedFTPStorage,
        key="ftp",
        remote_options={
            "location": location,
            "base_url": "https://files.example.com/",
            **options,
        },
        **({"task": task} if task else {}),
    )


def disconnect_ftp(storage: QueuedFTPStorage) -> None:
    """Log out the remote FTPStorage, which keeps its connection between calls."""
    remote: Any = storage.remote
    if remote._connection is not None:
        remote.disconnect()


def ftp_client(ftp: FTPServerInfo) -> ftplib.FTP:
    client = ftplib.FTP()
    client.connect("127.0.0.1", ftp.port, timeout=10)
    client.login(ftp.user, ftp.password)
    return client


def ftp_read(ftp: FTPServerInfo, name: str) -> bytes | None:
    """The file's bytes as the FTP server serves them, or None if it has none."""
    client = ftp_client(ftp)
    try:
        buffer = io.BytesIO()
        client.retrbinary(f"RETR {name}", buffer.write)
        return buffer.getvalue()
    except ftplib.error_perm:
        return None
    finally:
        client.quit()
