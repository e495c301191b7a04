"""Celery as the wake-up: a real worker process (and a real beat) on Redis and on
RabbitMQ, against this run's test database.

One worker per broker for the whole module: each test saves files of its own
names into directories the module shares with the worker, and waits for what
the worker records of each task it runs (tests/celery_app.py).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.db import connections, transaction

from queued_storage.models import PendingTransfer
from tests.databases import run_id
from tests.helpers import queued, saved_name, storages_for
from tests.testapp.models import Document, document_storage
from tests.tools import group_members, missing, require_module, stop_group
from tests.workers import ROOT, worker_env

# The worker runs for the whole module: the storages of every test are the
# module's (``shared_dirs``, which conftest's fresh_storages uses when asked).
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.usefixtures("shared_dirs"),
]

Status = PendingTransfer.Status
CELERY_EXTRA = "'django-queued-storage[celery]'"
BROKERS = {
    "redis": os.environ.get(
        "QUEUED_STORAGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"
    ),
    "rabbitmq": os.environ.get(
        "QUEUED_STORAGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"
    ),
}
START_TIMEOUT = 60.0
WAIT_TIMEOUT = 30.0


class Process:
    """A celery process of this module, its output collected by a thread (so a
    full pipe never blocks it), in a process group of its own."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.celery_app", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, text: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if line is None:
                break
            self.output.append(line)
            if text in line:
                return
        self.stop()
        pytest.fail(f"celery did not print {text!r}:\n{self.text()}")

    def text(self) -> str:
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.output.append(line)
        return "".join(self.output[-60:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            stop_group(self.popen, signal.SIGTERM)
        self.reader.join(10)
        # Closed here, not left to the garbage collector (a ResourceWarning).
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self.popen.wait()
        assert group_members(self.popen.pid) == []


class Worker:
    """The module's worker: its broker, queue and the log of the tasks it ran."""

    def __init__(
        self, kind: str, url: str, settings: dict[str, Any], log: Path
    ) -> None:
        from celery import Celery

        self.kind = kind
        self.url = url
        self.settings = settings
        self.log = log
        self.queue = settings["CELERY_TASK_DEFAULT_QUEUE"]
        # This process's app: what a site's web process has, sending to the queue
        # the worker consumes.
        self.app = Celery(f"tests-{kind}", set_as_current=False)
        self.app.conf.update(
            broker_url=url,
            task_default_queue=self.queue,
            broker_connection_retry_on_startup=True,
        )
        self.process: Process | None = None

    def start(self, env: dict[str, str]) -> None:
        self.process = Process(
            [
                "worker",
                "--pool=solo",
                "--queues",
                self.queue,
                "--hostname",
                f"{self.queue}@%h",
                "--without-gossip",
                "--without-mingle",
                # Not --without-heartbeat: its timer is what wakes the event loop
                # to notice a SIGTERM, which otherwise takes 10 s on RabbitMQ.
                "--loglevel=INFO",
            ],
            env,
        )
        self.process.wait_for_line(" ready.")

    def runs(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        lines = self.log.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]

    def wait(
        self, until: Callable[[list[dict[str, Any]]], bool], what: str
    ) -> list[dict[str, Any]]:
        """Poll the worker's log until ``until(runs)``; fail with its output."""
        assert self.process is not None
        deadline = time.monotonic() + WAIT_TIMEOUT
        while True:
            runs = self.runs()
            if until(runs):
                return runs
            if self.process.popen.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"the celery worker did not {what}: ran {runs}\n"
                    f"{self.process.text()}"
                )
            time.sleep(0.05)

    def run_marker(self) -> list[dict[str, Any]]:
        """Send a sweep and wait until it ran; returns every run up to it. The
        solo worker runs its one queue in order: what was sent before has run."""
        from queued_storage.integrations.celery import sweep

        marker = sweep.apply_async().id
        runs = self.wait(lambda runs: any(r["id"] == marker for r in runs), "sweep")
        return runs[: next(i for i, r in enumerate(runs) if r["id"] == marker) + 1]


def reachable(url: str) -> str:
    """Why the broker at ``url`` cannot be used, or ``""``."""
    from kombu import Connection  # type: ignore[attr-defined]

    try:
        with Connection(url, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("celery")
    return {"local": root / "local", "remote": root / "remote", "log": root}


@pytest.fixture(scope="module", params=sorted(BROKERS))
def worker(
    request: pytest.FixtureRequest,
    shared_dirs: dict[str, Path],
    django_db_setup: Any,
) -> Iterator[Worker]:
    """A real ``celery worker`` (solo pool) on this broker and a queue of this
    run, on this run's test database."""
    require_module("celery", CELERY_EXTRA)
    from django.conf import settings as django_settings

    kind = request.param
    url = BROKERS[kind]
    problem = reachable(url)
    if problem:
        missing(f"{kind} at {url} is not reachable ({problem}); start it")
    celery_settings = {
        "CELERY_BROKER_URL": url,
        "CELERY_TASK_DEFAULT_QUEUE": f"queued_storage_tests_{run_id()}_{kind}",
        "CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP": True,
    }
    handle = Worker(kind, url, celery_settings, shared_dirs["log"] / f"{kind}.jsonl")
    env = worker_env(
        STORAGES=storages_for(shared_dirs, django_settings.STORAGES), **celery_settings
    )
    env["QUEUED_STORAGE_TEST_CELERY_LOG"] = str(handle.log)
    handle.start(env)
    try:
        yield handle
    finally:
        assert handle.process is not None
        handle.process.stop()
        with handle.app.connection_for_write() as connection:
            connection.default_channel.queue_delete(handle.queue)
        handle.app.close()


@pytest.fixture
def celery(worker: Worker, settings: Any) -> Iterator[Worker]:
    """Celery as the wake-up, sending with the worker's app as ``current_app``."""
    from celery import current_app

    settings.QUEUED_STORAGE_WORKER = "celery"
    previous = current_app._get_current_object()
    worker.app.set_current()
    yield worker
    previous.set_current()


@pytest.fixture
def published(celery: Worker) -> Iterator[list[dict[str, Any]]]:
    """Every message this process handed to the broker."""
    from celery.signals import before_task_publish

    messages: list[dict[str, Any]] = []

    def record(sender: str, body: Any, headers: dict[str, Any], **kwargs: Any) -> None:
        messages.append({"task": sender, "body": body, "headers": headers})

    before_task_publish.connect(record, weak=False)
    yield messages
    before_task_publish.disconnect(record)


def unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}.txt"


def row(name: str) -> PendingTransfer:
    return PendingTransfer.objects.for_name(document_storage.key, name).get()


def wait_for_status(worker: Worker, name: str, status: str) -> PendingTransfer:
    worker.wait(lambda runs: row(name).status == status, f"make {name} {status}")
    return row(name)


def test_a_committed_save_is_transferred_by_the_worker(
    celery: Worker, published: list[dict[str, Any]], shared_dirs: dict[str, Path]
) -> None:
    body = uuid.uuid4().bytes * 100
    document = Document.objects.create(file=ContentFile(body, name=unique("report")))
    name = saved_name(document.file)

    assert wait_for_status(celery, name, Status.DONE).attempts == 1
    assert (shared_dirs["remote"] / name).read_bytes() == body
    assert queued(Document.objects.get(pk=document.pk).file.storage).using_remote(name)
    [message] = published
    assert message["task"] == "queued_storage.transfer"
    args, kwargs, _embed = message["body"]
    assert (list(args), kwargs) == (["documents", name], {})
    # The storages' options (their directories here) never travel.
    sent = json.dumps(message, default=repr)
    assert str(shared_dirs["local"]) not in sent
    assert str(shared_dirs["remote"]) not in sent
    [run] = [r for r in celery.run_marker() if r["id"] == message["headers"]["id"]]
    assert (run["task"], run["args"], run["retval"]) == (
        "queued_storage.transfer",
        ["documents", name],
        "done",
    )


def test_a_rolled_back_save_sends_nothing(
    celery: Worker, published: list[dict[str, Any]], shared_dirs: dict[str, Path]
) -> None:
    before = len(celery.runs())
    with pytest.raises(RuntimeError), transaction.atomic():
        name = document_storage.save(unique("draft"), ContentFile(b"draft"))
        raise RuntimeError("the view failed")

    assert published == []
    ran = celery.run_marker()[before:]
    assert [r["task"] for r in ran] == ["queued_storage.sweep"]
    assert ran[0]["retval"]["done"] == 0
    assert not PendingTransfer.objects.filter(name=name).exists()
    assert not (shared_dirs["remote"] / name).exists()


def test_a_message_delivered_twice_transfers_once(
    celery: Worker, settings: Any, shared_dirs: dict[str, Path]
) -> None:
    """What a redelivery does (an acknowledgement lost, a worker killed after the
    upload): the same message again, before and after the row is done."""
    from queued_storage.integrations.celery import transfer

    settings.QUEUED_STORAGE_WORKER = None  # the test sends the messages itself
    name = document_storage.save(unique("twice"), ContentFile(b"once only"))
    message = str(uuid.uuid4())
    for _ in range(2):
        transfer.apply_async(("documents", name), task_id=message)
    runs = celery.wait(
        lambda runs: sum(r["id"] == message for r in runs) == 2, "run both copies"
    )
    assert [r["retval"] for r in runs if r["id"] == message] == ["done", None]
    done = row(name)
    assert (done.status, done.attempts) == (Status.DONE, 1)
    copy = shared_dirs["remote"] / name
    written = copy.stat().st_mtime_ns

    transfer.apply_async(("documents", name), task_id=message)
    runs = celery.wait(
        lambda runs: sum(r["id"] == message for r in runs) == 3, "run a third copy"
    )
    assert runs[-1]["retval"] is None
    assert (row(name).attempts, copy.stat().st_mtime_ns) == (1, written)
    # No second upload under another name either.
    assert [p.name for p in copy.parent.glob(f"{copy.stem}*")] == [copy.name]


def test_a_lost_message_is_swept_by_the_beat_entry(
    celery: Worker,
    settings: Any,
    shared_dirs: dict[str, Path],
    tmp_path: Path,
) -> None:
    """``celery beat`` with the README's ``beat_schedule()`` entry (every second
    here) sends the sweep; the worker drains the row whose message never came."""
    from queued_storage.integrations.celery import beat_schedule

    settings.QUEUED_STORAGE_WORKER = None  # the wake-up is lost
    name = document_storage.save(unique("lost"), ContentFile(b"still here"))
    assert row(name).status == Status.QUEUED

    env = worker_env(
        STORAGES=settings.STORAGES,
        CELERY_BEAT_SCHEDULE=beat_schedule(seconds=1),
        **celery.settings,
    )
    beat = Process(
        ["beat", "--schedule", str(tmp_path / "beat-schedule"), "--loglevel=INFO"],
        env,
    )
    try:
        done = wait_for_status(celery, name, Status.DONE)
        runs = celery.wait(
            lambda runs: any(
                r["task"] == "queued_storage.sweep"
                and isinstance(r["retval"], dict)
                and r["retval"]["done"] >= 1
                for r in runs
            ),
            "sweep the row",
        )
    finally:
        beat.stop()
    assert done.attempts == 1
    assert (shared_dirs["remote"] / name).read_bytes() == b"still here"
    assert "queued_storage.transfer" not in {
        r["task"] for r in runs if name in r["args"]
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_a_broker_that_is_down_at_save_time_leaves_the_row_to_the_sweep(
    celery: Worker, caplog: pytest.LogCaptureFixture, shared_dirs: dict[str, Path]
) -> None:
    from celery import Celery

    secret = "broker-pass-" + uuid.uuid4().hex[:8]
    scheme = {
        "redis": "redis://:{}@127.0.0.1:{}/0",
        "rabbitmq": "amqp://u:{}@127.0.0.1:{}//",
    }
    down = Celery("tests-down", set_as_current=False)
    down.conf.update(
        broker_url=scheme[celery.kind].format(secret, free_port()),
        broker_connection_timeout=2,
    )
    down.set_current()
    try:
        with caplog.at_level(logging.WARNING, logger="queued_storage"):
            document = Document.objects.create(
                file=ContentFile(b"waits", name=unique("outage"))
            )
    finally:
        celery.app.set_current()
        down.close()
    name = saved_name(document.file)

    assert row(name).status == Status.QUEUED
    [record] = [r for r in caplog.records if "wake-up not sent" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert f"key=documents name={name}" in record.getMessage()
    assert "OperationalError" in record.getMessage()
    assert secret not in caplog.text

    celery.run_marker()
    assert row(name).status == Status.DONE
    assert (shared_dirs["remote"] / name).read_bytes() == b"waits"


def test_beat_schedule_refuses_an_interval_celery_could_not_keep() -> None:
    require_module("celery", CELERY_EXTRA)
    from queued_storage.integrations.celery import beat_schedule

    assert beat_schedule(seconds=300) == {
        "queued_storage: sweep due transfers": {
            "task": "queued_storage.sweep",
            "schedule": 300.0,
            "options": {"expires": 300.0},
        }
    }
    for wrong in (0, 0.5, -60, float("nan"), float("inf"), "60", True):
        with pytest.raises(ValueError, match="The sweep runs every"):
            beat_schedule(seconds=wrong)  # type: ignore[arg-type]


class SilentBroker:
    """A broker that accepts connections and never answers (a hung broker, a
    firewall that swallows the handshake)."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.server.close()
        for conn in self.accepted:
            conn.close()


def test_a_broker_that_never_answers_holds_a_save_for_about_a_second(
    celery: Worker, caplog: pytest.LogCaptureFixture, shared_dirs: dict[str, Path]
) -> None:
    """The wake-up is sent in the request that saved: Celery's own publish waited
    4 s for a silent RabbitMQ and forever for a silent Redis."""
    from celery import Celery

    broker = SilentBroker()
    scheme = {"redis": "redis://127.0.0.1:{}/0", "rabbitmq": "amqp://127.0.0.1:{}//"}
    silent = Celery("tests-silent", set_as_current=False)
    silent.conf.update(broker_url=scheme[celery.kind].format(broker.port))
    saved: list[str] = []
    took: list[float] = []

    def save() -> None:
        silent.set_current()  # the current app is per thread
        started = time.monotonic()
        try:
            document = Document.objects.create(
                file=ContentFile(b"waits", name=unique("silent"))
            )
        finally:
            connections.close_all()  # this thread's, or the test database stays
        took.append(time.monotonic() - started)
        saved.append(saved_name(document.file))

    try:
        with caplog.at_level(logging.WARNING, logger="queued_storage"):
            request = threading.Thread(target=save, daemon=True)
            request.start()
            request.join(WAIT_TIMEOUT)
            assert not request.is_alive(), "the save hangs on the silent broker"
    finally:
        silent.close()
        broker.close()
    [name] = saved
    assert took[0] < 3.0
    assert broker.accepted
    assert row(name).status == Status.QUEUED
    waits = "wake-up not sent, the row waits for the sweep"
    assert f"{waits} key=documents name={name}" in caplog.text

    celery.run_marker()
    assert row(name).status == Status.DONE


def test_an_eager_site_transfers_after_the_commit_in_the_request(
    celery: Worker, published: list[dict[str, Any]], shared_dirs: dict[str, Path]
) -> None:
    """``CELERY_TASK_ALWAYS_EAGER`` runs the task in the saving process: after the
    commit, on a row it can see, and never before."""
    celery.app.conf.task_always_eager = True
    try:
        with transaction.atomic():
            name = document_storage.save(unique("eager dé"), ContentFile(b"eager"))
            with transaction.atomic():
                document_storage.save(unique("inner"), ContentFile(b"inner"))
            assert row(name).status == Status.QUEUED
            assert not (shared_dirs["remote"] / name).exists()
        assert row(name).status == Status.DONE
        assert (shared_dirs["remote"] / name).read_bytes() == b"eager"
    finally:
        celery.app.conf.task_always_eager = False
    assert published == []


def test_a_save_in_a_rolled_back_savepoint_sends_nothing_and_a_held_save_neither(
    celery: Worker, published: list[dict[str, Any]]
) -> None:
    from tests.testapp.models import held_storage

    with transaction.atomic():
        kept = document_storage.save(unique("kept"), ContentFile(b"kept"))
        with pytest.raises(RuntimeError), transaction.atomic():
            document_storage.save(unique("undone"), ContentFile(b"undone"))
            raise RuntimeError("the inner block failed")
        held = held_storage.save(unique("held"), ContentFile(b"held"))
    assert [list(m["body"][0]) for m in published] == [["documents", kept]]

    held_storage.transfer(held)
    assert [list(m["body"][0]) for m in published][1:] == [["documents-held", held]]
    celery.run_marker()
    assert row(kept).status == Status.DONE
    held_row = PendingTransfer.objects.for_name("documents-held", held).get()
    assert held_row.status == Status.DONE


def test_a_broker_error_is_redacted_of_every_connection_setting(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failover URL's second password, the transport options' passwords, the
    read and write URLs: a client that quotes its configuration gives none away."""
    require_module("celery", CELERY_EXTRA)
    from celery import Celery, current_app

    from queued_storage.integrations import celery as integration

    secrets = {
        "failover": "second-pw-" + uuid.uuid4().hex[:6],
        "sentinel": "sentinel-pw-" + uuid.uuid4().hex[:6],
        "transport": "transport-pw-" + uuid.uuid4().hex[:6],
        "read": "read-pw-" + uuid.uuid4().hex[:6],
        "write": "write-pw-" + uuid.uuid4().hex[:6],
        "backend": "backend-pw-" + uuid.uuid4().hex[:6],
    }
    app = Celery("tests-quoting", set_as_current=False)
    app.conf.update(
        broker_url=f"redis://:first-pw-1@127.0.0.1:1/0;"
        f"redis://:{secrets['failover']}@127.0.0.1:2/0",
        broker_read_url=f"amqp://u:{secrets['read']}@127.0.0.1:1//",
        broker_write_url=f"amqp://u:{secrets['write']}@127.0.0.1:1//",
        broker_transport_options={
            "sentinel_kwargs": {"password": secrets["sentinel"]},
            "password": secrets["transport"],
        },
        result_backend_transport_options={"password": secrets["backend"]},
    )

    def quoting(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError(f"cannot connect with {sorted(secrets.values())}")

    monkeypatch.setattr(integration.transfer, "apply_async", quoting)
    previous = current_app._get_current_object()
    app.set_current()
    try:
        with caplog.at_level(logging.WARNING, logger="queued_storage"):
            integration.enqueue("documents", "quoted.txt")
    finally:
        previous.set_current()
        app.close()
    assert "wake-up not sent" in caplog.text
    assert "key=documents name=quoted.txt" in caplog.text
    for secret in secrets.values():
        assert secret not in caplog.text


def test_a_late_message_brings_back_no_deleted_file_and_sends_the_new_generation(
    celery: Worker, settings: Any, shared_dirs: dict[str, Path]
) -> None:
    """A message that arrives after its file was deleted, and one that arrives
    after the name was saved again: neither brings back or transfers the old
    file."""
    from queued_storage.integrations.celery import transfer

    settings.QUEUED_STORAGE_WORKER = None  # the test sends the messages itself
    gone = document_storage.save(unique("gone"), ContentFile(b"old"))
    document_storage.delete(gone)
    again = document_storage.save(unique("again"), ContentFile(b"first"))
    document_storage.delete(again)
    assert document_storage.save(again, ContentFile(b"second")) == again

    late = [transfer.apply_async(("documents", n)).id for n in (gone, again)]
    runs = celery.run_marker()
    assert {r["id"] for r in runs} >= set(late)
    assert not document_storage.exists(gone)
    assert not (shared_dirs["remote"] / gone).exists()
    assert not (shared_dirs["local"] / gone).exists()
    assert row(again).status == Status.DONE
    assert (shared_dirs["remote"] / again).read_bytes() == b"second"
    with document_storage.open(again) as reopened:
        assert reopened.read() == b"second"
