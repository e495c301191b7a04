"""How a transfer ends: the errors an attempt records on its row (retried unless
``retry`` is False) and the outcomes a worker counts."""

from __future__ import annotations

import enum


class TransferError(Exception):
    """A transfer that did not succeed; retried unless ``retry`` is False."""

    retry = True


class LocalFileMissing(TransferError):
    pass


class LocalFileRefused(TransferError):
    # A symlink out of the local root or a special file stays what it is.
    retry = False


class MisspelledName(TransferError):
    # The row's name is what it is: retrying cannot help.
    retry = False


class RemoteRenamed(TransferError):
    # A remote that renames will rename again: retrying cannot help.
    retry = False


class SizeMismatch(TransferError):
    pass


class ChecksumMismatch(TransferError):
    pass


class LeaseLost(TransferError):
    pass


class RemoteConflict(TransferError):
    retry = False


class RemoteChanged(TransferError):
    """The object at an owned name is not the one this attempt saw: another
    attempt of the row (or a newer version) wrote it meanwhile."""


class HookDeclined(TransferError):
    """The transfer hook returned False: the remote did not take the file."""


class HookContractError(TransferError):
    retry = False


class UnknownStorage(TransferError):
    pass


class TransferTimeout(TransferError):
    pass


class Outcome(enum.Enum):
    DONE = "done"
    RETRY = "retry"
    FAILED = "failed"
    PURGED = "purged"
    STALE = "stale"
