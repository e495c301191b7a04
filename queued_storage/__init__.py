"""Save files locally at once and move them to remote storage in the background."""

from __future__ import annotations

__version__ = "0.9.0"
