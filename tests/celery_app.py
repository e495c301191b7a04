"""The test suite's Celery app, wired as README "Celery" tells a site to wire its
``celery.py``. The worker and beat processes of tests/test_celery.py run it
(``celery -A tests.celery_app``); the broker and queue come from the settings
the test hands them. Each task the worker runs is appended, as a JSON line, to
the file named by ``QUEUED_STORAGE_TEST_CELERY_LOG``."""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery
from celery.signals import task_postrun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["queued_storage.integrations"], related_name="celery")

LOG_ENV = "QUEUED_STORAGE_TEST_CELERY_LOG"


@task_postrun.connect
def record_run(
    sender: Any = None,
    task_id: str | None = None,
    args: Any = None,
    retval: Any = None,
    state: str | None = None,
    **kwargs: Any,
) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    entry = {
        "task": getattr(sender, "name", None),
        "id": task_id,
        "args": list(args or ()),
        "retval": retval,
        "state": state,
    }
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(entry, default=repr) + "\n")
