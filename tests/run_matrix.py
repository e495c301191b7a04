"""Run the test suite once per database: sqlite, postgresql, mariadb.

Usage: python tests/run_matrix.py [pytest args...]

Each run is a pytest subprocess with QUEUED_STORAGE_TEST_DB set. Before a
server run the server is probed (TCP connect, then a real driver connect). An
unreachable server fails the matrix when CI=true; elsewhere it is skipped with
a loud warning. QUEUED_STORAGE_TEST_DBS=sqlite,postgresql narrows the matrix.

The last line printed is "N passed, N failed[, N skipped]" over all runs.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.databases import (  # noqa: E402
    ENV_VAR,
    VENDORS,
    server_address,
    server_credentials,
)

PROBE_TIMEOUT = 3
COUNT_RE = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)\b")
SUMMARY_RE = re.compile(r"^=*\s*(no tests ran|\d+ \w+).* in [\d.]+s\b")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class RunResult:
    vendor: str
    status: str  # "ok", "FAILED" or "SKIPPED"
    detail: str = ""
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


def probe(vendor: str) -> str | None:
    """Return why the server for ``vendor`` cannot be used, or None if it can."""
    host, port = server_address(vendor)
    user, password = server_credentials(vendor)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            pass
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc}"
    try:
        if vendor == "postgresql":
            import psycopg

            psycopg.connect(
                host=host,
                port=port,
                user=user,
                password=password,
                dbname="postgres",
                connect_timeout=PROBE_TIMEOUT,
            ).close()
        elif vendor == "mariadb":
            import pymysql

            pymysql.connect(
                host=host,
                port=port,
                user=user,
                password=password,
                connect_timeout=PROBE_TIMEOUT,
            ).close()
    except Exception as exc:  # any driver error means "not usable"
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{host}:{port} refused a {vendor} login as {user!r}: {message!r}"
    return None


def parse_counts(lines: list[str]) -> dict[str, int] | None:
    """Read pytest's closing line, e.g. '=== 3 passed, 1 skipped in 0.5s ==='."""
    for line in reversed(lines):
        line = ANSI_RE.sub("", line)
        if SUMMARY_RE.search(line):
            counts: dict[str, int] = {}
            for number, word in COUNT_RE.findall(line):
                key = "errors" if word.startswith("error") else word
                counts[key] = counts.get(key, 0) + int(number)
            return counts
    return None


def run_pytest(vendor: str, pytest_args: list[str]) -> RunResult:
    env = {**os.environ, ENV_VAR: vendor}
    command = [sys.executable, "-m", "pytest", *pytest_args]
    if sys.stdout.isatty() and not any(a.startswith("--color") for a in pytest_args):
        command.append("--color=yes")
    print(f"$ {ENV_VAR}={vendor} {' '.join(command)}", flush=True)
    started = time.monotonic()
    tail: list[str] = []
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            tail = [*tail[-49:], line.rstrip("\n")]
        returncode = process.wait()
    seconds = time.monotonic() - started
    counts = parse_counts(tail)
    if returncode == 0:
        return RunResult(vendor, "ok", "", seconds, counts or {})
    reasons = {
        1: "tests failed",
        2: "interrupted",
        3: "internal error",
        4: "usage error",
        5: "no tests collected",
    }
    detail = f"pytest exit {returncode} ({reasons.get(returncode, 'crashed')})"
    if counts is None:
        detail += "; no summary line, see the output above"
    return RunResult(vendor, "FAILED", detail, seconds, counts or {})


def banner(text: str) -> None:
    line = "!" * 78
    print(f"\n{line}\n!! {text}\n{line}\n", flush=True)


def selected_vendors() -> list[str]:
    wanted = os.environ.get("QUEUED_STORAGE_TEST_DBS", "")
    if not wanted.strip():
        return list(VENDORS)
    vendors = [v.strip().lower() for v in wanted.split(",") if v.strip()]
    unknown = sorted(set(vendors) - set(VENDORS))
    if unknown:
        sys.exit(
            f"QUEUED_STORAGE_TEST_DBS names unknown databases {unknown}; "
            f"use some of: {', '.join(VENDORS)}."
        )
    return vendors


def main(pytest_args: list[str]) -> int:
    in_ci = os.environ.get("CI", "").lower() == "true"
    results: list[RunResult] = []
    for vendor in selected_vendors():
        print(f"\n===== database: {vendor} =====", flush=True)
        if vendor != "sqlite":
            problem = probe(vendor)
            if problem is not None:
                if in_ci:
                    banner(f"FAILED: {vendor} is unreachable under CI: {problem}")
                    results.append(RunResult(vendor, "FAILED", problem))
                else:
                    banner(
                        f"SKIPPING {vendor}: {problem}\n"
                        f"!! The ledger is NOT being tested on {vendor}."
                    )
                    results.append(RunResult(vendor, "SKIPPED", problem))
                continue
        results.append(run_pytest(vendor, pytest_args))

    print("\n===== summary =====")
    print(
        f"{'database':<12}{'result':<9}{'passed':>7}{'failed':>7}{'skipped':>8}"
        f"{'time':>8}  detail"
    )
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for r in results:
        passed = r.counts.get("passed", 0)
        failed = r.counts.get("failed", 0) + r.counts.get("errors", 0)
        skipped = r.counts.get("skipped", 0)
        if r.status == "FAILED" and failed == 0:
            # A run that failed without a failing test (nothing collected,
            # crash, server down under CI) counts as one failure so that the
            # totals line never reads clean.
            failed = 1
        totals["passed"] += passed
        totals["failed"] += failed
        totals["skipped"] += skipped
        took = f"{r.seconds:.1f}s" if r.seconds else "-"
        print(
            f"{r.vendor:<12}{r.status:<9}{passed:>7}{failed:>7}{skipped:>8}"
            f"{took:>8}  {r.detail}"
        )
    for r in results:
        if r.status == "SKIPPED":
            print(
                f"SKIPPED: {r.vendor} ({r.detail})  -- the ledger was NOT tested on it"
            )
    exit_code = 1 if any(r.status == "FAILED" for r in results) else 0
    closing = f"{totals['passed']} passed, {totals['failed']} failed"
    if totals["skipped"]:
        closing += f", {totals['skipped']} skipped"
    print(closing, flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
