"""Run the test suite once per leg: a Python (with its Django) and a database.

Usage: python tests/run_matrix.py [pytest args...]

Each leg is a pytest subprocess with QUEUED_STORAGE_TEST_DB set. By default the
legs are this Python on sqlite, postgresql and mariadb; QUEUED_STORAGE_TEST_LEGS
lists them instead, whitespace-separated ``PYTHON=DB,DB`` entries (``PYTHON``
alone: every database), e.g. ".venv/bin/python=sqlite,postgresql,mariadb
.venv-django61/bin/python=sqlite,postgresql". QUEUED_STORAGE_TEST_DBS=sqlite,
postgresql narrows every leg to those databases.

Before a server leg the server is probed (TCP connect, then a real driver
connect). An unreachable server, or a Python that cannot run the suite (missing,
no Django), fails the matrix when CI=true; elsewhere the leg is skipped with a
loud warning.

Tests marked ``any_database`` (tests/legs.py says which and why) run on the
sqlite leg of each Python and are deselected on its other legs; a Python without
a sqlite leg in the matrix runs them everywhere, so no test leaves every leg.
Tests marked ``one_leg`` run on the first runnable sqlite leg (else the first
runnable leg) only.

QUEUED_STORAGE_TEST_JOBS=N runs up to N legs at once (default 1): each leg's
output goes to test-results/<leg>.log and is printed whole when the leg ends.

The last line printed is "N passed, N failed[, N skipped]" over all legs.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
from tests.legs import ELSEWHERE_ENV  # noqa: E402

PROBE_TIMEOUT = 3
LOG_DIR = ROOT / "test-results"
COUNT_RE = re.compile(
    r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b"
)
SUMMARY_RE = re.compile(r"^=*\s*(no tests ran|\d+ \w+).* in [\d.]+s\b")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_print_lock = threading.Lock()


@dataclass
class Leg:
    python: str
    vendor: str
    #: e.g. "dj5.2-py3.11", from the interpreter itself; "" when it cannot run.
    version: str = ""
    #: What the leg leaves to another (tests/legs.py): "1", the
    #: ``any_database`` and ``one_leg`` tests (this Python's sqlite leg runs
    #: them); "one_leg", those only; "" none.
    elsewhere: str = ""

    @property
    def name(self) -> str:
        return f"{self.version or Path(self.python).name}/{self.vendor}"


@dataclass
class RunResult:
    leg: Leg
    status: str  # "ok", "FAILED" or "SKIPPED"
    detail: str = ""
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    #: CPU seconds (user + system) of the leg's pytest and the processes it
    #: waited for: a figure that a busy machine inflates less than wall time.
    cpu: float = 0.0


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


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


def interpreter_version(python: str) -> tuple[str, str | None]:
    """Return ("dj5.2-py3.11", None) for a Python that imports Django, or
    ("", why not)."""
    code = (
        "import sys, django; "
        "print(f'dj{django.VERSION[0]}.{django.VERSION[1]}-"
        "py{sys.version_info[0]}.{sys.version_info[1]}')"
    )
    try:
        done = subprocess.run(
            [python, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError as exc:
        return "", f"cannot run {python}: {exc}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return "", f"{python} cannot import Django: {last}"
    return done.stdout.strip(), None


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


def run_pytest(leg: Leg, pytest_args: list[str], buffered: bool) -> RunResult:
    env = {**os.environ, ENV_VAR: leg.vendor}
    env.pop(ELSEWHERE_ENV, None)
    if leg.elsewhere:
        env[ELSEWHERE_ENV] = leg.elsewhere
    # A run id of the leg's own (tests/databases.py): concurrent legs never share
    # a test database, a Celery queue or a SQLite file.
    env.pop("QUEUED_STORAGE_TEST_RUN", None)
    command = [leg.python, "-m", "pytest", *pytest_args]
    colour = any(a.startswith("--color") for a in pytest_args)
    if not buffered and not colour and sys.stdout.isatty():
        command.append("--color=yes")
    slug = leg.name.replace("/", "-")
    if buffered and not any(a.startswith("--basetemp") for a in pytest_args):
        # pytest's numbered temporary directories are per user, not per run:
        # legs at once get a base of their own (emptied at start by pytest).
        (LOG_DIR / "tmp").mkdir(parents=True, exist_ok=True)
        command.append(f"--basetemp={LOG_DIR / 'tmp' / slug}")
    shown = " ".join(shlex.quote(c) for c in command)
    prefix = f"{ENV_VAR}={leg.vendor}"
    if leg.elsewhere:
        prefix += f" {ELSEWHERE_ENV}={leg.elsewhere}"
    header = f"\n===== leg {leg.name} =====\n$ {prefix} {shown}\n"
    started = time.monotonic()
    tail: list[str] = []
    LOG_DIR.mkdir(exist_ok=True)
    log_path = LOG_DIR / f"{slug}.log"
    if buffered:
        with _print_lock:
            print(f"----- started leg {leg.name} (output: {log_path})", flush=True)
    else:
        print(header, end="", flush=True)
    with (
        log_path.open("w", encoding="utf-8", buffering=1) as log,
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        ) as process,
    ):
        assert process.stdout is not None
        log.write(header)
        for line in process.stdout:
            log.write(line)
            if not buffered:
                sys.stdout.write(line)
            tail = [*tail[-49:], line.rstrip("\n")]
        # wait4 rather than wait: the child's own resource usage, which
        # RUSAGE_CHILDREN would mix with the other legs' when they run at once.
        _, status, usage = os.wait4(process.pid, 0)
        returncode = process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    cpu = usage.ru_utime + usage.ru_stime
    if buffered:
        with _print_lock:
            sys.stdout.write(log_path.read_text(encoding="utf-8"))
            print(
                f"----- leg {leg.name} ended in {seconds:.1f}s ({cpu:.1f}s CPU)",
                flush=True,
            )
    counts = parse_counts(tail)
    if returncode == 0:
        return RunResult(leg, "ok", "", seconds, counts or {}, cpu)
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
    return RunResult(leg, "FAILED", detail, seconds, counts or {}, cpu)


def banner(text: str) -> None:
    line = "!" * 78
    with _print_lock:
        print(f"\n{line}\n!! {text}\n{line}\n", flush=True)


def parse_vendors(text: str, source: str) -> list[str]:
    vendors = [v.strip().lower() for v in text.split(",") if v.strip()]
    unknown = sorted(set(vendors) - set(VENDORS))
    if unknown:
        sys.exit(
            f"{source} names unknown databases {unknown}; "
            f"use some of: {', '.join(VENDORS)}."
        )
    return vendors


def selected_legs() -> list[Leg]:
    spec = os.environ.get("QUEUED_STORAGE_TEST_LEGS", "").split()
    if not spec:
        spec = [sys.executable]
    narrowed = os.environ.get("QUEUED_STORAGE_TEST_DBS", "")
    only = parse_vendors(narrowed, "QUEUED_STORAGE_TEST_DBS") if narrowed else None
    legs: list[Leg] = []
    for entry in spec:
        python, _, vendor_text = entry.partition("=")
        vendors = (
            parse_vendors(vendor_text, "QUEUED_STORAGE_TEST_LEGS")
            if vendor_text
            else list(VENDORS)
        )
        for vendor in vendors:
            if only is None or vendor in only:
                legs.append(Leg(python, vendor))
    return legs


def prepare(legs: list[Leg]) -> list[RunResult]:
    """Name each leg after its interpreter, say what each leaves to another leg
    (:func:`assign_elsewhere`), and return the results of the legs that cannot
    run."""
    versions: dict[str, tuple[str, str | None]] = {}
    for leg in legs:
        if leg.python not in versions:
            versions[leg.python] = interpreter_version(leg.python)
        leg.version = versions[leg.python][0]
    unusable: list[RunResult] = []
    probes: dict[str, str | None] = {}
    for leg in legs:
        problem = versions[leg.python][1]
        if problem is None and leg.vendor != "sqlite":
            if leg.vendor not in probes:
                probes[leg.vendor] = probe(leg.vendor)
            problem = probes[leg.vendor]
        if problem is None:
            continue
        if in_ci():
            banner(f"FAILED: leg {leg.name} cannot run under CI: {problem}")
            unusable.append(RunResult(leg, "FAILED", problem))
        else:
            banner(
                f"SKIPPING leg {leg.name}: {problem}\n"
                f"!! The suite is NOT being run on {leg.name}."
            )
            unusable.append(RunResult(leg, "SKIPPED", problem))
    cannot = {id(result.leg) for result in unusable}
    assign_elsewhere([leg for leg in legs if id(leg) not in cannot])
    return unusable


def assign_elsewhere(legs: list[Leg]) -> None:
    """Mark what each of the runnable ``legs`` leaves to another: a server leg of
    a Python with a sqlite leg leaves it the ``any_database`` tests; every leg but
    the first sqlite one (else the first) leaves it the ``one_leg`` tests."""
    with_sqlite = {leg.python for leg in legs if leg.vendor == "sqlite"}
    sqlite = [leg for leg in legs if leg.vendor == "sqlite"]
    first = (sqlite or legs)[0] if legs else None
    for leg in legs:
        if leg.vendor != "sqlite" and leg.python in with_sqlite:
            leg.elsewhere = "1"
        elif leg is not first:
            leg.elsewhere = "one_leg"
        else:
            leg.elsewhere = ""


def jobs() -> int:
    text = os.environ.get("QUEUED_STORAGE_TEST_JOBS", "").strip() or "1"
    try:
        value = int(text)
    except ValueError:
        sys.exit(f"QUEUED_STORAGE_TEST_JOBS={text!r} is not a whole number.")
    if value < 1:
        sys.exit(f"QUEUED_STORAGE_TEST_JOBS={text!r}: at least 1.")
    return value


def main(pytest_args: list[str]) -> int:
    legs = selected_legs()
    if not legs:
        sys.exit("No leg selected (QUEUED_STORAGE_TEST_LEGS / _DBS).")
    unusable = prepare(legs)
    skipped_legs = {id(r.leg) for r in unusable}
    runnable = [leg for leg in legs if id(leg) not in skipped_legs]
    workers = min(jobs(), max(len(runnable), 1))
    started = time.monotonic()
    if workers == 1:
        ran = [run_pytest(leg, pytest_args, buffered=False) for leg in runnable]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            ran = list(
                pool.map(lambda leg: run_pytest(leg, pytest_args, True), runnable)
            )
    wall = time.monotonic() - started
    by_leg = {id(r.leg): r for r in [*unusable, *ran]}
    results = [by_leg[id(leg)] for leg in legs]

    print("\n===== summary =====")
    print(
        f"{'leg':<24}{'result':<9}{'passed':>7}{'failed':>7}{'skipped':>8}"
        f"{'desel.':>8}{'time':>8}{'CPU':>8}  detail"
    )
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for r in results:
        passed = r.counts.get("passed", 0)
        failed = r.counts.get("failed", 0) + r.counts.get("errors", 0)
        skipped = r.counts.get("skipped", 0)
        deselected = r.counts.get("deselected", 0)
        if r.status == "FAILED" and failed == 0:
            # A leg that failed without a failing test (nothing collected,
            # crash, server down under CI) counts as one failure so that the
            # totals line never reads clean.
            failed = 1
        totals["passed"] += passed
        totals["failed"] += failed
        totals["skipped"] += skipped
        took = f"{r.seconds:.1f}s" if r.seconds else "-"
        cpu = f"{r.cpu:.1f}s" if r.seconds else "-"
        detail = r.detail
        if r.leg.elsewhere:
            left = {"1": "any_database: on sqlite", "one_leg": "one_leg: on the first"}
            detail = "; ".join(filter(None, [detail, left[r.leg.elsewhere]]))
        print(
            f"{r.leg.name:<24}{r.status:<9}{passed:>7}{failed:>7}{skipped:>8}"
            f"{deselected:>8}{took:>8}{cpu:>8}  {detail}"
        )
    print(
        "desel.: tests deselected by -k/-m and, where it says so, the any_database "
        "tests that the same Python's sqlite leg runs and the one_leg tests that "
        f"the first sqlite leg runs (tests/legs.py); "
        f"{len(runnable)} legs, {workers} at a time, {wall:.1f}s; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    for r in results:
        if r.status == "SKIPPED":
            print(
                f"SKIPPED: leg {r.leg.name} ({r.detail})  -- the suite was NOT run on it"
            )
    exit_code = 1 if any(r.status == "FAILED" for r in results) else 0
    closing = f"{totals['passed']} passed, {totals['failed']} failed"
    if totals["skipped"]:
        closing += f", {totals['skipped']} skipped"
    print(closing, flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
