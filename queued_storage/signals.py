"""Signals sent by the transfer engine."""

from __future__ import annotations

from django.dispatch import Signal

#: Sent once per transfer, after the row is committed as done.
#: Arguments: ``name``, ``local``, ``remote`` (storage instances), ``storage`` (the
#: ``QueuedStorage``), ``key``.
file_transferred = Signal()

#: Sent when a row runs out of attempts or fails for good.
#: Arguments: ``name``, ``error`` (text), ``storage`` (may be None), ``key``,
#: ``attempts``.
transfer_failed = Signal()
