"""Invariant 6, secrets by value: no string of a storage's options, whatever the
option is called, leaves the process in a row, a log line, a signal, an admin
page or a command's output; nor does one that an after-commit callback's error
quotes. Each django-storages backend is built with its real credential options
and made to fail quoting them, as careless client libraries do (no servers)."""

from __future__ import annotations

import errno
import io
import json
import logging
import pathlib
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn
from urllib.parse import quote, quote_plus

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import FileSystemStorage
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client

from queued_storage import redaction, registry
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.signals import file_transferred, transfer_failed
from queued_storage.tasks import Transfer
from queued_storage.worker import drain
from tests.factories import pending_row
from tests.helpers import content
from tests.tools import require_module

pytestmark = pytest.mark.django_db

Make = Callable[..., QueuedStorage]

PEM = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
    "AAAAMwAAAAtzc2gtZWQyNTUxOQAAACDfakefakefake\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
SERVICE_ACCOUNT = json.dumps(
    {
        "type": "service_account",
        "project_id": "demo",
        "private_key_id": "8f4c2d1e9b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e",
        "private_key": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0\n"
        "-----END PRIVATE KEY-----\n",
        "client_email": "uploader@demo.iam.gserviceaccount.com",
    }
)


class Leaks:
    """Mixed into a django-storages class: every call fails with an error that
    quotes the storage's attributes and :attr:`quotes`, as client libraries that
    put their configuration in an error message do."""

    quotes: tuple[str, ...] = ()

    def _leak(self, call: str) -> OSError:
        return OSError(
            f"{call} refused: " + " | ".join(self.quotes) + f" | {vars(self)!r}"
        )

    def exists(self, name: str) -> bool:
        raise self._leak(f"exists({name!r})")

    def _save(self, name: str, content: Any) -> str:
        raise self._leak(f"save({name!r})")

    def delete(self, name: str) -> None:
        raise self._leak(f"delete({name!r})")


def leaky(path: str) -> str:
    """The dotted path of a :class:`Leaks` subclass of the storage at ``path``."""
    module, _dot, name = path.rpartition(".")
    upstream = getattr(require_module(module), name)
    cls = type(f"Leaky{name}", (Leaks, upstream), {"__module__": __name__})
    setattr(sys.modules[__name__], cls.__name__, cls)
    return f"{__name__}.{cls.__name__}"


def google_credentials() -> Any:
    credentials = require_module("google.oauth2.credentials")
    return credentials.Credentials(
        token="ya29.a0AfH6SMBx-access-token",
        refresh_token="1//0gRefresh-token-value",
        client_id="1234.apps.googleusercontent.com",
        client_secret="GOCSPX-client-secret-value",
        token_uri="https://oauth2.googleapis.com/token",
    )


#: backend -> (class path, options, the texts that must never leave, settings)
BACKENDS: dict[str, Callable[[], tuple[str, dict[str, Any], list[str], dict[str, Any]]]]
BACKENDS = {
    "s3": lambda: (
        "storages.backends.s3.S3Storage",
        {
            "bucket_name": "media",
            "access_key": "AKIAIOSFODNN7EXAMPLE",
            "secret_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "security_token": "FwoGZXIvYXdzEJr//////////wEaDSecurity",
            "endpoint_url": "https://minio:endpoint-Passw0rd@s3.example.com",
            "object_parameters": {"SSECustomerKey": "c3NlLWN1c3RvbWVyLWtleQ=="},
        },
        [
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "FwoGZXIvYXdzEJr//////////wEaDSecurity",
            "endpoint-Passw0rd",
            "c3NlLWN1c3RvbWVyLWtleQ==",
        ],
        {},
    ),
    "azure": lambda: (
        "storages.backends.azure_storage.AzureStorage",
        {
            "account_name": "mediaacct",
            "account_key": "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsu==",
            "azure_container": "media",
            "connection_string": (
                "DefaultEndpointsProtocol=https;AccountName=mediaacct;"
                "AccountKey=T3RoZXJBY2NvdW50S2V5Rm9yQ29ubg==;"
                "EndpointSuffix=core.windows.net"
            ),
            "sas_token": "sv=2022-11-02&ss=b&srt=co&sp=rwdl&sig=ab%2BcdSASsig%3D",
        },
        [
            "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsu==",
            "T3RoZXJBY2NvdW50S2V5Rm9yQ29ubg==",
            "AccountKey=T3Ro",
            "ab%2BcdSASsig%3D",
            "ab+cdSASsig=",
        ],
        {},
    ),
    "gcs": lambda: (
        "storages.backends.gcloud.GoogleCloudStorage",
        {
            "bucket_name": "media",
            "credentials": google_credentials(),
            "project_id": SERVICE_ACCOUNT,
        },
        [
            "ya29.a0AfH6SMBx-access-token",
            "1//0gRefresh-token-value",
            "GOCSPX-client-secret-value",
            "8f4c2d1e9b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e",
            "MIIEvQIBADANBgkqhkiG9w0",
            SERVICE_ACCOUNT,
        ],
        {},
    ),
    "sftp": lambda: (
        "storages.backends.sftpstorage.SFTPStorage",
        {
            "host": "sftp://deploy:sftp-host-pw@sftp.example",
            "root_path": "/uploads",
            "params": {
                "username": "deploy",
                "password": "pw-2x",
                "pkey": PEM,
                "passphrase": "key-passphrase-9",
            },
        },
        [
            "sftp-host-pw",
            "'password': 'pw-2x'",
            "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ",
            "key-passphrase-9",
        ],
        {},
    ),
    "ftp": lambda: (
        "storages.backends.ftp.FTPStorage",
        {"location": "ftp://user:Pa55-ftp-w0rd@ftp.example:21/"},
        ["Pa55-ftp-w0rd"],
        {},
    ),
    "ftp-short-password": lambda: (
        "storages.backends.ftp.FTPStorage",
        {"location": "ftp://user:pass@host:21/"},
        ["user:pass@", "'passwd': 'pass'"],
        {},
    ),
    "dropbox": lambda: (
        "storages.backends.dropbox.DropboxStorage",
        {
            "oauth2_access_token": "sl.BAccess-token-0123456789",
            "oauth2_refresh_token": "refresh-token-0123456789",
            "app_key": "dbx-app-key-1",
            "app_secret": "dbx-app-secret-1",
            "root_path": "/site",
        },
        [
            "sl.BAccess-token-0123456789",
            "refresh-token-0123456789",
            "dbx-app-key-1",
            "dbx-app-secret-1",
        ],
        {},
    ),
    "libcloud": lambda: (
        "storages.backends.apache_libcloud.LibCloudStorage",
        {"provider_name": "leaky"},
        ["libcloud-secret-key-0123"],
        {
            "LIBCLOUD_PROVIDERS": {
                "leaky": {
                    "type": "libcloud.storage.types.Provider.S3",
                    "user": "AKIALIBCLOUDEXAMPLE",
                    "key": "libcloud-secret-key-0123",
                    "bucket": "media",
                }
            }
        },
    ),
}


@pytest.fixture
def failed_signals() -> Iterator[list[dict[str, Any]]]:
    """What ``transfer_failed`` receivers get; the receiver then fails quoting the
    error it was given and the storage's remote options."""
    received: list[dict[str, Any]] = []

    def receiver(**kwargs: Any) -> None:
        received.append(kwargs)
        storage = kwargs["storage"]
        raise RuntimeError(f"receiver failed on {storage.remote_options!r}")

    transfer_failed.connect(receiver, weak=False)
    yield received
    transfer_failed.disconnect(receiver)


def run(command: str, *args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command(command, *args, stdout=out, stderr=err)
    except CommandError as exc:
        err.write(str(exc))
    return out.getvalue() + err.getvalue()


@pytest.mark.parametrize("via", ["options", "alias"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_invariant_6_no_credential_of_a_django_storages_remote_leaves_the_process(
    backend: str,
    via: str,
    make_storage: Make,
    settings: Any,
    caplog: pytest.LogCaptureFixture,
    admin_client: Client,
    failed_signals: list[dict[str, Any]],
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, options, secrets, extra_settings = BACKENDS[backend]()
    for setting, value in extra_settings.items():
        setattr(settings, setting, value)
    settings.QUEUED_STORAGE_RETRIES = 0
    remote = leaky(path)
    monkeypatch.setattr(Leaks, "quotes", tuple(secrets))
    if via == "alias":
        settings.STORAGES = {
            **settings.STORAGES,
            "leaky": {"BACKEND": remote, "OPTIONS": options},
        }
        storage = make_storage(remote="leaky", create_only_uploads=False)
    else:
        storage = make_storage(
            remote=remote, remote_options=options, create_only_uploads=False
        )
    name = storage.save("report.txt", content())
    verified = pending_row(storage_key=storage.key, status=PendingTransfer.Status.DONE)

    with caplog.at_level(logging.DEBUG):
        with django_capture_on_commit_callbacks(execute=True):
            worker = run("process_transfers", "--json")
        outputs = {
            "process_transfers": worker,
            "transfer_status": run("transfer_status"),
            "transfer_status --json": run("transfer_status", "--json"),
            "verify_transfers --json": run("verify_transfers", "--json"),
            "verify_transfers": run("verify_transfers", "-v", "2"),
            "clean_local_copies": run("clean_local_copies", "--dry-run", "-v", "2"),
        }
        row = PendingTransfer.objects.get(storage_key=storage.key, name=name)
        outputs |= {
            "admin list": admin_client.get(
                "/admin/queued_storage/pendingtransfer/"
            ).content.decode(),
            "admin row": admin_client.get(
                f"/admin/queued_storage/pendingtransfer/{row.pk}/change/"
            ).content.decode(),
            "admin verified row": admin_client.get(
                f"/admin/queued_storage/pendingtransfer/{verified.pk}/change/"
            ).content.decode(),
        }

    outputs |= {
        "rows": repr(
            list(PendingTransfer.objects.filter(storage_key=storage.key).values())
        ),
        "logs": caplog.text,
        "signal": repr(failed_signals),
        "describe": storage.describe(),
    }
    for where, text in outputs.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked in {where}"
    # Each exit did carry the error, redacted.
    assert row.status == PendingTransfer.Status.FAILED
    assert "[redacted]" in row.last_error
    assert len(failed_signals) == 1
    assert "[redacted]" in failed_signals[0]["error"]
    assert "receiver failed on" in caplog.text
    assert "[redacted]" in outputs["verify_transfers --json"]


class HookThatCannotStart(Transfer):
    def __init__(self) -> None:
        raise RuntimeError("hook config: " + SECRET)


SECRET = "after-commit-secret-0123456789"


def test_invariant_6_after_commit_failures_are_logged_redacted(
    make_storage: Make,
    settings: Any,
    caplog: pytest.LogCaptureFixture,
    django_capture_on_commit_callbacks: Any,
) -> None:
    """A ``file_transferred`` receiver, the purge after ``delete()`` and a wake-up
    that fail quoting a secret are logged redacted; Django would log their error
    as it is, with a traceback (an after-commit callback's, and a receiver's that
    ``send_robust()`` caught)."""
    storage = make_storage(
        remote="tests.storages.DeleteRefusingRemote",
        remote_options={"api_secret": SECRET},
    )
    name = storage.save("a.txt", content())

    def receiver(**kwargs: Any) -> None:
        raise ValueError(f"receiver saw {kwargs['storage'].remote_options}")

    file_transferred.connect(receiver, weak=False)
    try:
        with caplog.at_level(logging.DEBUG):
            with django_capture_on_commit_callbacks(execute=True):
                assert drain().done == 1
            with django_capture_on_commit_callbacks(execute=True):
                storage.delete(name)
            settings.QUEUED_STORAGE_WORKER = "immediate"
            woken = make_storage(
                remote="tests.storages.DeleteRefusingRemote",
                remote_options={"api_secret": SECRET},
                task="tests.test_redaction.HookThatCannotStart",
            )
            with django_capture_on_commit_callbacks(execute=True):
                woken.save("b.txt", content())

            def purge_elsewhere() -> None:
                raise PermissionError(f"refused with {SECRET}")

            with django_capture_on_commit_callbacks(execute=True):
                redaction.after_commit("default", purge_elsewhere)
    finally:
        file_transferred.disconnect(receiver)

    assert SECRET not in caplog.text
    assert "error=ValueError: receiver saw {" in caplog.text
    # The purge records its failure on the tombstone (due again for a worker).
    assert "name=a.txt attempt=1 status=queued error=PermissionError" in caplog.text
    assert "after-commit work failed callback=" in caplog.text
    assert "purge_elsewhere error=PermissionError: refused with [redacted]" in (
        caplog.text
    )
    assert not [r for r in caplog.records if r.name.startswith("django.db")]


def test_every_option_string_is_a_secret_by_value_whatever_its_name() -> None:
    options = {
        "endpoint": "https://files.example/api",
        "nested": {"deeper": [("plain", "tuple-secret-1")], "short": "media"},
        "auth": ("deploy", "pw9"),
        "conn": "Server=db;Uid=app;Pwd=x7;Extra=long-connection-part",
        "url": "sftp://deploy:hunter2@files.example:22/",
        "json": '{"client": {"refresh": "json-nested-secret"}}',
        "pem": PEM,
        "location": pathlib.Path("/srv/media"),
        "region": "eu-west-1",
    }
    secrets = redaction.options_secrets(options)
    text = (
        "GET https://files.example/api failed: tuple-secret-1, pw9, Pwd=x7, "
        "long-connection-part, hunter2, json-nested-secret, "
        "AAAAMwAAAAtzc2gtZWQyNTUxOQAAACDfakefakefake, "
        "https%3A%2F%2Ffiles.example%2Fapi, in /srv/media/a.txt (media, eu-west-1), "
        "the password was wrong"
    )
    redacted = redaction.redact_with(secrets, text)
    for secret in (
        "files.example/api",
        "tuple-secret-1",
        "Pwd=x7",
        "long-connection-part",
        "hunter2",
        "json-nested-secret",
        "AAAAMwAAAAtzc2gtZWQyNTUxOQAAACDfakefakefake",
        "eu-west-1",
    ):
        assert secret not in redacted
    # Short strings that do not stand as a secret, and a Path, stay readable.
    assert "in /srv/media/a.txt (media, " in redacted
    assert "the password was wrong" in redacted


def test_a_secret_containing_another_is_replaced_whole() -> None:
    secrets = {"abcdefgh", "abcdefgh-and-more", "xyzabcde"}
    assert redaction.redact_with(secrets, "<abcdefgh-and-more>") == "<[redacted]>"
    # Overlapping secrets leave no piece of either behind.
    assert redaction.redact_with(secrets, "<xyzabcdefgh>") == "<[redacted]>"


def test_the_storage_key_and_paths_are_never_redacted(make_storage: Make) -> None:
    storage = make_storage(
        key="media-primary", remote_options={"bucket": "media-primary"}
    )
    assert storage.redact("key=media-primary failed") == "key=media-primary failed"


def test_admin_redacts_errors_that_a_row_kept_from_before(
    make_storage: Make, admin_client: Client
) -> None:
    """A row written by an older version, or a process that did not know the
    storage, may hold a secret: the admin shows it redacted all the same."""
    secret = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsu=="
    storage = make_storage(
        remote="tests.storages.KeyedRemote", remote_options={"secret_key": secret}
    )
    row = pending_row(
        storage_key=storage.key,
        status=PendingTransfer.Status.FAILED,
        last_error=f"OSError: denied for AccountKey={secret}",
        error_history=[
            {"attempt": 1, "at": "", "error": "OSError", "message": f"denied {secret}"}
        ],
    )
    pages = [
        admin_client.get("/admin/queued_storage/pendingtransfer/").content.decode(),
        admin_client.get(
            f"/admin/queued_storage/pendingtransfer/{row.pk}/change/"
        ).content.decode(),
    ]
    for page in pages:
        assert "OSError: denied for AccountKey=[redacted]" in page
        assert secret[:20] not in page


#: An AWS-style secret with non-ASCII letters, slashes and plus signs.
AWS_LIKE = "wJalr\u00c4XUtn/FEMI+K7MDENG/bPx\u00f6RfiCY"


@pytest.mark.parametrize(
    "quoted",
    [
        repr(AWS_LIKE.encode()),  # an error that shows the bytes it sent
        quote(AWS_LIKE),  # a path keeps its "/"
        quote_plus(AWS_LIKE),
    ],
    ids=["utf8-bytes-repr", "url-quoted-path", "url-quoted-form"],
)
def test_a_secret_quoted_as_its_utf8_bytes_or_url_encoded_keeping_slashes_is_redacted(
    quoted: str,
) -> None:
    secrets = redaction.options_secrets({"credentials": {"secret": AWS_LIKE}})

    text = redaction.redact_with(secrets, f"request failed: body={quoted} (retry)")

    assert "[redacted]" in text
    assert not any(piece in text for piece in ("wJalr", "FEMI", "K7MDENG", "RfiCY"))


def test_a_url_with_a_password_given_as_a_storage_is_redacted_from_check_and_errors(
    settings: Any,
) -> None:
    """A URL put where a dotted path or an alias belongs: ``manage.py check`` and
    the error at first use quoted it whole, password included."""
    url = "sftp://deploy:hunter2-sftp-pass@files.example/"
    settings.STORAGES = {
        **settings.STORAGES,
        "misconfigured": {
            "BACKEND": "queued_storage.backends.QueuedStorage",
            "OPTIONS": {"local": "queued_local", "remote": url},
        },
    }
    with pytest.raises(CommandError) as checked:
        call_command("check", stdout=io.StringIO(), stderr=io.StringIO())
    storage = QueuedStorage("queued_local", url, key="misconfigured")
    registry.forget(storage.key)
    with pytest.raises(ImproperlyConfigured) as raised:
        storage.exists("a.txt")

    check_output = str(checked.value)
    assert "queued_storage.E001" in check_output
    assert "deploy:[redacted]@files.example" in check_output
    assert "hunter2" not in check_output
    error = "".join(traceback.format_exception(raised.value))
    assert "deploy:[redacted]@files.example" in error
    assert "hunter2" not in error


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_an_error_raised_to_the_caller_quotes_no_credential_of_the_remote(
    backend: str, make_storage: Make, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``exists()`` of a name the ledger has never seen asks the remote: what the
    remote raised reached the application (and its request log, its error
    tracker) with the credentials in it."""
    path, options, secrets, extra_settings = BACKENDS[backend]()
    for setting, value in extra_settings.items():
        setattr(settings, setting, value)
    monkeypatch.setattr(Leaks, "quotes", tuple(secrets))
    storage = make_storage(remote=leaky(path), remote_options=options)

    with pytest.raises(OSError) as raised:
        storage.exists("never-saved.txt")

    text = "".join(traceback.format_exception(raised.value))
    assert "[redacted]" in text
    for secret in secrets:
        assert secret not in text


TOKEN = "tok-3f9a1c77e2b54d0c"


class RefusingRemote(FileSystemStorage):
    """A remote whose reads fail quoting its token in an ``OSError``'s message
    and file name, raised from the client's own error that quotes it too."""

    def __init__(self, api_token: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.api_token = api_token

    def _refuse(self, name: str) -> NoReturn:
        try:
            raise ValueError(f"the client sent token {self.api_token}")
        except ValueError as exc:
            raise PermissionError(
                errno.EACCES,
                f"denied for token {self.api_token}",
                f"{name}?token={self.api_token}",
            ) from exc

    def exists(self, name: str) -> bool:
        self._refuse(name)

    def size(self, name: str) -> int:
        self._refuse(name)

    def url(self, name: str | None) -> str:
        self._refuse(str(name))

    def listdir(self, path: str) -> tuple[list[str], list[str]]:
        self._refuse(path)

    def get_modified_time(self, name: str) -> Any:
        self._refuse(name)

    def _open(self, name: str, mode: str = "rb") -> Any:
        self._refuse(name)


@pytest.mark.parametrize(
    "call",
    ["exists", "size", "url", "open", "listdir", "get_modified_time"],
)
def test_a_remote_error_keeps_its_type_and_quotes_no_secret_in_its_chain(
    call: str, make_storage: Make, tmp_path: pathlib.Path
) -> None:
    storage = make_storage(
        remote=f"{__name__}.RefusingRemote",
        remote_options={"location": str(tmp_path / "refusing"), "api_token": TOKEN},
    )
    method = getattr(storage, call)

    with pytest.raises(PermissionError) as raised:
        method("" if call == "listdir" else "never-saved.txt")

    assert raised.value.errno == errno.EACCES
    text = "".join(traceback.format_exception(raised.value))
    assert TOKEN not in text
    assert "denied for token [redacted]" in text
    assert "the client sent token [redacted]" in text


def test_a_secret_in_json_after_a_credentials_object_is_found_on_every_walk() -> None:
    """The walk remembered what it had looked into by id alone: the copy of a
    credentials object's attributes, freed once walked, left its id to the
    service account JSON parsed next, which was skipped as seen (its key id and
    private key went unredacted from the second storage built on)."""
    for _walk in range(5):
        _path, options, secrets, _settings = BACKENDS["gcs"]()
        found = redaction.options_secrets(options)
        assert set(secrets) <= found


def test_queue_transfers_check_remote_fails_without_quoting_the_remotes_credentials(
    make_storage: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backfill asks the remote about each local file itself, not through
    the storage's methods: what the remote raised left the command (and
    manage.py's traceback) with the credentials in it."""
    path, options, secrets, _settings = BACKENDS["s3"]()
    monkeypatch.setattr(Leaks, "quotes", tuple(secrets))
    storage = make_storage(remote=leaky(path), remote_options=options)
    registry.register(storage)  # a storage the site declares
    storage.local.save("from-before.txt", content())

    with pytest.raises(OSError) as raised:
        call_command(
            "queue_transfers",
            "--storage",
            storage.key,
            "--check-remote",
            stdout=io.StringIO(),
            stderr=io.StringIO(),
        )

    text = "".join(traceback.format_exception(raised.value))
    assert "[redacted]" in text
    for secret in secrets:
        assert secret not in text
