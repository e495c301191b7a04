"""Worker processes for the tests: ``process_transfers`` (or any management
command) run as a real OS process against this test run's database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent


def worker_env(**overrides: Any) -> dict[str, str]:
    """The environment of a worker process: same database as this test run, the
    test's STORAGES (so the worker finds the same directories), and ``overrides``
    as extra settings."""
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    env["QUEUED_STORAGE_USE_TEST_DB"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), env.get("PYTHONPATH")])
    )
    extra = {"STORAGES": settings.STORAGES, **overrides}
    env["QUEUED_STORAGE_TEST_OVERRIDES"] = json.dumps(extra)
    return env


def start_command(
    *args: str, overrides: dict[str, Any] | None = None, **popen: Any
) -> subprocess.Popen[str]:
    """Start ``manage.py <args>`` as a process of its own."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.STDOUT)
    return subprocess.Popen(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT,
        env=worker_env(**(overrides or {})),
        text=True,
        **popen,
    )


def run_command(
    *args: str, overrides: dict[str, Any] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``manage.py <args>`` in a process of its own and wait for it."""
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT,
        env=worker_env(**(overrides or {})),
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
