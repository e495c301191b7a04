"""The worker process pins glibc's mmap threshold, and only where it may."""

from __future__ import annotations

from typing import Any

import pytest

from queued_storage import allocator

glibc_only = pytest.mark.skipif(not allocator.glibc(), reason="glibc's mallopt")


@glibc_only
def test_the_default_threshold_is_pinned_on_glibc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in allocator.GLIBC_MALLOC_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)

    assert allocator.pin_mmap_threshold() is True


def test_none_leaves_malloc_alone(settings: Any) -> None:
    settings.QUEUED_STORAGE_WORKER_MMAP_THRESHOLD = None

    assert allocator.pin_mmap_threshold() is False


@pytest.mark.parametrize("name", allocator.GLIBC_MALLOC_ENVIRONMENT)
def test_a_sites_own_malloc_tuning_is_kept(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "131072")

    assert allocator.pin_mmap_threshold() is False


def test_nothing_is_pinned_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.confstr", lambda name: "musl 1.2")

    assert allocator.glibc() is False
    assert allocator.pin_mmap_threshold() is False


def test_nothing_is_pinned_without_confstr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr("os.confstr")

    assert allocator.pin_mmap_threshold() is False
