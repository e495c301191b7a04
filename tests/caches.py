"""A cache backend that fails on any use: proves that no state lives in a cache."""

from __future__ import annotations

from typing import Any

from django.core.cache.backends.base import BaseCache


class ExplodingCache(BaseCache):
    """Any read or write fails; closing (Django does it per request) is allowed."""

    def __init__(self, location: str, params: dict[str, Any]) -> None:
        super().__init__(params)

    def _explode(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the cache was used")

    add = get = set = touch = delete = has_key = clear = _explode
    get_many = set_many = delete_many = get_or_set = _explode
    incr = decr = incr_version = decr_version = _explode

    def close(self, **kwargs: Any) -> None:
        pass
