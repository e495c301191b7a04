"""``make sandbox``: the dev server, an S3 API (moto on loopback) and a worker,
started together and stopped together with Ctrl-C."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from sandbox.gallery.models import Switches, Upload

MANAGE = Path(__file__).resolve().parents[4] / "manage.py"
ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin"
#: Seconds the dev server may take to answer, and a child to stop.
START_TIMEOUT = 60
STOP_TIMEOUT = 10


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class Command(BaseCommand):
    help = (
        "Run the sandbox: the dev server, an S3 server (moto) and a worker "
        "(process_transfers --loop, or qcluster with SANDBOX_WORKER=django_q). "
        "Ctrl-C stops all of them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument(
            "--port",
            type=int,
            default=8000,
            help="Dev server port; 0 picks a free one.",
        )
        parser.add_argument(
            "--worker-interval",
            type=float,
            default=1.0,
            help="Seconds between polls of process_transfers --loop (default: 1).",
        )

    def handle(
        self, *, host: str, port: int, worker_interval: float, **options: Any
    ) -> None:
        # moto's server logs every request through werkzeug at INFO.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        if port == 0:
            port = free_port(host)
        elif not port_is_free(host, port):
            raise CommandError(
                f"Port {port} on {host} is taken: stop what runs there, or pick "
                "another with `make sandbox PORT=8001`."
            )
        call_command("migrate", interactive=False, verbosity=0)
        self._admin_user()
        self._reset()

        from moto.server import ThreadedMotoServer

        s3 = ThreadedMotoServer(ip_address=host, port=0, verbose=False)
        s3.start()
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopping = False
        previous = {
            signum: signal.signal(signum, self._stop)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            s3_host, s3_port = s3.get_host_and_port()
            endpoint = f"http://{s3_host}:{s3_port}"
            self._create_bucket(endpoint)
            env = {**os.environ, "SANDBOX_S3_ENDPOINT": endpoint}
            env.setdefault("DJANGO_SETTINGS_MODULE", "sandbox.settings")
            self._start_worker(env, worker_interval)
            url = f"http://{host}:{port}/"
            self._start(
                "web",
                ["runserver", f"{host}:{port}", "--noreload", "--skip-checks"],
                env,
            )
            self._wait_until_up(url)
            self._banner(url, endpoint)
            self._watch()
        finally:
            self._stop_children()
            s3.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self.stdout.write("Sandbox stopped.")

    # Setting up

    def _admin_user(self) -> None:
        users = get_user_model()
        user = users.objects.filter(username=ADMIN_USER).first()
        if user is None:
            users.objects.create_superuser(
                ADMIN_USER, "admin@example.com", ADMIN_PASSWORD
            )
        elif not user.check_password(ADMIN_PASSWORD) or not user.is_superuser:
            user.set_password(ADMIN_PASSWORD)
            user.is_staff = user.is_superuser = user.is_active = True
            user.save()

    def _reset(self) -> None:
        """Start from an empty gallery: moto keeps S3 in memory, so the files that
        earlier runs moved there are gone."""
        storage = Upload._meta.get_field("file").storage
        if not isinstance(storage, QueuedStorage):
            raise CommandError("Upload.file does not use a QueuedStorage.")
        Upload.objects.all().delete()
        PendingTransfer.objects.filter(storage_key=storage.key).delete()
        upload_to = str(Upload._meta.get_field("file").upload_to)
        shutil.rmtree(Path(storage.local.path(upload_to)), ignore_errors=True)
        Switches.objects.update_or_create(
            pk=1, defaults={"hold_transfers": False, "remote_down": False}
        )
        if "django_q" in settings.INSTALLED_APPS:
            from django_q.models import OrmQ

            OrmQ.objects.all().delete()

    def _create_bucket(self, endpoint: str) -> None:
        import boto3

        options = settings.STORAGES["s3"]["OPTIONS"]
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=options["access_key"],
            aws_secret_access_key=options["secret_key"],
            region_name=options["region_name"],
        )
        # moto's state is process-wide and outlives a server: start empty.
        reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(reset, timeout=30).close()
        client.create_bucket(Bucket=options["bucket_name"])

    def _start_worker(self, env: dict[str, str], interval: float) -> None:
        if settings.QUEUED_STORAGE_WORKER == "django_q":
            call_command("install_transfer_schedule", verbosity=0)
            self._start("worker", ["qcluster"], env)
        else:
            self._start(
                "worker",
                ["process_transfers", "--loop", "--interval", str(interval)],
                env,
            )

    def _start(self, label: str, args: list[str], env: dict[str, str]) -> None:
        # The children inherit an ignored SIGINT: the Ctrl-C that a terminal sends
        # to the whole group then stops them through this process, with SIGTERM,
        # rather than as a KeyboardInterrupt in the middle of their start-up.
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            process = subprocess.Popen(
                [sys.executable, str(MANAGE), *args],
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            signal.signal(signal.SIGINT, handler)
        self.children.append((label, process))

    def _wait_until_up(self, url: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self._check_children()
            try:
                urllib.request.urlopen(url, timeout=5).close()
                return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise CommandError(
                        f"The dev server did not answer at {url} within "
                        f"{START_TIMEOUT} s."
                    ) from None
                time.sleep(0.2)

    def _banner(self, url: str, endpoint: str) -> None:
        worker = (
            "qcluster (django-q2)"
            if settings.QUEUED_STORAGE_WORKER == "django_q"
            else "process_transfers --loop"
        )
        lines = [
            f"Sandbox ready at {url}",
            f"  admin:  {url}admin/  (user {ADMIN_USER!r}, password {ADMIN_PASSWORD!r})",
            f"  S3:     {endpoint} (moto, in memory)",
            f"  worker: {worker}",
            "  Ctrl-C stops everything.",
        ]
        self.stdout.write(self.style.SUCCESS("\n".join(lines)))
        self.stdout.flush()

    # Running and stopping

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _check_children(self) -> None:
        for label, process in self.children:
            if process.poll() is not None and not self.stopping:
                raise CommandError(
                    f"The {label} process exited with code {process.returncode}; "
                    "stopping the sandbox."
                )

    def _watch(self) -> None:
        while not self.stopping:
            self._check_children()
            time.sleep(0.2)

    def _stop_children(self) -> None:
        self.stopping = True
        for _label, process in self.children:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for label, process in self.children:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.stderr.write(f"The {label} process did not stop; killing it.")
                process.kill()
                process.wait()
