"""Celery is optional: with it absent, every module but its integration imports,
and ``manage.py check`` says what to install for ``QUEUED_STORAGE_WORKER =
"celery"``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.workers import ROOT, worker_env

# Runs in a process of its own where Celery and its transport libraries are
# absent, as on a site that never installed them: a None in sys.modules makes an
# import raise ModuleNotFoundError and importlib.util.find_spec() return None.
SCRIPT = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    BLOCKED = ("celery", "kombu", "billiard", "amqp", "redis", "vine")
    for name in BLOCKED:
        sys.modules[name] = None

    import django
    django.setup()
    import queued_storage

    imported, refused = [], {}
    for module in pkgutil.walk_packages(queued_storage.__path__, "queued_storage."):
        try:
            importlib.import_module(module.name)
            imported.append(module.name)
        except ImportError as exc:
            refused[module.name] = str(exc)

    from django.core.checks import run_checks
    from django.test.utils import override_settings

    with override_settings(QUEUED_STORAGE_WORKER="celery"):
        errors = [
            {"id": e.id, "msg": e.msg, "hint": e.hint}
            for e in run_checks()
            if e.id == "queued_storage.E013"
        ]
    print(json.dumps({
        "imported": imported,
        "refused": refused,
        "errors": errors,
        "loaded": sorted(
            m for m, module in sys.modules.items()
            if module is not None and m.split(".")[0] in BLOCKED
        ),
    }))
    """
)


def test_the_core_imports_and_checks_without_celery() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])

    assert list(report["refused"]) == ["queued_storage.integrations.celery"]
    assert "celery" in report["refused"]["queued_storage.integrations.celery"]
    assert "queued_storage.transfer" in report["imported"]
    assert "queued_storage.integrations.django_q" in report["imported"]
    assert report["loaded"] == []
    [error] = report["errors"]
    assert error["msg"] == (
        "QUEUED_STORAGE_WORKER is 'celery' but Celery is not installed."
    )
    assert "pip install 'django-queued-storage[celery]'" in error["hint"]
