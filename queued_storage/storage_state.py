"""What the ledger knows of a storage as a whole, one row per storage key: its
adoption, whether an operator paused its transfers, and its circuit breaker;
:func:`storage_controls` reads the last two for pages, commands and metrics."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from queued_storage.names import MAX_NAME_LENGTH

#: Longest pause reason the ledger keeps.
MAX_REASON_LENGTH = 500
#: Longest "paused by" the ledger keeps (Django's usernames are at most 150).
MAX_PAUSED_BY_LENGTH = 150

#: The states of a storage's circuit breaker: ``closed`` (transfers run),
#: ``open`` (no row of the storage is claimed until its next probe),
#: ``half-open`` (the probe is due, or one worker's probe row is running).
BREAKER_CLOSED = "closed"
BREAKER_OPEN = "open"
BREAKER_HALF_OPEN = "half-open"
BREAKER_STATES = (BREAKER_CLOSED, BREAKER_OPEN, BREAKER_HALF_OPEN)


class StorageState(models.Model):
    """A storage's standing: whether the files its remote held before the ledger
    are adopted (have rows), and how far a running adoption has got; whether its
    transfers are paused; its circuit breaker."""

    # Compares exactly, as PendingTransfer.storage_key does: on MariaDB/MySQL
    # migration 0003 gives it a binary collation, which a migration altering it
    # must keep.
    storage_key = models.CharField(_("storage key"), max_length=255, unique=True)
    adopted_at = models.DateTimeField(
        _("adopted at"),
        null=True,
        blank=True,
        help_text=_(
            "When every file the remote held before was recorded, or the storage "
            "was declared new. Until then, a name the ledger has never seen is "
            "asked of the remote before a new upload gets it."
        ),
    )
    adoption_started_at = models.DateTimeField(
        _("adoption started at"), null=True, blank=True
    )
    adoption_cursor = models.CharField(
        _("adoption cursor"),
        max_length=MAX_NAME_LENGTH,
        blank=True,
        help_text=_(
            "The last remote name an unfinished adoption recorded; running it again "
            "continues after it."
        ),
    )
    adoption_counts = models.JSONField(_("adoption counts"), default=dict, blank=True)
    audit_progress = models.JSONField(
        _("audit progress"),
        default=dict,
        blank=True,
        help_text=_(
            "Where an unfinished audit_storage run stopped, and its counts so far; "
            "running it again continues from there."
        ),
    )
    paused_at = models.DateTimeField(
        _("paused at"),
        null=True,
        blank=True,
        help_text=_(
            "While set, no worker starts a transfer of this storage; saves go on "
            "and queue up."
        ),
    )
    paused_by = models.CharField(
        _("paused by"), max_length=MAX_PAUSED_BY_LENGTH, blank=True
    )
    pause_reason = models.CharField(
        _("pause reason"), max_length=MAX_REASON_LENGTH, blank=True
    )
    breaker_failures = models.PositiveIntegerField(
        _("consecutive remote failures"),
        default=0,
        help_text=_("Remote failures since this storage's last successful transfer."),
    )
    breaker_opened_at = models.DateTimeField(
        _("circuit breaker opened at"), null=True, blank=True
    )
    breaker_probe_at = models.DateTimeField(
        _("next probe at"),
        null=True,
        blank=True,
        help_text=_(
            "While the breaker is open: when one worker may try one row (the "
            "probe); while a probe runs, when its lease ends."
        ),
    )
    breaker_backoff = models.FloatField(
        _("circuit breaker backoff (seconds)"), default=0
    )
    breaker_probe_token = models.CharField(
        _("probe lease token"), max_length=32, blank=True
    )
    created_at = models.DateTimeField(_("created at"), default=timezone.now)
    updated_at = models.DateTimeField(_("updated at"), default=timezone.now)

    class Meta:
        app_label = "queued_storage"  # see PendingTransfer.Meta
        verbose_name = _("storage state")
        verbose_name_plural = _("storage states")
        ordering = ["storage_key"]

    def __str__(self) -> str:
        adopted = "adopted" if self.adopted_at else "not adopted"
        return f"{self.storage_key} ({adopted})"

    def breaker_state(self, now: datetime | None = None) -> str:
        """``closed``, ``open`` or ``half-open`` (see :data:`BREAKER_STATES`)."""
        if self.breaker_opened_at is None:
            return BREAKER_CLOSED
        now = now or timezone.now()
        probe_at = self.breaker_probe_at
        if self.breaker_probe_token or probe_at is None or probe_at <= now:
            return BREAKER_HALF_OPEN
        return BREAKER_OPEN


@dataclass(frozen=True)
class Controls:
    """Whether a storage's transfers are paused, and its circuit breaker, as a
    dashboard, ``transfer_status`` or a metric shows them."""

    storage_key: str
    paused: bool = False
    paused_at: datetime | None = None
    paused_by: str = ""
    pause_reason: str = ""
    #: One of :data:`BREAKER_STATES`.
    breaker: str = BREAKER_CLOSED
    #: When the breaker opened (None while closed).
    since: datetime | None = None
    #: When the open breaker lets one probe row through (or the running probe's
    #: lease ends); None while closed.
    next_probe_at: datetime | None = None
    consecutive_failures: int = 0
    #: Seconds the breaker waits before its next probe (0 while closed).
    backoff: float = 0.0

    @classmethod
    def of(cls, state: StorageState, now: datetime | None = None) -> Controls:
        breaker = state.breaker_state(now)
        closed = breaker == BREAKER_CLOSED
        return cls(
            storage_key=state.storage_key,
            paused=state.paused_at is not None,
            paused_at=state.paused_at,
            paused_by=state.paused_by,
            pause_reason=state.pause_reason,
            breaker=breaker,
            since=state.breaker_opened_at,
            next_probe_at=None if closed else state.breaker_probe_at,
            consecutive_failures=state.breaker_failures,
            backoff=0.0 if closed else state.breaker_backoff,
        )

    def as_dict(self) -> dict[str, object]:
        """For ``--json``: times as ISO 8601 strings."""
        return {
            "paused": self.paused,
            "paused_at": _iso(self.paused_at),
            "paused_by": self.paused_by,
            "pause_reason": self.pause_reason,
            "breaker": self.breaker,
            "since": _iso(self.since),
            "next_probe_at": _iso(self.next_probe_at),
            "consecutive_failures": self.consecutive_failures,
            "backoff_seconds": self.backoff,
        }


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def storage_controls(
    keys: Iterable[str] | None = None, *, now: datetime | None = None
) -> dict[str, Controls]:
    """:class:`Controls` of each storage key of ``keys`` (every key that has a
    state row when None), in one query; a key without a row is running, its
    breaker closed."""
    rows = StorageState.objects.all()
    wanted = None if keys is None else list(keys)
    if wanted is not None:
        rows = rows.filter(storage_key__in=wanted)
    now = now or timezone.now()
    found = {state.storage_key: Controls.of(state, now) for state in rows}
    if wanted is None:
        return found
    return {key: found.get(key) or Controls(key) for key in wanted}


def paused_keys(keys: Iterable[str] | None = None) -> list[str]:
    """The storage keys (of ``keys``, or all) whose transfers are paused, sorted."""
    rows = StorageState.objects.filter(paused_at__isnull=False)
    if keys is not None:
        rows = rows.filter(storage_key__in=list(keys))
    return sorted(rows.values_list("storage_key", flat=True))
