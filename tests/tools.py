"""External tools and Python modules the integration, backend and browser tests
need: skipped loudly when missing on a developer's machine, a failure under
``CI=true``."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import time
from contextlib import suppress
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest

from tests.databases import selected_vendor

IN_CI = os.environ.get("CI", "").lower() == "true"
#: ``pip install`` arguments for the test dependency group, which brings the
#: backend tests' servers and client libraries.
TEST_EXTRA = "-e . --group test"


def missing(reason: str) -> NoReturn:
    """Skip with ``reason``, loudly; under CI=true, fail: CI must run every test."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing tool fails the run)", pytrace=False)
    pytest.skip(f"!!! NOT TESTED: {reason}")


def require_module(module: str, install: str = TEST_EXTRA) -> ModuleType:
    """Import ``module`` or skip/fail, naming what to ``pip install`` for it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing(
            f"Python module {module!r} is not importable ({exc}); pip install {install}"
        )


#: For tests that start several processes: they run once per matrix, on the
#: sqlite leg (which CI always runs), not again on each server database.
sqlite_leg_only = pytest.mark.skipif(
    selected_vendor() != "sqlite",
    reason=(
        "runs on the sqlite leg of the matrix only (multi-process test, too slow "
        "to repeat per database); QUEUED_STORAGE_TEST_DB=sqlite runs it"
    ),
)


def stop_group(
    process: subprocess.Popen[Any], signum: int = signal.SIGINT
) -> list[str]:
    """Signal the process group that ``process`` leads (SIGINT: what a terminal's
    Ctrl-C sends). Returns the command lines of the processes still there after
    30 s; those are killed."""
    group = process.pid
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return []
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    deadline = time.monotonic() + 10
    while group_members(group) and time.monotonic() < deadline:
        time.sleep(0.1)
    leftovers = group_members(group)
    if leftovers:
        os.killpg(group, signal.SIGKILL)
        process.wait()
    return leftovers


def group_members(group: int) -> list[str]:
    """The command lines of the live (not zombie) processes in ``group``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        # Fields after the command name: state, ppid, pgrp, ...
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return members
