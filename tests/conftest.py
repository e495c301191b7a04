from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.storage import FileSystemStorage
from django.core.management import ManagementUtility
from django.utils.module_loading import import_string

from queued_storage import adoption, breaker, claim_size, mirror_backfill, registry
from queued_storage.backends import (
    QueuedAzureStorage,
    QueuedFTPStorage,
    QueuedGoogleCloudStorage,
    QueuedLibCloudStorage,
    QueuedS3Storage,
    QueuedSFTPStorage,
    QueuedStorage,
)
from queued_storage.stats import DrainStats
from queued_storage.worker import drain
from tests.helpers import (
    FS,
    NEW_URL,
    OLD_URL,
    S3,
    Clock,
    GenerationClock,
    storages_for,
)
from tests.s3 import S3_OPTIONS, make_bucket, moto_s3_server, s3_client
from tests.servers import (
    AZURE_CONTAINER,
    GCS_BUCKET,
    GCS_PROJECT,
    LIBCLOUD_CONTAINER,
    MEMORY,
    FTPServerInfo,
    Remote,
    SFTPServerInfo,
    azurite_blob,
    configure_ftp,
    configure_sftp,
    configure_storage,
    disconnect_ftp,
    django_storage_remote,
    ftp_read,
    ftp_server,
    gcs_emulator,
    sftp_read,
    sftp_server,
)
from tests.storages import (
    GatedStorage,
    HangingStorage,
    PausingStorage,
    WindowStorage,
)
from tests.tools import require_module

# The 0.8 site of tests/test_legacy08.py has settings and a test suite of its
# own, run in processes of their own.
collect_ignore = ["legacy08"]
# The any_database marker and its deselection on the matrix's server legs.
pytest_plugins = ["tests.legs", "tests.flushing"]

_keys = itertools.count()


@pytest.fixture
def tmp_media(tmp_path: Path, settings: Any) -> Path:
    """Point MEDIA_ROOT at a fresh directory for this test."""
    media = tmp_path / "media"
    media.mkdir()
    settings.MEDIA_ROOT = str(media)
    return media


@pytest.fixture(autouse=True)
def fresh_storages(
    request: pytest.FixtureRequest, tmp_path: Path, settings: Any
) -> dict[str, Path]:
    """Every test gets empty local and remote directories behind the
    ``queued_local``/``queued_remote`` aliases the test models use. A module
    whose worker process runs for the whole module (tests/test_celery.py) asks
    for a module-scoped ``shared_dirs`` fixture: its directories are used."""
    if "shared_dirs" in request.fixturenames:
        dirs: dict[str, Path] = request.getfixturevalue("shared_dirs")
    else:
        dirs = {"local": tmp_path / "local", "remote": tmp_path / "remote"}
    settings.STORAGES = storages_for(dirs, settings.STORAGES)
    return dirs


@pytest.fixture(autouse=True)
def adopted_storages(request: pytest.FixtureRequest, monkeypatch: Any) -> None:
    """The tests' storages are new sites: each test's remote holds nothing from
    before the ledger, so every storage counts as adopted and no save asks its
    remote. Tests of the storage that is not adopted yet (a 0.8 site's) are marked
    ``not_adopted`` and see what the ledger says."""
    if request.node.get_closest_marker("not_adopted") is None:
        monkeypatch.setattr(adoption, "is_adopted", lambda db, key: True)


@pytest.fixture
def make_storage(tmp_path: Path) -> Iterator[Callable[..., QueuedStorage]]:
    """Build a QueuedStorage on two directories of this test, with a unique key.

    ``remote`` names a storage class (default: the counting FileSystemStorage); the
    test suite's file system storages (any FileSystemStorage under ``tests.``) get
    a directory of their own, any other gets ``remote_options`` as given. ``local`` names the local storage's class, a FileSystemStorage.
    Other keyword arguments go to QueuedStorage."""
    built: list[str] = []

    def make(
        remote: str = "tests.storages.CountingStorage",
        remote_options: dict[str, Any] | None = None,
        local_options: dict[str, Any] | None = None,
        local: str = FS,
        **kwargs: Any,
    ) -> QueuedStorage:
        number = next(_keys)
        kwargs.setdefault("key", f"test-{number}")
        if remote == FS or (
            remote.startswith("tests.")
            and issubclass(import_string(remote), FileSystemStorage)
        ):
            remote_options = {
                "location": str(tmp_path / f"remote{number}"),
                "base_url": "https://remote.example/",
                **(remote_options or {}),
            }
        storage = QueuedStorage(
            local,
            remote,
            local_options={
                "location": str(tmp_path / f"local{number}"),
                "base_url": "/media/",
                **(local_options or {}),
            },
            remote_options=remote_options,
            **kwargs,
        )
        built.append(storage.key)
        return storage

    yield make
    for key in built:
        registry.forget(key)
        adoption.forget(key)


@pytest.fixture
def storage(make_storage: Callable[..., QueuedStorage]) -> QueuedStorage:
    return make_storage()


@pytest.fixture
def migrating(
    make_storage: Callable[..., QueuedStorage], tmp_path: Path
) -> tuple[QueuedStorage, QueuedStorage]:
    """A storage on an old remote (URLs under ``OLD_URL``) and its serving mirror
    ``new`` on a new one (``NEW_URL``): a migration under way."""
    new = {"location": str(tmp_path / "new-remote"), "base_url": NEW_URL}
    storage = make_storage(
        remote=FS,
        remote_options={"base_url": OLD_URL},
        local_options={"allow_overwrite": True},  # a save of a name re-saves it
        mirrors={"new": {"storage": FS, "options": new, "serve": True}},
    )
    return storage, storage.mirrors["new"]


@pytest.fixture
def make_mirrored(
    make_storage: Callable[..., QueuedStorage], tmp_path: Path
) -> Callable[..., QueuedStorage]:
    """make_storage() with mirrors ``names`` (default one, ``backup``), each on a
    directory of its own with a ``mirror`` storage class (CountingStorage) and
    ``mirror_options``; other keyword arguments go to make_storage()."""

    def make(
        names: tuple[str, ...] = ("backup",),
        mirror: str = "tests.storages.CountingStorage",
        mirror_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> QueuedStorage:
        number = next(_keys)
        mirrors = {
            name: {
                "storage": mirror,
                "options": {
                    "location": str(tmp_path / f"mirror{number}-{name}"),
                    "base_url": f"https://{name}.example/",
                    **(mirror_options or {}),
                },
            }
            for name in names
        }
        return make_storage(mirrors=mirrors, **kwargs)

    return make


@pytest.fixture
def window() -> Iterator[type[WindowStorage]]:
    """The local storage whose deletes a test hooks (``local=`` of make_storage)."""
    WindowStorage.before_delete = WindowStorage.after_delete = None
    yield WindowStorage
    WindowStorage.before_delete = WindowStorage.after_delete = None


@pytest.fixture
def gate() -> Iterator[type[GatedStorage]]:
    """A remote whose uploads wait until ``gate.gate.set()``."""
    GatedStorage.entered.clear()
    GatedStorage.gate.clear()
    yield GatedStorage
    GatedStorage.gate.set()


@pytest.fixture
def pausing() -> Iterator[type[PausingStorage]]:
    """A remote that pauses once in the call named by ``pausing.arm(method)``."""
    PausingStorage.arm("")
    yield PausingStorage
    PausingStorage.pause_in = ""
    PausingStorage.break_write_in = None
    PausingStorage.resume.set()


@pytest.fixture
def hanging() -> Iterator[type[HangingStorage]]:
    """A remote whose first upload of each name in ``hanging.hang`` hangs until
    ``hanging.released.set()``."""
    HangingStorage.hang = set()
    for event in (HangingStorage.entered, HangingStorage.released):
        event.clear()
    HangingStorage.returned.clear()
    HangingStorage.hanging = HangingStorage.most = 0
    yield HangingStorage
    HangingStorage.released.set()


@pytest.fixture
def whole_batch_claims(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every claim takes up to the batch size and keeps its unstarted rows, as
    before claim_size: for tests that need rows claimed and not started (a stop,
    a batch's record), whatever the machine's speed."""
    monkeypatch.setattr(claim_size.ClaimSize, "next", lambda self: self.most)
    monkeypatch.setattr(claim_size, "HAND_BACK_AFTER", float("inf"))


@pytest.fixture
def forget_keys() -> Iterator[list[str]]:
    """Keys of storages a test builds by hand; dropped from the registry after."""
    keys: list[str] = []
    yield keys
    for key in keys:
        registry.forget(key)


@pytest.fixture
def run_drain(django_capture_on_commit_callbacks: Any) -> Callable[..., DrainStats]:
    """drain(), with the after-commit work (signals, local delete) run as it
    would be outside the test's transaction."""

    def run(**kwargs: Any) -> DrainStats:
        with django_capture_on_commit_callbacks(execute=True):
            return drain(**kwargs)

    return run


@pytest.fixture
def no_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pacing's clock, moved only by its pauses (recorded here)."""
    clock = Clock()
    paused: list[float] = []

    def pause(seconds: float) -> None:
        paused.append(seconds)
        clock.advance(seconds)

    monkeypatch.setattr(mirror_backfill, "clock", lambda: clock.now.timestamp())
    monkeypatch.setattr(mirror_backfill, "pause", pause)
    return paused


@pytest.fixture
def manage(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[int, str, str]]:
    """``manage.py <argv>`` run here: the exit status, stdout and stderr. The
    connections it closes at its end are the test's: left open."""
    monkeypatch.setattr(
        "django.core.management.base.connections.close_all", lambda: None
    )
    return lambda *argv: _manage(capsys, *argv)


def _manage(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        ManagementUtility(["manage.py", *argv]).execute()
    except SystemExit as stopped:
        status = stopped.code if isinstance(stopped.code, int) else 1
    else:
        status = 0
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """An S3 API over HTTP on loopback (moto), one for each test module."""
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def make_s3_storage(
    s3_endpoint: str, make_storage: Callable[..., QueuedStorage]
) -> Callable[..., QueuedStorage]:
    """make_storage() with an S3Storage remote on a new bucket of ``s3_endpoint``;
    ``remote_options`` are added to the bucket's."""

    def make(**kwargs: Any) -> QueuedStorage:
        remote_options = {
            **S3_OPTIONS,
            "bucket_name": make_bucket(s3_endpoint),
            "endpoint_url": s3_endpoint,
            **kwargs.pop("remote_options", {}),
        }
        return make_storage(remote=S3, remote_options=remote_options, **kwargs)

    return make


# The remote backends' servers, each on 127.0.0.1 with a port of its own (port 0),
# and their storages as the README's STORAGES examples configure them. A missing
# tool skips loudly (fails under CI=true): see tests/tools.py.


@pytest.fixture(scope="module")
def azurite() -> Iterator[str]:
    """Azurite's blob service with the ``uploads`` container; its connection
    string."""
    blob = require_module("azure.storage.blob")
    with azurite_blob() as connection:
        service = blob.BlobServiceClient.from_connection_string(connection)
        service.create_container(AZURE_CONTAINER)
        yield connection


@pytest.fixture(scope="module")
def gcs_endpoint() -> Iterator[str]:
    """The GCS emulator's JSON API, for ``STORAGE_EMULATOR_HOST``."""
    with gcs_emulator() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def sftp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SFTPServerInfo]:
    base = tmp_path_factory.mktemp("sftp")
    with sftp_server(base / "root", base / "keys") as info:
        yield info


@pytest.fixture
def sftp_storage(
    sftp: SFTPServerInfo, tmp_path: Path, settings: Any
) -> Iterator[QueuedSFTPStorage]:
    storage = configure_sftp(settings, tmp_path, sftp, sftp.known_hosts)
    yield storage
    storage.remote.close()  # type: ignore[attr-defined]
    registry.forget("sftp")


@pytest.fixture
def sftp_client(sftp: SFTPServerInfo) -> Iterator[Any]:
    """paramiko's own SFTP client, on a connection of its own."""
    paramiko = require_module("paramiko")
    ssh = paramiko.SSHClient()
    ssh.load_host_keys(str(sftp.known_hosts))
    ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
    ssh.connect("127.0.0.1", **sftp.params)
    client = ssh.open_sftp()
    yield client
    client.close()
    ssh.close()


@pytest.fixture
def ftp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FTPServerInfo]:
    with ftp_server(tmp_path_factory.mktemp("ftp-root")) as info:
        yield info


@pytest.fixture
def ftp_storage(
    ftp: FTPServerInfo, tmp_path: Path, settings: Any
) -> Iterator[QueuedFTPStorage]:
    storage = configure_ftp(settings, tmp_path, ftp.location)
    yield storage
    disconnect_ftp(storage)
    registry.forget("ftp")


# Each remote backend as tests/test_backends.py runs them all: ``<name>_remote``.


@pytest.fixture
def s3_remote(s3_endpoint: str, tmp_path: Path, settings: Any) -> Iterator[Remote]:
    bucket = make_bucket(s3_endpoint)
    storage = configure_storage(
        settings,
        tmp_path,
        QueuedS3Storage,
        key="s3",
        remote_options={
            **S3_OPTIONS,
            "bucket_name": bucket,
            "endpoint_url": s3_endpoint,
        },
    )
    client = s3_client(s3_endpoint)

    def read(name: str) -> bytes | None:
        try:
            return bytes(client.get_object(Bucket=bucket, Key=name)["Body"].read())
        except client.exceptions.NoSuchKey:
            return None

    yield Remote(
        storage,
        read,
        url_of=lambda name: f"{s3_endpoint}/{bucket}/{name}",
        signed_by="Signature",
        served_over_http=True,
    )
    registry.forget("s3")


@pytest.fixture
def azure_remote(azurite: str, tmp_path: Path, settings: Any) -> Iterator[Remote]:
    blob = require_module("azure.storage.blob")
    container = blob.BlobServiceClient.from_connection_string(
        azurite
    ).get_container_client(AZURE_CONTAINER)
    storage = configure_storage(
        settings,
        tmp_path,
        QueuedAzureStorage,
        key="azure",
        remote_options={
            "connection_string": azurite,
            "azure_container": AZURE_CONTAINER,
            "expiration_secs": 3600,
        },
    )

    def read(name: str) -> bytes | None:
        client = container.get_blob_client(name)
        if not client.exists():
            return None
        return bytes(client.download_blob().readall())

    # A SAS URL on the blob endpoint, which Azurite serves without other auth.
    endpoint = container.url.rsplit(f"/{AZURE_CONTAINER}", 1)[0]
    yield Remote(
        storage,
        read,
        url_of=lambda name: f"{endpoint}/{AZURE_CONTAINER}/{name}",
        signed_by="sig",
        served_over_http=True,
    )
    registry.forget("azure")


@pytest.fixture
def gcs_remote(
    gcs_endpoint: str, tmp_path: Path, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Remote]:
    # google-cloud-storage finds the emulator through STORAGE_EMULATOR_HOST and
    # then uses anonymous credentials.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    gcs = require_module("google.cloud.storage")
    client = gcs.Client(project=GCS_PROJECT)
    found = client.lookup_bucket(GCS_BUCKET)
    if found is not None:
        found.delete(force=True)
    bucket = client.create_bucket(GCS_BUCKET)
    storage = configure_storage(
        settings,
        tmp_path,
        QueuedGoogleCloudStorage,
        key="gcs",
        remote_options={
            "bucket_name": GCS_BUCKET,
            "project_id": GCS_PROJECT,
            "querystring_auth": False,
        },
    )

    def read(name: str) -> bytes | None:
        blob = bucket.get_blob(name)
        return None if blob is None else bytes(blob.download_as_bytes())

    yield Remote(
        storage,
        read,
        url_of=lambda name: f"{gcs_endpoint}/{GCS_BUCKET}/{name}",
        served_over_http=True,
    )
    registry.forget("gcs")


@pytest.fixture
def sftp_remote(sftp_storage: QueuedSFTPStorage, sftp_client: Any) -> Remote:
    return Remote(
        sftp_storage,
        lambda name: sftp_read(sftp_client, f"/uploads/{name}"),
        url_of=lambda name: f"https://files.example.com/{name}",
    )


@pytest.fixture
def ftp_remote(ftp_storage: QueuedFTPStorage, ftp: FTPServerInfo) -> Remote:
    return Remote(
        ftp_storage,
        lambda name: ftp_read(ftp, name),
        url_of=lambda name: f"https://files.example.com/{name}",
    )


@pytest.fixture
def libcloud_remote(tmp_path: Path, settings: Any) -> Iterator[Remote]:
    """Libcloud's own ``LOCAL`` driver, which keeps containers as directories: no
    server, but libcloud's real driver code moves the bytes. (Its cloud drivers
    are the ones the S3, Azure and GCS cases cover through django-storages'
    native backends.)"""
    require_module("fasteners")  # the LOCAL driver's locking
    from libcloud.storage.providers import Provider, get_driver  # type: ignore[attr-defined]
    from libcloud.storage.types import ObjectDoesNotExistError

    root = tmp_path / "libcloud"
    (root / LIBCLOUD_CONTAINER).mkdir(parents=True)
    # The README's example: providers in LIBCLOUD_PROVIDERS, the name in
    # remote_options.
    settings.LIBCLOUD_PROVIDERS = {
        "local": {
            "type": "libcloud.storage.types.Provider.LOCAL",
            "user": str(root),
            "key": None,
            "bucket": LIBCLOUD_CONTAINER,
        }
    }
    storage = configure_storage(
        settings,
        tmp_path,
        QueuedLibCloudStorage,
        key="libcloud",
        remote_options={"provider_name": "local"},
    )
    driver = get_driver(Provider.LOCAL)(str(root))

    def read(name: str) -> bytes | None:
        try:
            stored = driver.get_object(LIBCLOUD_CONTAINER, name)
        except ObjectDoesNotExistError:
            return None
        return b"".join(driver.download_object_as_stream(stored))

    # The LOCAL driver's "CDN URL" is the object's path on disk.
    yield Remote(
        storage, read, url_of=lambda name: str(root / LIBCLOUD_CONTAINER / name)
    )
    registry.forget("libcloud")


@pytest.fixture
def memory_remote(tmp_path: Path, settings: Any) -> Iterator[Remote]:
    """Django's InMemoryStorage: any Storage serves as a remote."""
    yield django_storage_remote(settings, tmp_path, "memory", MEMORY, {})
    registry.forget("memory")


@pytest.fixture
def filesystem_remote(tmp_path: Path, settings: Any) -> Iterator[Remote]:
    yield django_storage_remote(
        settings,
        tmp_path,
        "filesystem",
        FS,
        {"location": str(tmp_path / "filesystem-remote")},
    )
    registry.forget("filesystem")


@pytest.fixture
def breaker_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The circuit breaker's clock, moved by the test (the rows' own due times
    are made due by hand): an outage of hours in no time."""
    ticking = Clock()
    monkeypatch.setattr(breaker, "clock", ticking)
    return ticking


@pytest.fixture
def generation_clock(monkeypatch: pytest.MonkeyPatch) -> GenerationClock:
    """The clock new generations are read from, moved by the test."""
    return GenerationClock(monkeypatch)
