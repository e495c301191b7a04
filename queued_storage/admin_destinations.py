"""A storage's destinations (its own remote and each mirror, a ledger key each)
in the ledger admin: the "Destinations" table on a transfer's page, with the
row of each destination of the name (one query), the changelist's
"destination" filter and the labels that group a mirror's key under its
storage's (:mod:`queued_storage.destinations`)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.defaultfilters import truncatechars
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from queued_storage import destinations
from queued_storage.admin_detail import PendingTransferDetail
from queued_storage.admin_views import redacted, status_badge
from queued_storage.destinations import Destination
from queued_storage.models import PendingTransfer

#: The "Destinations" table's field on a transfer's page.
FIELD = "destinations_table"
#: The changelist's query parameter of the destination filter.
DESTINATION_PARAMETER = "destination"
#: Its value for the storages' own remotes (a mirror's name has no ':').
PRIMARY = ":primary"
ERROR_CUT = 80


def version_text(
    destination: Destination,
    found: PendingTransfer | None,
    primary: PendingTransfer | None,
) -> str:
    """How the destination's row of the name stands to the primary's row."""
    if not destination.is_mirror:
        return gettext("the primary")
    if found is None:
        return gettext("no row yet: copies after the primary is verified")
    if primary is None:
        return gettext("no primary row")
    if found.generation == primary.generation:
        return gettext("same version")
    if found.generation < primary.generation:
        return gettext("older version")
    return gettext("newer version")


class DestinationFilter(admin.SimpleListFilter):
    """The rows of the storages' own remotes, or of the mirrors of one name
    (every storage's). Hidden while no storage this process knows has mirrors."""

    title = _("destination")
    parameter_name = DESTINATION_PARAMETER

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]
    ) -> list[tuple[str, Any]]:
        names = sorted({d.mirror for d in destinations.known().values() if d.mirror})
        if not names:
            return []
        choices: list[tuple[str, Any]] = [(PRIMARY, _("primary (own remote)"))]
        return choices + [
            (name, gettext("mirror %(name)s") % {"name": name}) for name in names
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if not value:
            return queryset
        found = destinations.known().values()
        if value == PRIMARY:
            return queryset.exclude(storage_key__in=[d.key for d in found if d.mirror])
        return queryset.filter(
            storage_key__in=[d.key for d in found if d.mirror == value]
        )


class DestinationsDetail(PendingTransferDetail):
    """A transfer's page with, for a storage that has mirrors, each destination's
    row of the name."""

    def get_fieldsets(
        self, request: HttpRequest, obj: PendingTransfer | None = None
    ) -> Any:
        fieldsets = list(super().get_fieldsets(request, obj))
        if obj is not None and len(destinations.of_storage(obj.storage_key)) > 1:
            fieldsets.insert(1, (_("Destinations"), {"fields": [FIELD]}))
        return fieldsets

    @admin.display(description=_("destinations"))
    def destinations_table(self, row: PendingTransfer) -> SafeString | str:
        """Each destination's row of the name (one query): its status, attempts,
        last error, version against the primary's row, and a link."""
        found = destinations.known()
        keys = destinations.of_storage(row.storage_key, found)
        rows = {
            other.storage_key: other
            for other in PendingTransfer.objects.filter(
                storage_key__in=keys, name_hash=row.name_hash
            ).only(
                "storage_key",
                "status",
                "generation",
                "deleted",
                "attempts",
                "last_error",
            )
        }
        this = destinations.of(row.storage_key, found)
        primary = rows.get(this.primary)
        cells = [
            (self._cells(destinations.of(key, found), rows, primary, row),)
            for key in keys
        ]
        body = format_html_join("", "<tr>{}</tr>", cells)
        table = format_html(
            '<table class="qs-destinations"><thead><tr><th>{}</th><th>{}</th>'
            "<th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            _("destination"),
            _("status"),
            _("attempts"),
            _("last error"),
            _("version"),
            _("row"),
            body,
        )
        if not this.is_mirror:
            return table
        if primary is None:
            about = gettext(
                "Mirror %(mirror)s of storage %(storage)s, which has no row of this "
                "name."
            ) % {"mirror": this.mirror, "storage": this.primary}
            return format_html('<p class="qs-mirror-of">{}</p>{}', about, table)
        return format_html(
            '<p class="qs-mirror-of">{} <a href="{}">{}</a></p>{}',
            gettext("Mirror %(mirror)s of storage %(storage)s:")
            % {"mirror": this.mirror, "storage": this.primary},
            self._url("change", primary.pk),
            gettext("the primary's row"),
            table,
        )

    def _cells(
        self,
        destination: Destination,
        rows: dict[str, PendingTransfer],
        primary: PendingTransfer | None,
        shown: PendingTransfer,
    ) -> SafeString:
        if destination.is_mirror:
            label = format_html(
                '{} <span class="qs-key">({})</span>',
                destination.short_label(),
                destination.key,
            )
        else:
            label = format_html(
                '{} <span class="qs-key">({})</span>', _("primary"), destination.key
            )
        found = rows.get(destination.key)
        version = version_text(destination, found, primary)
        if found is None:
            return format_html(
                "<td>{}</td><td>-</td><td>-</td><td>-</td><td>{}</td><td>-</td>",
                label,
                version,
            )
        badge = status_badge(found.status)
        if found.deleted:
            badge = format_html("{} {}", badge, status_badge("", _("deleting")))
        error = redacted(found.last_error)
        if found.pk == shown.pk:
            link = format_html("<strong>{}</strong>", _("this row"))
        else:
            link = format_html(
                '<a href="{}">{}</a>', self._url("change", found.pk), _("open")
            )
        return format_html(
            '<td>{}</td><td>{}</td><td>{}</td><td title="{}">{}</td><td>{}</td>'
            "<td>{}</td>",
            label,
            badge,
            found.attempts,
            error,
            truncatechars(error, ERROR_CUT) if error else "-",
            version,
            link,
        )
