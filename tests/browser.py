"""Headless Chromium (Debian's package) driven by Playwright, and the sandbox
(``manage.py runsandbox``) as a process, for the browser test.

Playwright never downloads a browser here: it drives ``/usr/bin/chromium``, which
``.ci/run`` installs with apt.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.tools import missing, require_module, stop_group

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("QUEUED_STORAGE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
#: Where the browser test leaves its screenshots (git-ignored).
SCREENSHOTS = ROOT / "var" / "screenshots"
READY = re.compile(r"Sandbox ready at (http://\S+/)")


@contextmanager
def chromium_page(profile: Path, **context_options: Any) -> Iterator[Any]:
    """A page in a fresh Chromium profile (``--user-data-dir``)."""
    require_module("playwright.sync_api", "playwright")
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"{CHROMIUM} not found; apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1200, "height": 800},
            **context_options,
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


@dataclass
class Sandbox:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    #: Processes of the sandbox still running 10 s after the Ctrl-C (then killed).
    leftovers: list[str] = field(default_factory=list)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_sandbox(
    workdir: Path, worker: str | None = None, timeout: float = 90
) -> Iterator[Sandbox]:
    """``manage.py runsandbox`` on free ports, with its own database and media
    directory under ``workdir``; stopped at the end as Ctrl-C would. ``worker`` is
    ``SANDBOX_WORKER`` (``"django_q"`` runs qcluster)."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "sandbox.settings",
        "SANDBOX_DB": str(workdir / "sandbox.sqlite3"),
        "SANDBOX_MEDIA_ROOT": str(workdir / "media"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("SANDBOX_WORKER", None)
    if worker:
        env["SANDBOX_WORKER"] = worker
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "sandbox.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "runsandbox", "--port", "0"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # A process group of its own: the signal a terminal's Ctrl-C sends
            # reaches the runner and the processes it started, as in a shell.
            start_new_session=True,
        )
    sandbox = Sandbox("", process, log)
    try:
        deadline = time.monotonic() + timeout
        while not (found := READY.search(sandbox.output())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"The sandbox did not start:\n{sandbox.output()}")
            time.sleep(0.2)
        sandbox.url = found.group(1)
        yield sandbox
    finally:
        sandbox.leftovers = stop_group(process)


def png(width: int, height: int, seed: int) -> bytes:
    """A small gradient PNG, different for each ``seed``."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # no filter
        for x in range(width):
            rows += bytes(
                (
                    40 + x * 180 // width,
                    60 + seed * 45 % 90 + y * 100 // height,
                    200 - y * 120 // height,
                )
            )

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 9))
        + chunk(b"IEND", b"")
    )
