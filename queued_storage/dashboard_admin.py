"""The transfer dashboard's admin page: in the admin index (a proxy model's
entry) and linked from the ledger's list; it needs the view permission on the
ledger. Each figure links to the ledger's list, filtered with its own parameters.
What the page shows is read by :mod:`queued_storage.dashboard`."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.http import urlencode
from django.utils.safestring import SafeString
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from queued_storage.admin_controls import PAUSE_URL_NAME, RESUME_URL_NAME
from queued_storage.admin_views import STORAGE_PARAMETER, status_badge
from queued_storage.dashboard import DONE_COUNT_LIMIT, StorageSummary, summaries
from queued_storage.history import TransferDashboard
from queued_storage.models import PendingTransfer
from queued_storage.storage_state import BREAKER_CLOSED, MAX_REASON_LENGTH, Controls

Status = PendingTransfer.Status


def changelist_url(key: str, **filters: str) -> str:
    """The ledger's changelist filtered to storage ``key`` (and ``filters``)."""
    query = urlencode({STORAGE_PARAMETER: key, **filters})
    return reverse("admin:queued_storage_pendingtransfer_changelist") + "?" + query


def storage_links(key: str) -> dict[str, str]:
    """The filtered lists the figures of storage ``key`` link to."""
    return {
        "all": changelist_url(key),
        "stuck": changelist_url(key, stuck="yes"),
        "failing": changelist_url(key, failing="yes"),
        **{
            status: changelist_url(key, status__exact=status)
            for status in Status.values
        },
    }


def status_rows(summary: StorageSummary, links: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "badge": status_badge(status),
            "count": summary.counts[status],
            "at_least": status == Status.DONE and summary.done_at_least,
            "url": links[status],
        }
        for status in Status.values
    ]


def controls_badges(controls: Controls | None) -> list[SafeString]:
    """Paused and breaker state, as badges."""
    if controls is None:
        return []
    badges = []
    if controls.paused:
        badges.append(status_badge(Status.HELD, gettext("paused")))
    if controls.breaker != BREAKER_CLOSED:
        badges.append(
            status_badge(
                Status.FAILED,
                gettext("breaker %(state)s") % {"state": controls.breaker},
            )
        )
    return badges


def can_view(request: HttpRequest) -> bool:
    """The dashboard needs the view (or change) permission on the ledger."""
    opts = PendingTransfer._meta
    user = request.user
    return any(
        user.has_perm(f"{opts.app_label}.{get_permission_codename(action, opts)}")
        for action in ("view", "change")
    )


@admin.register(TransferDashboard)
class TransferDashboardAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """The dashboard's page, in the admin index beside the ledger's list."""

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return can_view(request)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return can_view(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        opts = self.opts
        return [
            path(
                "",
                self.admin_site.admin_view(self.dashboard_view),
                name=f"{opts.app_label}_{opts.model_name}_changelist",
            )
        ]

    def can_pause(self, request: HttpRequest) -> bool:
        """The pause and resume buttons are the ledger's: its change permission."""
        ledger = self.admin_site._registry.get(PendingTransfer)
        return ledger is not None and ledger.has_change_permission(request)

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        if not can_view(request):
            raise PermissionDenied
        now = timezone.now()
        storages = []
        for summary in summaries(now):
            links = storage_links(summary.key)
            storages.append(
                {
                    "summary": summary,
                    "links": links,
                    "statuses": status_rows(summary, links),
                    "badges": controls_badges(summary.controls),
                    "windows": [summary.hour, summary.day],
                }
            )
        context = {
            **self.admin_site.each_context(request),
            "title": _("Transfer dashboard"),
            "opts": self.opts,
            "now": now,
            "storages": storages,
            "changelist": reverse("admin:queued_storage_pendingtransfer_changelist"),
            "done_limit": DONE_COUNT_LIMIT,
            "can_pause": self.can_pause(request),
            "pause_url": reverse(f"{self.admin_site.name}:{PAUSE_URL_NAME}"),
            "resume_url": reverse(f"{self.admin_site.name}:{RESUME_URL_NAME}"),
            "reason_length": MAX_REASON_LENGTH,
            "here": request.get_full_path(),
        }
        return TemplateResponse(request, "admin/queued_storage/dashboard.html", context)
