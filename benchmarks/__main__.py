"""Run the benchmarks: ``python -m benchmarks [--full] [--db ...] [--only ...]``.

For each database it creates a dedicated benchmark database (and a second one,
on PostgreSQL, for the million-row ledger), runs the cases in a child process
with ``benchmarks.settings``, drops the databases and writes the figures to
``benchmarks/results/<mode>.json`` and ``<mode>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.databases import server_address, server_credentials  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ALL_CASES = [
    "save",
    "drain",
    "s3",
    "latency",
    "lanes",
    "lookups",
    "memory",
    "scale",
    "overhead",
    "scaleout",
    "dashboard",
    "metrics",
    "audit",
]
#: Cases whose figure depends little on the database (the remote's cost rules):
#: run on the first database only (in full mode they take some 16 minutes a
#: database).
DB_INDEPENDENT = {"memory", "latency", "s3"}


def _admin_connection(vendor: str) -> Any:
    host, port = server_address(vendor)
    user, password = server_credentials(vendor)
    if vendor == "postgresql":
        import psycopg

        return psycopg.connect(
            host=host,
            port=port,
            user=user,
            password=password,
            dbname="postgres",
            autocommit=True,
            connect_timeout=3,
        )
    import pymysql

    return pymysql.connect(
        host=host, port=port, user=user, password=password, connect_timeout=3
    )


def create_databases(vendor: str, names: list[str]) -> str | None:
    """Create empty databases; returns why it could not, or None."""
    if vendor == "sqlite":
        return None
    try:
        connection = _admin_connection(vendor)
    except Exception as exc:
        return f"{vendor} server unreachable: {exc}"
    with connection:
        cursor = connection.cursor()
        for name in names:
            if vendor == "postgresql":
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
                cursor.execute(f'CREATE DATABASE "{name}"')
            else:
                cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
                cursor.execute(
                    f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 "
                    "COLLATE utf8mb4_unicode_ci"
                )
    return None


def drop_databases(vendor: str, names: list[str]) -> None:
    if vendor == "sqlite":
        return
    connection = _admin_connection(vendor)
    with connection:
        cursor = connection.cursor()
        for name in names:
            if vendor == "postgresql":
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            else:
                cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


def server_version(vendor: str) -> str:
    if vendor == "sqlite":
        import sqlite3

        return f"SQLite {sqlite3.sqlite_version}"
    with _admin_connection(vendor) as connection:
        cursor = connection.cursor()
        cursor.execute("SELECT version()")
        return str(cursor.fetchone()[0]).split(" on ")[0]


def run_database(
    vendor: str, mode: str, cases: list[str], verbose: bool
) -> dict[str, Any]:
    name = f"queued_storage_bench_{os.getpid()}"
    names = [name] + ([f"{name}_large"] if vendor == "postgresql" else [])
    problem = create_databases(vendor, names)
    if problem:
        return {"database": vendor, "error": problem, "figures": []}
    workdir = Path(tempfile.mkdtemp(prefix=f"queued_storage_bench-{vendor}-"))
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="benchmarks.settings",
        PYTHONPATH=str(ROOT),
        QUEUED_STORAGE_BENCH_DB=vendor,
        QUEUED_STORAGE_BENCH_NAME=name,
        QUEUED_STORAGE_BENCH_DIR=str(workdir),
    )
    if vendor == "postgresql":
        env["QUEUED_STORAGE_BENCH_LARGE"] = f"{name}_large"
    output = workdir / "figures.json"
    started = time.monotonic()
    try:
        process = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.child",
                mode,
                ",".join(cases),
                str(output),
                *(["--verbose"] if verbose else []),
            ],
            env=env,
            cwd=ROOT,
            check=False,
        )
        result: dict[str, Any] = {"database": vendor, "version": server_version(vendor)}
        if output.exists():
            result["figures"] = json.loads(output.read_text())
        else:
            result["figures"] = []
        if process.returncode:
            result["error"] = f"benchmark process exited {process.returncode}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        drop_databases(vendor, names)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _fmt(value: float, unit: str) -> str:
    if unit == "ledger queries":
        return f"{int(value)} quer{'y' if value == 1 else 'ies'}"
    if unit.startswith("MiB"):
        return f"{value:.1f} MiB"
    if unit.startswith("ms"):
        return f"{value:.3f} ms"
    return f"{value:.2f}x"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Benchmark results ({report['mode']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}, commit {report['commit']}, "
        f"{report['machine']}, Python {report['python']}, total "
        f"{report['seconds']:.0f} s; load average (1 min) "
        f"{report['load_average']['before'][0]} before, "
        f"{report['load_average']['after'][0]} after; nice "
        f"{report['niceness']}.",
        "",
        "Each ratio is the median of per-round ratios, the package and the floor "
        "(the same work without it) timed in alternating rounds in one process.",
        "",
    ]
    for run in report["runs"]:
        lines.append(f"## {run['database']} ({run.get('version', '?')})")
        lines.append("")
        if run.get("error"):
            lines.append(f"**Not complete: {run['error']}**")
            lines.append("")
        lines.append("| figure | target | measured | met |")
        lines.append("| --- | --- | --- | --- |")
        for item in run["figures"]:
            met = {True: "yes", False: "**no**", None: "(reported)"}[item["passed"]]
            measured = _fmt(item["measured"], item["unit"])
            extra = ""
            if "files_per_second" in item:
                fps = item["files_per_second"]
                extra = f" ({' vs '.join(str(v) for v in fps.values())} files/s)"
            elif "per_file_ms" in item:
                pf = item["per_file_ms"]
                extra = f" ({pf['queued']} vs {pf['plain']} ms/file)"
            elif "microseconds" in item:
                us = item["microseconds"]
                extra = f" ({us['queued']} vs {us['remote']} µs"
                if "x_remote_url_alone" in item:
                    extra += (
                        f"; {item['ledger_queries']} query; "
                        f"{item['x_remote_url_alone']:.2f}x remote.url() alone, "
                        f"{item.get('x_raw_sql_floor', 0):.2f}x with the query as "
                        "plain SQL"
                    )
                extra += ")"
            elif "milliseconds" in item:
                ms = item["milliseconds"]
                extra = f" ({ms['large']} vs {ms['small']} ms)"
            elif "rows_per_second" in item:
                rates = ", ".join(f"{r:g}" for r in item["rows_per_second"])
                cpu = ", ".join(f"{ms:.1f}" for ms in item["worker_cpu_ms_per_row"])
                load = ", ".join(f"{x:.1f}" for x in item["load_average"])
                extra = f" ({rates} rows/s; worker CPU {cpu} ms/row; load {load})"
            elif "raw_save_rise_mib" in item:
                extra = (
                    f" (worker {item.get('worker_rise_mib', 0):.1f} MiB, raw "
                    f"remote.save() {item['raw_save_rise_mib']:.1f} MiB"
                )
                fixed = item.get("fixed_mmap_threshold_difference_mib")
                if fixed is not None:
                    extra += f"; {fixed:+.1f} MiB with glibc's mmap threshold fixed"
                extra += ")"
            elif "steps" in item:
                extra = (
                    " ("
                    + "; ".join(
                        f"{step['objects']} objects: {step['audit_seconds']:.1f} s, peak "
                        f"RSS {step['audit_peak_rss_mib']:.1f} MiB (+"
                        f"{step['audit_rise_mib']:.1f}); the bare listing "
                        f"{step['listing_seconds']:.1f} s"
                        for step in item["steps"]
                    )
                    + ")"
                )
            elif "render_time_ratio" in item:
                extra = (
                    f" ({item['queries_without_prefetch']} without; render "
                    f"{item['render_time_ratio']:.2f}x the remote's own)"
                )
            lines.append(
                f"| {item['figure']} | {item['target']} | {measured}{extra} | {met} |"
            )
        lines.append("")
        plans = [
            (item["figure"], plan)
            for item in run["figures"]
            for plan in item.get("plans", [])
        ]
        if plans:
            lines.append("### EXPLAIN ANALYZE on the large ledger")
            lines.append("")
            for title, plan in plans:
                lines.append(f"{title}:")
                lines.append("")
                lines.append("```")
                lines.append(plan["sql"])
                lines.append("")
                lines.append(plan["plan"])
                lines.append("```")
                lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--full", action="store_true", help="the issue's sizes, more rounds"
    )
    parser.add_argument(
        "--db",
        help="comma-separated databases (default: sqlite,postgresql; with --full "
        "also mariadb)",
    )
    parser.add_argument("--only", help=f"comma-separated cases of {ALL_CASES}")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--no-write", action="store_true", help="print, do not write results/"
    )
    args = parser.parse_args()
    mode = "full" if args.full else "quick"
    vendors = (
        args.db or ("sqlite,postgresql,mariadb" if args.full else "sqlite,postgresql")
    ).split(",")
    cases = args.only.split(",") if args.only else list(ALL_CASES)
    unknown = set(cases) - set(ALL_CASES)
    if unknown:
        parser.error(f"unknown cases: {sorted(unknown)}")
    started = time.monotonic()
    load_before = os.getloadavg()
    runs = []
    for index, vendor in enumerate(vendors):
        these = [case for case in cases if not (index and case in DB_INDEPENDENT)]
        print(f"== {vendor}: {', '.join(these)}", flush=True)
        runs.append(run_database(vendor, mode, these, args.verbose))
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    report = {
        "mode": mode,
        "command": (
            ("make bench-full" if args.full else "make bench")
            if not args.only and not args.db
            else " ".join([".venv/bin/python -m benchmarks", *sys.argv[1:]])
        ),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit or "unknown",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "seconds": time.monotonic() - started,
        # Other work on the machine: each ratio is side by side, absolute
        # times are not comparable between runs.
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "niceness": os.nice(0),
        "runs": runs,
    }
    text = markdown(report)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        # A narrowed run is written beside the whole one, named after what it ran.
        suffix = (
            mode
            if not args.only and not args.db
            else "-".join([mode, *vendors, *cases])
        )
        (RESULTS / f"{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / f"{suffix}.md").write_text(text)
        print(f"written: benchmarks/results/{suffix}.json and .md")
    failed = [
        item["figure"]
        for run in runs
        for item in run["figures"]
        if item["passed"] is False
    ]
    errors = [run["database"] for run in runs if run.get("error")]
    print(
        f"{report['seconds']:.0f} s; targets missed: {len(failed)}; "
        f"databases with errors: {errors or 'none'}"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
