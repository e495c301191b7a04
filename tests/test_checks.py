"""System checks, asserted by their IDs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import CheckMessage, Error, Tags, register, run_checks
from django.core.checks.registry import registry
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.utils.module_loading import import_string

from queued_storage import checks
from queued_storage.checks import WORKER_LIBRARIES, check_settings, check_storages
from queued_storage.conf import settings as conf
from tests.helpers import BACKEND, FS, queued_alias


def check_ids() -> list[str | None]:
    return [message.id for message in check_storages() + check_settings()]


def errors_with(check_id: str) -> list[CheckMessage]:
    return [
        message
        for message in check_storages() + check_settings()
        if message.id == check_id
    ]


def test_default_test_settings_pass_the_checks() -> None:
    assert check_ids() == []
    messages = [m for m in run_checks() if m.id and m.id.startswith("queued_storage")]
    assert messages == []


@pytest.mark.parametrize(
    "options",
    [
        {"local": "no.such.Storage", "remote": "queued_remote"},
        {"local": "queued_local", "remote": "collections.OrderedDict"},
        {"local": "queued_local"},
        {},
        {"local": "queued_local", "remote": "queued_remote", "colour": "blue"},
    ],
    ids=["bad-local", "bad-remote", "no-remote", "no-options", "unknown-option"],
)
def test_e001_queued_storage_in_storages_that_cannot_be_built(
    settings: Any, options: dict[str, Any]
) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "broken": {"BACKEND": BACKEND, "OPTIONS": options},
    }

    (error,) = errors_with("queued_storage.E001")

    assert "'broken'" in error.msg
    assert error.hint


def test_the_storage_checks_import_no_backend_of_django_or_django_storages(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """None of those is a queued storage: importing them (staticfiles' storage,
    an SDK's) only made a worker's start-up slower."""
    settings.STORAGES = {
        **settings.STORAGES,
        "static": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
        "s3": {"BACKEND": "storages.backends.s3.S3Storage"},
    }
    imported: list[str] = []

    def noted(path: str) -> Any:
        imported.append(path)
        return import_string(path)

    monkeypatch.setattr(checks, "import_string", noted)

    assert check_ids() == []

    assert imported, "the other backends are still looked at"
    assert not [path for path in imported if path.startswith(("django.", "storages."))]


def test_e001_not_raised_for_a_good_queued_storage_in_storages(
    settings: Any, forget_keys: list[str]
) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "good": {
            "BACKEND": BACKEND,
            "OPTIONS": {"local": "queued_local", "remote": "queued_remote", "key": "g"},
        },
    }
    forget_keys.append("g")

    assert check_ids() == []


def test_e002_two_differently_configured_storages_share_a_key(
    settings: Any, tmp_path: Path, forget_keys: list[str]
) -> None:
    forget_keys.append("shared")
    options = {"location": str(tmp_path / "l")}
    secret = {"location": str(tmp_path / "r"), "base_url": "https://s3cr3t.example/"}
    first = queued_alias(local_options=options, remote_options=secret, key="shared")
    settings.STORAGES = {**settings.STORAGES, "first": first}
    assert check_ids() == []

    second = queued_alias(
        local_options=options, remote_options=secret, delayed=True, key="shared"
    )
    settings.STORAGES = {**settings.STORAGES, "second": second}

    (error,) = errors_with("queued_storage.E002")
    assert "'shared'" in error.msg
    assert "delayed=True" in error.msg and "delayed=False" in error.msg
    assert "s3cr3t" not in error.msg  # options may hold credentials


def test_e002_default_key_ignores_options(settings: Any, tmp_path: Path) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "a": queued_alias(remote_options={"location": str(tmp_path / "a")}),
        "b": queued_alias(remote_options={"location": str(tmp_path / "b")}),
    }

    (error,) = errors_with("queued_storage.E002")
    assert f"'{FS}>{FS}'" in error.msg
    assert "remote_options" in error.msg  # what differs, never its value
    assert str(tmp_path) not in error.msg


def test_e002_not_raised_for_identically_configured_storages(settings: Any) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "twin": queued_alias(key="twins"),
        "other_twin": queued_alias(key="twins"),
    }

    assert errors_with("queued_storage.E002") == []


def test_e003_unknown_worker(settings: Any) -> None:
    settings.QUEUED_STORAGE_WORKER = "rq"

    assert check_ids() == ["queued_storage.E003"]


@pytest.mark.parametrize("worker", [None, "immediate"])
def test_e003_not_raised_for_a_known_worker(settings: Any, worker: str | None) -> None:
    settings.QUEUED_STORAGE_WORKER = worker

    assert check_ids() == []


def fake_find_spec(monkeypatch: pytest.MonkeyPatch, *, missing: set[str]) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        if name in missing:
            return None
        if name in {"django_q", "django_tasks", "django.tasks", "celery"}:
            return importlib.util.spec_from_loader(name, loader=None)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_e004_django_q_worker_without_django_q(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.QUEUED_STORAGE_WORKER = "django_q"
    fake_find_spec(monkeypatch, missing={"django_q"})

    (error,) = errors_with("queued_storage.E004")

    assert "django-q2" in error.msg


def test_e004_not_raised_when_django_q_is_installed(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.QUEUED_STORAGE_WORKER = "django_q"
    fake_find_spec(monkeypatch, missing=set())

    assert check_ids() == []


def test_e013_celery_worker_without_celery(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.QUEUED_STORAGE_WORKER = "celery"
    fake_find_spec(monkeypatch, missing={"celery"})

    (error,) = errors_with("queued_storage.E013")

    assert "Celery is not installed" in error.msg
    assert error.hint and "pip install 'django-queued-storage[celery]'" in error.hint


def test_e013_not_raised_when_celery_is_installed(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.QUEUED_STORAGE_WORKER = "celery"
    fake_find_spec(monkeypatch, missing=set())

    assert check_ids() == []


def test_e012_django_tasks_worker_without_a_tasks_framework(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.QUEUED_STORAGE_WORKER = "django_tasks"
    fake_find_spec(monkeypatch, missing={"django_tasks", "django.tasks"})

    assert check_ids() == ["queued_storage.E012"]


#: Each setting's own check ID: silencing one never hides another.
SETTING_CHECKS = {
    "QUEUED_STORAGE_RETRIES": "queued_storage.E005",
    "QUEUED_STORAGE_RETRY_DELAY": "queued_storage.E008",
    "QUEUED_STORAGE_LEASE": "queued_storage.E009",
    "QUEUED_STORAGE_HEALTH_MAX_AGE": "queued_storage.E010",
    "QUEUED_STORAGE_CACHE_PREFIX": "queued_storage.E011",
    "QUEUED_STORAGE_TRANSFER_TIMEOUT": "queued_storage.E007",
    "QUEUED_STORAGE_HISTORY_RETENTION": "queued_storage.E015",
}
HUGE_INT = 10**400  # too large for a float


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("QUEUED_STORAGE_RETRIES", -1),
        ("QUEUED_STORAGE_RETRIES", 1.5),
        ("QUEUED_STORAGE_RETRIES", "5"),
        ("QUEUED_STORAGE_RETRIES", float("nan")),
        ("QUEUED_STORAGE_RETRIES", 2**31),
        ("QUEUED_STORAGE_RETRIES", HUGE_INT),
        ("QUEUED_STORAGE_RETRY_DELAY", "x"),
        ("QUEUED_STORAGE_RETRY_DELAY", -1),
        ("QUEUED_STORAGE_RETRY_DELAY", float("nan")),
        ("QUEUED_STORAGE_RETRY_DELAY", float("-inf")),
        ("QUEUED_STORAGE_RETRY_DELAY", 1e300),
        ("QUEUED_STORAGE_LEASE", 0),
        ("QUEUED_STORAGE_LEASE", True),
        ("QUEUED_STORAGE_LEASE", float("nan")),
        ("QUEUED_STORAGE_LEASE", float("inf")),
        ("QUEUED_STORAGE_LEASE", HUGE_INT),
        ("QUEUED_STORAGE_LEASE", 100 * 365 * 86400 + 1),
        ("QUEUED_STORAGE_HEALTH_MAX_AGE", 0),
        ("QUEUED_STORAGE_HEALTH_MAX_AGE", "15m"),
        ("QUEUED_STORAGE_HEALTH_MAX_AGE", float("inf")),
        ("QUEUED_STORAGE_TRANSFER_TIMEOUT", float("nan")),
        ("QUEUED_STORAGE_TRANSFER_TIMEOUT", 1e20),
        ("QUEUED_STORAGE_HISTORY_RETENTION", 3600),
        ("QUEUED_STORAGE_HISTORY_RETENTION", float("inf")),
        ("QUEUED_STORAGE_CACHE_PREFIX", 3),
        ("QUEUED_STORAGE_CACHE_PREFIX", None),
    ],
)
def test_each_bad_setting_has_its_own_check_id(
    settings: Any, setting: str, value: Any
) -> None:
    setattr(settings, setting, value)

    (error,) = errors_with(SETTING_CHECKS[setting])

    assert setting in error.msg
    assert error.hint
    assert check_ids() == [SETTING_CHECKS[setting]]


def test_no_two_problems_share_a_check_id() -> None:
    worker_ids = [entry[3] for entry in WORKER_LIBRARIES.values()]
    fixed = ["queued_storage.E001", "queued_storage.E002", "queued_storage.E003"]
    # E016: the app not installed; W001/W002: the ledger not migrated (see
    # tests/test_first_mistakes.py).
    first_mistakes = [
        "queued_storage.E016",
        "queued_storage.W001",
        "queued_storage.W002",
    ]
    every = [
        *fixed,
        *worker_ids,
        "queued_storage.E006",
        *SETTING_CHECKS.values(),
        *first_mistakes,
    ]
    assert len(every) == len(set(every))


@pytest.mark.parametrize(
    "setting",
    [
        "QUEUED_STORAGE_RETRY_DELAY",
        "QUEUED_STORAGE_LEASE",
        "QUEUED_STORAGE_TRANSFER_TIMEOUT",
        "QUEUED_STORAGE_HEALTH_MAX_AGE",
        "QUEUED_STORAGE_HISTORY_RETENTION",
    ],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300, HUGE_INT])
def test_a_duration_setting_no_worker_can_use_is_refused_at_first_use(
    settings: Any, setting: str, value: Any
) -> None:
    """Where checks do not run (call_command(skip_checks=True), a shell)."""
    setattr(settings, setting, value)

    with pytest.raises(ImproperlyConfigured, match=setting):
        getattr(conf, setting)


@pytest.mark.parametrize("value", [float("nan"), 2**31, HUGE_INT, -1])
def test_a_retry_count_no_worker_can_use_is_refused_at_first_use(
    settings: Any, value: Any
) -> None:
    settings.QUEUED_STORAGE_RETRIES = value

    with pytest.raises(ImproperlyConfigured, match="QUEUED_STORAGE_RETRIES"):
        _ = conf.QUEUED_STORAGE_RETRIES


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("QUEUED_STORAGE_RETRIES", 0),
        ("QUEUED_STORAGE_RETRY_DELAY", 0),
        ("QUEUED_STORAGE_RETRY_DELAY", 2.5),
        ("QUEUED_STORAGE_LEASE", 1),
        ("QUEUED_STORAGE_HEALTH_MAX_AGE", 1),
        ("QUEUED_STORAGE_CACHE_PREFIX", ""),
        ("QUEUED_STORAGE_LEASE", 100 * 365 * 86400),
        ("QUEUED_STORAGE_RETRIES", 2**31 - 1),
    ],
)
def test_no_check_fails_for_edge_values(
    settings: Any, setting: str, value: Any
) -> None:
    setattr(settings, setting, value)

    assert check_ids() == []


def test_e006_host_name_longer_than_the_ledger_keeps(settings: Any) -> None:
    settings.QUEUED_STORAGE_HOSTNAME = "h" * 256

    (error,) = errors_with("queued_storage.E006")

    assert "256 characters" in error.msg
    assert "255" in error.msg
    assert error.hint
    assert check_ids() == ["queued_storage.E006"]


def test_e006_machine_host_name_longer_than_the_ledger_keeps(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.QUEUED_STORAGE_HOSTNAME = None
    monkeypatch.setattr("socket.gethostname", lambda: "m" * 300)

    (error,) = errors_with("queued_storage.E006")

    assert "300 characters" in error.msg
    assert error.hint and "QUEUED_STORAGE_HOSTNAME" in error.hint


def test_e006_not_raised_for_a_host_name_of_255_characters(settings: Any) -> None:
    settings.QUEUED_STORAGE_HOSTNAME = "h" * 255

    assert check_ids() == []


def test_manage_py_check_fails_for_a_bad_worker(settings: Any) -> None:
    settings.QUEUED_STORAGE_WORKER = "rq"

    with pytest.raises(SystemCheckError, match=r"queued_storage\.E003"):
        call_command("check")


@pytest.mark.parametrize(
    "value", [0, 0.5, "10m", True, None, float("nan"), float("inf")]
)
def test_e007_bad_transfer_timeout(settings: Any, value: Any) -> None:
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = value

    (error,) = errors_with("queued_storage.E007")

    assert "QUEUED_STORAGE_TRANSFER_TIMEOUT" in error.msg
    assert check_ids() == ["queued_storage.E007"]


def test_the_default_transfer_timeout_passes_the_checks(settings: Any) -> None:
    del settings.QUEUED_STORAGE_TRANSFER_TIMEOUT

    assert check_ids() == []


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("QUEUED_STORAGE_LEASE", float("nan")),
        ("QUEUED_STORAGE_LEASE", float("inf")),
        ("QUEUED_STORAGE_TRANSFER_TIMEOUT", -1),
        ("QUEUED_STORAGE_RETRY_DELAY", "60"),
        ("QUEUED_STORAGE_RETRIES", 2.5),
        ("QUEUED_STORAGE_HEALTH_MAX_AGE", True),
    ],
)
@pytest.mark.django_db
def test_a_number_setting_no_worker_can_use_fails_at_first_use_naming_it(
    settings: Any, setting: str, value: Any
) -> None:
    """Where checks do not run (call_command, a web process), a setting that no
    worker can compute with is a clear error naming it, not a ValueError or a
    NaN lease deep in the engine."""
    from django.core.exceptions import ImproperlyConfigured

    from queued_storage.conf import settings as conf

    setattr(settings, setting, value)
    with pytest.raises(ImproperlyConfigured, match=setting):
        getattr(conf, setting)


@pytest.mark.parametrize("value", [-1, 1.5, "128k", True, 33 * 1024 * 1024])
def test_e023_bad_worker_mmap_threshold(settings: Any, value: Any) -> None:
    settings.QUEUED_STORAGE_WORKER_MMAP_THRESHOLD = value

    (error,) = errors_with("queued_storage.E023")

    assert "QUEUED_STORAGE_WORKER_MMAP_THRESHOLD" in error.msg
    with pytest.raises(ImproperlyConfigured, match="WORKER_MMAP_THRESHOLD"):
        _ = conf.QUEUED_STORAGE_WORKER_MMAP_THRESHOLD


@pytest.mark.parametrize("value", [None, 0, 128 * 1024, 32 * 1024 * 1024])
def test_e023_not_raised_for_a_usable_worker_mmap_threshold(
    settings: Any, value: Any
) -> None:
    settings.QUEUED_STORAGE_WORKER_MMAP_THRESHOLD = value

    assert check_ids() == []


@pytest.mark.django_db
def test_process_transfers_stops_at_the_packages_checks(settings: Any) -> None:
    settings.QUEUED_STORAGE_WORKER = "rq"

    with pytest.raises(SystemCheckError, match=r"queued_storage\.E003"):
        call_command("process_transfers", verbosity=0, skip_checks=False)


@pytest.mark.django_db
def test_process_transfers_runs_without_the_sites_other_checks() -> None:
    """A cron run pays for this package's checks only; ``manage.py check`` still
    reports the site's."""

    def site_check(**kwargs: Any) -> list[CheckMessage]:
        return [Error("a problem of the site's", id="site.E001")]

    register(site_check, Tags.models)
    try:
        call_command("process_transfers", verbosity=0, skip_checks=False)
        with pytest.raises(SystemCheckError, match=r"site\.E001"):
            call_command("check")
    finally:
        registry.registered_checks.discard(site_check)
