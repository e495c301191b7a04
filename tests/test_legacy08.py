"""A site written from the django-queued-storage 0.8 documentation, switched to
0.9 as the README's "Coming from django-queued-storage 0.8" says, run end to end.

The site lives in ``tests/legacy08/`` (its own settings, models, migrations and
``manage.py``); it never shares this suite's settings. Its test suite
(``tests/legacy08/site_tests/``, one test per promise of the 0.8 docs) runs once
in a pytest process of its own and each of its tests is reported here by name.
The other tests drive the site with ``manage.py`` against a database of its own:
its TestCase tests under ``manage.py test``, the README's step-by-step switch of
a live site, and the site as 0.8 left it (without the ``key=`` arguments).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.databases import live_database, run_id
from tests.s3 import make_bucket, s3_client

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "tests" / "legacy08"
SUITE = SITE / "site_tests"


def site_tests() -> list[str]:
    """The names of the site's tests, read from its files without importing them."""
    names = []
    for path in sorted(SUITE.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        names += [
            f"{path.stem}::{node.name}"
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
        ]
    return names


def site_env(var: Path, database: str, endpoint: str, bucket: str) -> dict[str, str]:
    """The environment the site's settings read (see mysite/settings.py)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("QUEUED_STORAGE_TEST_OVERRIDES", "PYTEST_"))
    }
    env.update(
        DJANGO_SETTINGS_MODULE="mysite.settings",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(SITE)]),
        LEGACY08_DB_NAME=database,
        LEGACY08_VAR=str(var),
        LEGACY08_S3_ENDPOINT=endpoint,
        LEGACY08_S3_BUCKET=bucket,
    )
    env.pop("LEGACY08_USE_TEST_DB", None)
    return env


def run(
    env: dict[str, str], *args: str, cwd: Path = SITE, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def manage(
    env: dict[str, str], *args: str, cwd: Path = SITE
) -> subprocess.CompletedProcess[str]:
    return run(env, "manage.py", *args, cwd=cwd)


def output(done: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )


def database_name(purpose: str) -> str:
    return f"legacy08_{run_id()}_{purpose}_{uuid.uuid4().hex[:6]}"


@pytest.fixture
def site(tmp_path: Path, s3_endpoint: str) -> Iterator[dict[str, str]]:
    """The site's environment with a live database, a bucket and folders of its own."""
    name = database_name("live")
    with live_database(name):
        yield site_env(tmp_path, name, s3_endpoint, make_bucket(s3_endpoint))


# The site's own suite, run once and reported test by test.


@pytest.fixture(scope="module")
def suite_results(
    tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str
) -> tuple[dict[str, list[str]], str]:
    """Run the site's test suite; map each test to its failures ("" when passed)."""
    var = tmp_path_factory.mktemp("legacy08-suite")
    env = site_env(var, database_name("suite"), s3_endpoint, make_bucket(s3_endpoint))
    report = var / "junit.xml"
    done = run(
        env,
        "-m",
        "pytest",
        "-p",
        "no:randomly",
        "-q",
        f"--junitxml={report}",
        timeout=1200,
    )
    results: dict[str, list[str]] = {}
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            module = case.get("classname", "").rpartition(".")[2]
            name = re.sub(r"\[.*\]$", "", case.get("name", ""))
            problems = results.setdefault(f"{module}::{name}", [])
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    problems.append(
                        f"{child.tag}: {child.get('message', '')}\n{child.text or ''}"
                    )
    return results, output(done)


@pytest.mark.parametrize("test", site_tests())
def test_site_suite(test: str, suite_results: tuple[dict[str, list[str]], str]) -> None:
    """One test of the site's suite passed (no skip, no xfail, no error)."""
    results, log = suite_results
    assert test in results, f"{test} did not run:\n{log[-6000:]}"
    problems = results[test]
    assert not problems, "\n".join(problems)


def test_site_testcases_pass_under_manage_py_test(site: dict[str, str]) -> None:
    """``manage.py test`` builds the test database through the 0.8-era migration
    (storages without key=, a removed backend) and runs the site's TestCase tests,
    which see the ledger's after-commit work through captureOnCommitCallbacks."""
    done = manage(site, "test", "mysite.gallery", "--noinput", "-v", "2")
    assert done.returncode == 0, output(done)
    assert "Ran 2 tests" in done.stderr
    assert "skipped" not in done.stderr
    assert "queued_storage.E" not in done.stdout + done.stderr


def _shell(site: dict[str, str], code: str, cwd: Path = SITE) -> Any:
    """Run ``code`` in ``manage.py shell``; it prints one JSON value."""
    done = manage(site, "shell", "-c", code, cwd=cwd)
    assert done.returncode == 0, output(done)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_live_site_switch_step_by_step(site: dict[str, str]) -> None:
    """The README's step-by-step switch of a live 0.8 site: migrate, adopt the
    remote, backfill the local-only files, run the worker, watch transfer_status."""
    s3 = s3_client(site["LEGACY08_S3_ENDPOINT"])
    bucket = site["LEGACY08_S3_BUCKET"]
    media = Path(site["LEGACY08_VAR"]) / "media"

    # The site as 0.8 left it: its tables at 0001 (0.8 had no ledger), a photo
    # that 0.8's TransferAndDelete moved to S3 (no local copy), and a report
    # saved locally that 0.8's Celery never transferred.
    done = manage(site, "migrate", "gallery", "0001")
    assert done.returncode == 0, output(done)
    s3.put_object(Bucket=bucket, Key="photos/2016/beach.png", Body=b"beach 2016")
    (media / "reports").mkdir(parents=True)
    (media / "reports" / "q4.png").write_bytes(b"q4 report")
    done = manage(
        site,
        "migrate",
        "transferlog",
    )
    assert done.returncode == 0, output(done)

    # 1. Migrate: the ledger's tables and the site's migration for the switch.
    done = manage(site, "migrate", "--noinput")
    assert done.returncode == 0, output(done)
    assert "Applying queued_storage.0001_initial" in done.stdout
    assert "Applying gallery.0002_switch_to_0_9" in done.stdout
    done = manage(site, "check")
    assert done.returncode == 0, output(done)
    _shell(
        site,
        "from mysite.gallery.models import Photo, Report; "
        "Photo.objects.create(image='photos/2016/beach.png'); "
        "Report.objects.create(file='reports/q4.png'); print('null')",
    )

    # 2. Adopt the remote of every S3 storage (they share the bucket).
    for key in ("s3-delete", "s3-notify", "s3-delayed"):
        done = manage(site, "adopt_remote_files", "--storage", key)
        assert done.returncode == 0, output(done)

    # 3. Backfill the files saved locally and never transferred.
    done = manage(site, "queue_transfers", "--storage", "s3-notify")
    assert done.returncode == 0, output(done)

    # 4. The worker (cron), then 5. transfer_status.
    done = manage(site, "process_transfers")
    assert done.returncode == 0, output(done)
    done = manage(site, "transfer_status", "--json", "--max-failed", "0")
    assert done.returncode == 0, output(done)
    status = json.loads(done.stdout)
    assert status["storages"]["s3-notify"]["done"] >= 1
    assert status["totals"]["failed"] == 0

    served = _shell(
        site,
        "import json; from django.core.files.base import ContentFile; "
        "from mysite.gallery.models import Photo, Report; "
        "p = Photo.objects.get(image='photos/2016/beach.png'); "
        "r = Report.objects.get(file='reports/q4.png'); "
        "new = Photo.objects.create(image=ContentFile(b'new', name='2016/beach.png')); "
        "print(json.dumps([p.image.url, p.image.read().decode(), r.file.url, "
        "new.image.name]))",
    )
    old_url, old_bytes, report_url, new_name = served
    endpoint = site["LEGACY08_S3_ENDPOINT"]
    assert old_url.startswith(f"{endpoint}/{bucket}/photos/2016/beach.png")
    assert old_bytes == "beach 2016"
    assert report_url.startswith(f"{endpoint}/{bucket}/reports/q4.png")
    assert new_name != "photos/2016/beach.png"
    body = s3.get_object(Bucket=bucket, Key="reports/q4.png")["Body"].read()
    assert body == b"q4 report"
    assert s3.get_object(Bucket=bucket, Key="photos/2016/beach.png")["Body"].read() == (
        b"beach 2016"
    )


def test_site_without_key_fails_loudly_naming_both(
    site: dict[str, str], tmp_path: Path
) -> None:
    """The site exactly as 0.8 left it, without the one change (the key= of the
    storages that share their classes): ``manage.py check`` reports the shared key
    and the first use of such a storage raises, naming both storages and the fix."""
    copy = tmp_path / "site08"
    shutil.copytree(SITE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    models = copy / "mysite" / "gallery" / "models.py"
    stripped = re.sub(r',\s*key="[^"]+"', "", models.read_text())
    assert 'key="' not in stripped
    models.write_text(stripped)
    (copy / "mysite" / "gallery" / "migrations" / "0002_switch_to_0_9.py").unlink()
    env = {**site, "PYTHONPATH": os.pathsep.join([str(ROOT), str(copy)])}

    done = manage(env, "check", cwd=copy)
    assert done.returncode != 0, output(done)
    assert "queued_storage.E002" in done.stderr, output(done)
    assert "key=" in done.stderr, output(done)

    # migrate runs the checks too; skipped, the first use is what must fail.
    done = manage(env, "migrate", "--noinput", "--skip-checks", cwd=copy)
    assert done.returncode == 0, output(done)
    first_use = _shell(
        env,
        "import json, os; from django.conf import settings; "
        "from django.core.exceptions import ImproperlyConfigured; "
        "from django.core.files.base import ContentFile; "
        "from mysite.gallery.models import Photo; "
        "from queued_storage.models import PendingTransfer\n"
        "try:\n"
        "    Photo.objects.create(image=ContentFile(b'x', name='x.png'))\n"
        "    error = None\n"
        "except ImproperlyConfigured as exc:\n"
        "    error = str(exc)\n"
        "print(json.dumps([error, PendingTransfer.objects.count(), "
        "[f for _d, _s, fs in os.walk(settings.MEDIA_ROOT) for f in fs]]))",
        cwd=copy,
    )
    message, rows, files = first_use
    assert message is not None, "the first use of a storage with a shared key worked"
    assert message.count("QueuedS3BotoStorage(") >= 1, message
    assert message.count("Storage(local=") >= 2, message
    assert "key=" in message, message
    assert rows == 0
    assert files == [], "the refused save left a local file"
