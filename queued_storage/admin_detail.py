"""A transfer's own page in the ledger admin: the changelist's actions as buttons
for this one row, its error history, what its flags mean for this row, and links
to the copies the ledger says exist.

The buttons run the changelist's actions (same permission, same code, same log
line) on this row only, and only while the row is as the page showed it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.urls import URLPattern, path
from django.utils import formats, timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from queued_storage.admin_views import PendingTransferViews, redacted, status_label
from queued_storage.error_history import (
    ERROR_HISTORY_LENGTH,
    entries,
    entry_duration,
    entry_time,
)
from queued_storage.models import REQUEUEABLE, PendingTransfer
from queued_storage.storage_state import paused_keys

Status = PendingTransfer.Status

#: The changelist actions a transfer's page offers as buttons, with their label
#: and what each does, in the order shown.
ROW_ACTIONS: dict[str, tuple[Any, Any]] = {
    "retry_now": (
        _("Retry now"),
        _("Due now, with its attempts reset; a worker takes it on its next poll."),
    ),
    "hold": (_("Hold"), _("Parked until Retry now releases it.")),
    "transfer_now": (
        _("Transfer now"),
        _("Transferred in this request, as a worker would."),
    ),
}


def action_problem(action: str, row: PendingTransfer, *, paused: bool = False) -> str:
    """Why ``action`` does not apply to ``row`` as it stands, or ``""``;
    ``paused``: the row's storage is paused, which no worker, Transfer now
    included, starts a transfer of."""
    status = row.status
    if status == Status.DONE:
        return gettext(
            "it is done (its remote copy was verified); verify_transfers queues "
            "a done transfer whose remote copy is wrong"
        )
    if status == Status.TRANSFERRING:
        if row.has_live_lease():
            return gettext(
                "a worker is transferring it (its lease ends at %(time)s)"
            ) % {"time": local_time(row.lease_expires_at)}
        if action != "transfer_now":
            return gettext("a worker's lease on it ran out; Transfer now takes it over")
    if action == "transfer_now" and paused:
        return gettext(
            "its storage is paused; resume it first (Retry now queues it for then)"
        )
    if status == Status.TRANSFERRING:
        return ""
    if action == "hold":
        if status == Status.HELD:
            return gettext("it is held already")
        if row.deleted:
            return gettext("it was deleted; its files are being removed")
    return (
        ""
        if status in REQUEUEABLE
        else gettext("its status is %(status)s") % {"status": status_label(status)}
    )


def storage_paused(row: PendingTransfer) -> bool:
    """Whether the transfers of the row's storage are paused (one query)."""
    return bool(paused_keys([row.storage_key]))


def shown_in_zone(value: datetime) -> datetime:
    return timezone.localtime(value) if timezone.is_aware(value) else value


def local_time(value: datetime | None) -> str:
    """``value`` as the admin shows a date and time: in the active time zone,
    in the active language's format."""
    if value is None:
        return "-"
    return str(formats.localize(shown_in_zone(value)))


def exact_time(value: datetime) -> str:
    """``value`` to the second, in the active time zone (a cell's tooltip)."""
    return formats.date_format(shown_in_zone(value), "Y-m-d H:i:s T")


def duration_text(seconds: float) -> str:
    if seconds < 60:
        places = 2 if seconds < 1 else 1 if seconds < 10 else 0
        return gettext("%(seconds)s s") % {
            "seconds": formats.number_format(seconds, places)
        }
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return gettext("%(minutes)d min %(seconds)d s") % {
            "minutes": minutes,
            "seconds": rest,
        }
    hours, minutes = divmod(minutes, 60)
    return gettext("%(hours)d h %(minutes)d min") % {"hours": hours, "minutes": minutes}


class PendingTransferDetail(PendingTransferViews):
    """The transfer's page: its buttons, and the read-only fields that describe
    its state."""

    def get_urls(self) -> list[URLPattern]:
        opts = self.opts
        return [
            path(
                "<path:object_id>/run/<str:action>/",
                self.admin_site.admin_view(self.row_action_view),
                name=f"{opts.app_label}_{opts.model_name}_run",
            ),
            *super().get_urls(),
        ]

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: PendingTransfer | None = None,
    ) -> HttpResponse:
        if obj is not None:
            context.update(self.row_buttons(request, obj))
        return super().render_change_form(request, context, add, change, form_url, obj)

    def row_buttons(self, request: HttpRequest, row: PendingTransfer) -> dict[str, Any]:
        """The buttons of the actions that apply to ``row``, and why the others
        do not; nothing for a user who may run none of them."""
        allowed = self.get_actions(request)
        paused = "transfer_now" in allowed and storage_paused(row)
        buttons, notes = [], []
        for action, (label, help_text) in ROW_ACTIONS.items():
            if action not in allowed:
                continue
            if problem := action_problem(action, row, paused=paused):
                notes.append(
                    gettext("%(action)s: not now, %(reason)s.")
                    % {"action": label, "reason": problem}
                )
            else:
                url = self._url("run", row.pk, action)
                buttons.append(
                    {"action": action, "label": label, "help": help_text, "url": url}
                )
        return {"row_buttons": buttons, "row_notes": notes}

    # Not wrapped in ATOMIC_REQUESTS: "Transfer now" runs the engine, whose claim
    # must commit before the upload, and whose outcome as soon as it is known.
    @transaction.non_atomic_requests
    def row_action_view(
        self, request: HttpRequest, object_id: str, action: str
    ) -> HttpResponse:
        """Run one changelist action on this row, if it still is the row the page
        showed (same status and generation), and come back to its page."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if action not in ROW_ACTIONS:
            raise Http404
        found = self.get_actions(request).get(action)
        if found is None:
            raise PermissionDenied
        row = self.get_object(request, object_id)
        if row is None:
            self.message_user(
                request,
                gettext(
                    "This transfer is no longer in the ledger (its file was "
                    "deleted and removed); nothing was done."
                ),
                messages.WARNING,
            )
            return HttpResponseRedirect(self._url("changelist"))
        label = ROW_ACTIONS[action][0]
        back = self._url("change", row.pk)
        shown = (request.POST.get("status", ""), request.POST.get("generation", ""))
        if shown != (row.status, str(row.generation)):
            self.message_user(
                request,
                gettext(
                    "%(action)s was not run: this transfer changed since the page "
                    "was shown (it was %(was)s, it is %(now)s now). Look at it "
                    "again, then choose."
                )
                % {
                    "action": label,
                    "was": status_label(shown[0]),
                    "now": status_label(row.status),
                },
                messages.WARNING,
            )
            return HttpResponseRedirect(back)
        paused = action == "transfer_now" and storage_paused(row)
        if problem := action_problem(action, row, paused=paused):
            self.message_user(
                request,
                gettext("%(action)s was not run: %(reason)s.")
                % {"action": label, "reason": problem},
                messages.WARNING,
            )
            return HttpResponseRedirect(back)
        # Django 6.1 gives an Action (its tuple indexes are deprecated), 5.2 a tuple.
        run = getattr(found, "func", None) or found[0]
        # The row as the page showed it: a change in between matches nothing.
        run(
            self,
            request,
            PendingTransfer.objects.filter(
                pk=row.pk, generation=row.generation, status=row.status
            ),
        )
        if not PendingTransfer.objects.filter(pk=row.pk).exists():
            return HttpResponseRedirect(self._url("changelist"))  # purged
        return HttpResponseRedirect(back)

    # Read-only fields

    @admin.display(description=_("deleted"))
    def deleted_state(self, row: PendingTransfer) -> str:
        if row.deleted:
            return gettext(
                "Yes: deleted by the application; the files are being removed."
            )
        return gettext("No")

    @admin.display(description=_("next attempt"))
    def next_attempt(self, row: PendingTransfer) -> str:
        """When a worker takes the row next, as its status decides: the time only
        for a queued row; a failed, held, done or transferring row has none."""
        if row.status == Status.QUEUED:
            if row.next_attempt_at is None:
                return gettext("Due now.")
            return local_time(row.next_attempt_at)
        if row.status == Status.FAILED:
            return gettext("None: out of attempts, waits to be re-queued.")
        if row.status == Status.HELD:
            return gettext("None: held, waits for transfer() or Retry now.")
        if row.status == Status.TRANSFERRING:
            return gettext("None: a worker is transferring it.")
        if row.status == Status.DONE:
            return gettext("None: done.")
        return local_time(row.next_attempt_at)

    @admin.display(description=_("remote object"))
    def remote_state(self, row: PendingTransfer) -> str:
        if row.status == Status.DONE and row.remote_owned:
            return gettext("Ours: uploaded by this transfer and verified.")
        if row.status == Status.DONE:
            return gettext("On the remote; recorded without an upload (adopted).")
        if row.remote_owned:
            return gettext(
                "An earlier attempt or upload of this name may have written it; "
                "the next upload replaces it."
            )
        if row.attempts:
            return gettext("None yet: no attempt has written it.")
        return gettext("None yet: not uploaded.")

    @admin.display(description=_("error history"))
    def error_history_table(self, row: PendingTransfer) -> SafeString | str:
        found = entries(row.error_history)
        if not found:
            return "-"
        # A row keeps the last ERROR_HISTORY_LENGTH; one written otherwise (by
        # hand, by a bug) may hold thousands, which would make a page of megabytes.
        shown = found[-ERROR_HISTORY_LENGTH:]
        body = format_html_join(
            "",
            '<tr><td>{}</td><td title="{}">{}</td><td>{}</td><td>{}</td>'
            '<td class="qs-message">{}</td></tr>',
            (history_cells(entry) for entry in reversed(shown)),
        )
        table = format_html(
            '<table class="qs-history"><thead><tr><th>{}</th><th>{}</th><th>{}</th>'
            "<th>{}</th><th>{}</th></tr></thead><tbody>{}</tbody></table>",
            _("attempt"),
            _("time"),
            _("duration"),
            _("error"),
            _("message"),
            body,
        )
        older = len(found) - len(shown)
        if not older:
            return table
        return format_html(
            '{}<p class="help qs-history-older">{}</p>',
            table,
            ngettext(
                "%(count)d older entry not shown.",
                "%(count)d older entries not shown.",
                older,
            )
            % {"count": older},
        )

    @admin.display(description=_("open"))
    def file_links(self, row: PendingTransfer) -> SafeString | str:
        """The copies the ledger says exist: the local one until the transfer is
        done, the remote one once it is; none while the files are removed. Made
        from the row alone: a link's URL is asked of the storage on click."""
        if row.pk is None or row.deleted:
            return gettext("-  (deleted: the files are being removed)")
        if row.status == Status.DONE:
            sides = [("remote", _("remote copy"))]
        else:
            sides = [("local", _("local copy"))]
        links = [(self._url("file", row.pk, side), label) for side, label in sides]
        return format_html_join(
            " · ", '<a href="{}" target="_blank" rel="noopener">{}</a>', links
        )


def history_cells(entry: dict[str, Any]) -> tuple[Any, ...]:
    at = entry_time(entry)
    duration = entry_duration(entry)
    try:
        exact, shown = ("", "") if at is None else (exact_time(at), local_time(at))
    except OverflowError:  # e.g. 9999-12-31 late in the day, shown further east
        at = None
    if at is None:  # an unreadable time is shown as it is
        exact, shown = "", str(entry.get("at", ""))
    return (
        entry.get("attempt", ""),
        exact,
        shown,
        "-" if duration is None else duration_text(duration),
        entry.get("error", ""),
        redacted(str(entry.get("message", ""))),
    )
