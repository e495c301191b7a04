"""Save files locally at once and move them to remote storage in the background."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from queued_storage.prefetch import prefetch_files, prefetch_locations

__version__ = "0.9.0"
__all__ = ["prefetch_files", "prefetch_locations"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the helpers need the ledger model, which needs the
    # app registry, and importing the package must not.
    if name in __all__:
        from queued_storage import prefetch

        return getattr(prefetch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
