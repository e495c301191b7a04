"""An S3 API on loopback that a test stops and starts again on the same port, and
an S3 storage that journals its uploads, for the chaos test."""

from __future__ import annotations

import threading
from typing import Any

from botocore.config import Config
from storages.backends.s3 import S3Storage

from tests.storages import append_journal


class JournalingS3Storage(S3Storage):
    """django-storages' S3Storage that journals each upload to the file ``journal``
    (see tests/storages.py) and makes ``max_attempts`` tries per request, so the
    ledger, not botocore, retries through an outage."""

    def __init__(self, journal: str, max_attempts: int = 1, **settings: Any) -> None:
        settings.setdefault(
            "client_config",
            Config(
                retries={"total_max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
            ),
        )
        super().__init__(**settings)
        self.journal = journal

    def _save(self, name: str, content: Any) -> str:
        append_journal(self.journal, "begin", name)
        saved = str(super()._save(name, content))
        append_journal(self.journal, "saved", saved)
        return saved


class RestartableS3Server:
    """moto's S3 API on 127.0.0.1 (a free port on the first start, the same port
    after). moto keeps its buckets in this process, so they outlive a restart."""

    def __init__(self) -> None:
        self.port = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        class OneRequestPerConnection(MotoRequestHandler):
            # Keep-alive connections would be answered by their handler threads
            # after the server stops: with none, a stopped server answers no one.
            protocol_version = "HTTP/1.0"

            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass  # thousands of lines per test otherwise

        self._server = make_server(
            "127.0.0.1",
            self.port,
            DomainDispatcherApplication(create_backend_app),
            threaded=True,
            request_handler=OneRequestPerConnection,
        )
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop answering and close the port: clients get 'connection refused'."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=30)
        self._server = None
