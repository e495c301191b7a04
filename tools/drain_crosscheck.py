"""Independent cross-check of issue 14's drain target, in one script.

The target: a drain of 2,000 x 10 KiB files to a ``FileSystemStorage`` remote
through ``manage.py process_transfers`` (the whole process, start-up included)
reaches >= 0.8 of a raw ``remote.save(name, local.open(name))`` loop, median of
interleaved rounds, both sides flushing their writes (``os.sync()``).

How to run (from the repository root, with the project's venv)::

    .venv/bin/python tools/drain_crosscheck.py --db sqlite --rounds 10
    .venv/bin/python tools/drain_crosscheck.py --db postgresql --rounds 10
    .venv/bin/python tools/drain_crosscheck.py --db sqlite --profile /tmp/drain.prof

What it does: it writes a throwaway project (settings module and ``manage.py``)
into a temporary directory, as README.rst configures one: ``STORAGES`` with a
``QueuedStorage`` (key ``media``) whose ``local`` and ``remote`` are
``FileSystemStorage`` aliases. ``--db sqlite`` uses a database file there;
``--db postgresql`` creates a database of its own (unique name) on
127.0.0.1:5432 as user ``postgres`` and drops it at the end. After ``migrate``,
``adopt_remote_files --storage media --new`` declares the remote new, as
README.rst tells a new site to do.

Each round, untimed: the ledger is flushed (``manage.py flush``, then the
``--new`` declaration again), and 2,000 files of
random bytes saved through ``default_storage.save()`` (the package's storage:
2,000 due rows; in transactions of 500 saves, only to make seeding quicker;
on PostgreSQL the tables are then ANALYZEd, as autovacuum would), then
``os.sync()``. Each round's files live in a directory of their own, and
nothing is deleted until the end (``--delete-between`` to delete them after
each round: deletions slow the next round's first side). Timed, in an order
that alternates each round:

* A, the command: ``subprocess.run([python, manage.py, "process_transfers"])``
  then ``os.sync()``. Afterwards all 2,000 rows must be ``done`` and each file
  on the remote with its size, or the script stops with an error.
* B, the raw loop: a subprocess that runs ``django.setup()`` with the same
  settings and ``remote.save(name, local.open(name))`` for the same names into a
  fresh empty remote directory (``storages["remote"]``), then ``os.sync()``.
  B's wall time (start-up included) is the issue's baseline; the loop's time
  inside that process (loop and ``os.sync()`` only, start-up excluded) is
  reported too, as variant B'.

Ratio = raw time / command time (1.0: the command is as fast as the raw loop).
Every round is printed, then the medians and ranges, and the medians of the
rounds of each order (the side that runs second is often faster: ``--settle``
waits after seeding to tell whether the seeding's background work is why). ``--profile PATH`` instead
runs one drain under ``python -m cProfile -o PATH`` and prints the package's
own functions (top 25 by cumulative and by own time) and the share of Django
start-up against the drain.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SETTINGS_MODULE = "xcheck_settings"
KEY = "media"

SETTINGS = '''\
"""Throwaway settings of tools/drain_crosscheck.py."""
import json
import os

SECRET_KEY = "drain-crosscheck-not-secret"
DEBUG = False
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "queued_storage",
]
DATABASES = {"default": json.loads(os.environ["XCHECK_DATABASE"])}
STORAGES = {
    "default": {
        "BACKEND": "queued_storage.backends.QueuedStorage",
        "OPTIONS": {"local": "local", "remote": "remote", "key": "media"},
    },
    "local": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": os.environ["XCHECK_LOCAL"], "base_url": "/media/"},
    },
    "remote": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": os.environ["XCHECK_REMOTE"], "base_url": "/remote/"},
    },
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
'''

MANAGE = """\
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "xcheck_settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""


def _raw_child(names_file: str) -> None:
    """Side B, in its own process: start-up, then the raw loop (timed alone)."""
    import django

    django.setup()
    from django.core.files.storage import storages

    local, remote = storages["local"], storages["remote"]
    names = Path(names_file).read_text().split()
    started = time.perf_counter()
    for name in names:
        with local.open(name) as content:
            saved = remote.save(name, content)
        if saved != name:
            raise SystemExit(f"raw loop: {name!r} saved as {saved!r}")
    looped = time.perf_counter()
    os.sync()
    finished = time.perf_counter()
    print(json.dumps({"loop": finished - started, "sync": finished - looped}))


def _profile_child(path: str, argv: list[str]) -> None:
    """``argv`` (a script and its arguments) under one cProfile profiler per
    thread, merged into ``path``: ``python -m cProfile`` sees the main thread
    only, and the drain copies in its lane threads."""
    import cProfile
    import pstats
    import runpy
    import threading

    profiles: list[cProfile.Profile] = []
    original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def bootstrap(thread: threading.Thread) -> None:
        profiler = cProfile.Profile()
        profiles.append(profiler)
        profiler.enable()
        try:
            original(thread)
        finally:
            profiler.disable()

    threading.Thread._bootstrap_inner = bootstrap  # type: ignore[attr-defined]
    main = cProfile.Profile()
    sys.argv = argv
    sys.path.insert(0, str(Path(argv[0]).resolve().parent))
    main.enable()
    try:
        runpy.run_path(argv[0], run_name="__main__")
    finally:
        main.disable()
        stats = pstats.Stats(main)
        for profiler in list(profiles):
            profiler.create_stats()
            stats.add(profiler)
        stats.dump_stats(path)


class Project:
    """The throwaway project: its directory, database and environment."""

    def __init__(
        self,
        db: str,
        files: int,
        size: int,
        settle: float = 0.0,
        delete_between: bool = False,
    ) -> None:
        self.db, self.files, self.size, self.settle = db, files, size, settle
        self.delete_between = delete_between
        self.round = 0
        self.root = Path(tempfile.mkdtemp(prefix="drain-crosscheck-"))
        self.local = self.root / "local"
        self.local.mkdir()
        (self.root / f"{SETTINGS_MODULE}.py").write_text(SETTINGS)
        (self.root / "manage.py").write_text(MANAGE)
        self.pg_name = ""
        if db == "sqlite":
            database = {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(self.root / "db.sqlite3"),
            }
        else:
            self.pg_name = f"xcheck_{os.getpid()}_{uuid.uuid4().hex[:8]}"
            self._pg(f'CREATE DATABASE "{self.pg_name}"')
            database = {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": self.pg_name,
                "USER": "postgres",
                "HOST": "127.0.0.1",
                "PORT": "5432",
            }
        self.env = dict(
            os.environ,
            DJANGO_SETTINGS_MODULE=SETTINGS_MODULE,
            PYTHONPATH=os.pathsep.join([str(self.root), str(REPO)]),
            XCHECK_DATABASE=json.dumps(database),
            XCHECK_LOCAL=str(self.local),
            XCHECK_REMOTE=str(self.root / "unused-remote"),
        )
        os.environ.update(self.env)
        sys.path[:0] = [str(self.root), str(REPO)]
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        self.names: list[str] = []
        self.names_file = self.root / "names.txt"

    @staticmethod
    def _pg(sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=5432, user="postgres", dbname="postgres"
        ) as conn:
            conn.autocommit = True
            conn.execute(sql)

    def seed(self) -> None:
        """Empty ledger and local directory, then ``files`` saves: due rows."""
        from django.core.files.base import ContentFile
        from django.core.files.storage import default_storage
        from django.core.management import call_command
        from django.db import connection, transaction

        call_command("flush", interactive=False, verbosity=0)
        call_command("adopt_remote_files", storage=KEY, new=True, verbosity=0)
        # Each round's files under a directory of their own: nothing is deleted
        # before the end unless --delete-between (see its help).
        self.round += 1
        if self.delete_between:
            shutil.rmtree(self.local)
            self.local.mkdir()
        self.names = [f"r{self.round}/f{index:05d}.bin" for index in range(self.files)]
        self.names_file.write_text("\n".join(self.names))
        for start in range(0, self.files, 500):
            with transaction.atomic():
                for name in self.names[start : start + 500]:
                    saved = default_storage.save(
                        name, ContentFile(os.urandom(self.size))
                    )
                    if saved != name:
                        raise SystemExit(f"seed: {name!r} saved as {saved!r}")
        if self.db == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE")
        due = self.counts()
        if due.get("queued") != self.files or len(due) != 1:
            raise SystemExit(f"seed: expected {self.files} queued rows, got {due}")
        connection.close()
        os.sync()
        if self.settle:
            # --settle: let the seeding's background work (database, file
            # system) end before the first timed side, then flush again.
            time.sleep(self.settle)
            os.sync()

    def counts(self) -> dict[str, int]:
        from django.db import connection
        from django.db.models import Count

        from queued_storage.models import PendingTransfer

        found = dict(
            PendingTransfer.objects.filter(storage_key=KEY)
            .values_list("status")
            .annotate(n=Count("pk"))
            .values_list("status", "n")
        )
        connection.close()
        return {status: n for status, n in found.items() if n}

    def check_remote(self, remote: Path, side: str) -> None:
        wrong = [
            name
            for name in self.names
            if not (remote / name).is_file()
            or (remote / name).stat().st_size != self.size
        ]
        if wrong:
            raise SystemExit(
                f"{side}: {len(wrong)} of {self.files} remote files missing or of "
                f"the wrong size, e.g. {wrong[:3]}"
            )

    def run(self, argv: list[str], remote: Path) -> subprocess.CompletedProcess[str]:
        env = dict(self.env, XCHECK_REMOTE=str(remote))
        done = subprocess.run(
            argv, cwd=self.root, env=env, capture_output=True, text=True
        )
        if done.returncode:
            raise SystemExit(
                f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def side_a(self, remote: Path, prefix: list[str] | None = None) -> dict[str, float]:
        """The timed command, then (untimed for the ratio) its checks and a second
        run with nothing due: the command's fixed cost (start-up, one poll)."""
        argv = [sys.executable, *(prefix or []), "manage.py", "process_transfers"]
        started = time.perf_counter()
        self.run(argv, remote)
        ran = time.perf_counter()
        os.sync()
        finished = time.perf_counter()
        counts = self.counts()
        if counts != {"done": self.files}:
            raise SystemExit(f"command: rows after the drain: {counts}")
        self.check_remote(remote, "command")
        empty = time.perf_counter()
        self.run([sys.executable, "manage.py", "process_transfers"], remote)
        return {
            "command": finished - started,
            "a_sync": finished - ran,
            "empty": time.perf_counter() - empty,
        }

    def side_b(self, remote: Path) -> dict[str, float]:
        argv = [sys.executable, __file__, "--raw-child", str(self.names_file)]
        started = time.perf_counter()
        done = self.run(argv, remote)
        os.sync()
        elapsed = time.perf_counter() - started
        self.check_remote(remote, "raw loop")
        inside = json.loads(done.stdout.strip().splitlines()[-1])
        return {"raw": elapsed, "loop": inside["loop"], "b_sync": inside["sync"]}

    def close(self) -> None:
        from django.db import connections

        connections.close_all()
        if self.pg_name:
            self._pg(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')
        shutil.rmtree(self.root, ignore_errors=True)


def rounds(project: Project, count: int) -> None:
    rows: list[dict[str, float]] = []
    print(f"db={project.db} files={project.files} size={project.size} rounds={count}")
    print(
        "round first command_s  raw_s loop_s  ratio ratio_loop   a_sync b_sync empty_s"
    )
    for number in range(count):
        project.seed()
        remote_a = project.root / f"remote-a-{number}"
        remote_b = project.root / f"remote-b-{number}"
        if number % 2 == 0:
            first = "A"
            row = project.side_a(remote_a)
            row |= project.side_b(remote_b)
        else:
            first = "B"
            row = project.side_b(remote_b)
            row |= project.side_a(remote_a)
        if project.delete_between:
            shutil.rmtree(remote_a)
            shutil.rmtree(remote_b)
        row["a_first"] = float(first == "A")
        row["ratio"] = row["raw"] / row["command"]
        row["ratio_loop"] = row["loop"] / row["command"]
        rows.append(row)
        print(
            f"{number:5d} {first:5s} {row['command']:9.3f} {row['raw']:6.3f} "
            f"{row['loop']:6.3f} {row['ratio']:6.3f} {row['ratio_loop']:10.3f} "
            f"{row['a_sync']:8.3f} {row['b_sync']:6.3f} {row['empty']:7.3f}",
            flush=True,
        )
    for field, label in [
        ("command", "command_s (A: process_transfers + os.sync)"),
        ("raw", "raw_s (B: raw loop process, start-up included, + os.sync)"),
        ("loop", "loop_s (B': the raw loop + os.sync inside the process)"),
        ("ratio", "RATIO raw_s/command_s (issue 14's measure)"),
        ("ratio_loop", "ratio loop_s/command_s (raw start-up excluded)"),
        ("a_sync", "a_sync (os.sync after the command)"),
        ("b_sync", "b_sync (os.sync inside the raw loop process)"),
        ("empty", "empty_s (process_transfers with nothing due, untimed)"),
    ]:
        values = [row[field] for row in rows]
        print(
            f"median {label}: {statistics.median(values):.3f} "
            f"(range {min(values):.3f}-{max(values):.3f})"
        )
    for flag, label in [(1.0, "A (command) first"), (0.0, "B (raw) first")]:
        some = [row for row in rows if row["a_first"] == flag]
        if some:
            medians = "  ".join(
                f"{field} {statistics.median(row[field] for row in some):.3f}"
                for field in ["command", "raw", "loop", "ratio", "ratio_loop"]
            )
            print(f"rounds with {label}: {medians}")


def _report(path: str, elapsed: float, title: str) -> None:
    import pstats

    stats = pstats.Stats(path)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = stats.total_tt  # type: ignore[attr-defined]

    def cumulative(file_end: str, function: str) -> float:
        return sum(
            float(value[3])
            for (file, _line, name), value in raw.items()
            if file.endswith(file_end) and name == function
        )

    setup = cumulative("django/__init__.py", "setup")
    handle = cumulative("commands/process_transfers.py", "handle")
    print(f"== {title}: {path}")
    print(f"wall {elapsed:.3f} s (profiled), profile total {total:.3f} s")
    print(f"django.setup(): {setup:.3f} s; process_transfers handle(): {handle:.3f} s")
    own = {key: value for key, value in raw.items() if "/queued_storage/" in key[0]}
    for index, label in [(3, "cumulative"), (2, "tottime")]:
        print(f"top 25 queued_storage functions by {label}:")
        print("   ncalls    tottime    cumtime  function")
        ranked = sorted(own.items(), key=lambda item: item[1][index], reverse=True)
        for (file, line, name), value in ranked[:25]:
            where = file[file.rindex("/queued_storage/") + 1 :]
            print(
                f"{value[1]:9d} {value[2]:10.3f} {value[3]:10.3f}  {where}:{line}({name})"
            )


def profile(project: Project, path: str) -> None:
    """One drain under ``python -m cProfile -o path`` (the main thread: start-up
    against the drain), then one under a profiler per thread (``path`` with
    ``-threads`` before its suffix: where the lanes spend their time)."""
    project.seed()
    elapsed = project.side_a(
        project.root / "remote-profile", ["-m", "cProfile", "-o", path]
    )["command"]
    _report(path, elapsed, "python -m cProfile (main thread only)")
    threads = str(Path(path).with_name(Path(path).stem + "-threads.prof"))
    project.seed()
    elapsed = project.side_a(
        project.root / "remote-profile-threads",
        [__file__, "--profile-child", threads],
    )["command"]
    _report(threads, elapsed, "a profiler per thread, merged")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--raw-child":
        _raw_child(sys.argv[2])
        return
    if len(sys.argv) > 3 and sys.argv[1] == "--profile-child":
        _profile_child(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=10 * 1024)
    parser.add_argument("--profile", metavar="PATH", help="profile one drain")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long (then os.sync() again) after seeding, before the "
        "first timed side (default 0: as issue 14 measures)",
    )
    parser.add_argument(
        "--delete-between",
        action="store_true",
        help="delete each round's local and remote files before the next round "
        "(default: all are kept until the end; on an ext4 mounted with discard "
        "here, 2,000 deletions slow the next 2,000 creations several times, "
        "which penalises whichever side runs first)",
    )
    args = parser.parse_args()
    project = Project(args.db, args.files, args.size, args.settle, args.delete_between)
    try:
        if args.profile:
            profile(project, args.profile)
        else:
            rounds(project, args.rounds)
    finally:
        project.close()


if __name__ == "__main__":
    main()
