"""The ledger in the Django admin: read-only rows, changed only through actions."""

from __future__ import annotations

from django.contrib import admin, messages
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from queued_storage.models import PendingTransfer, PendingTransferQuerySet


@admin.register(PendingTransfer)
class PendingTransferAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = [
        "name",
        "storage_key",
        "status",
        "attempts",
        "next_attempt_at",
        "size",
        "short_error",
        "updated_at",
    ]
    list_filter = ["status", "storage_key", "deleted"]
    search_fields = ["name"]
    ordering = ["-created_at", "-pk"]
    show_full_result_count = False
    actions = ["retry_now"]

    def get_readonly_fields(
        self, request: HttpRequest, obj: PendingTransfer | None = None
    ) -> list[str]:
        return [field.name for field in PendingTransfer._meta.fields]

    @admin.display(description=_("last error"))
    def short_error(self, row: PendingTransfer) -> str:
        return row.last_error[:80]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description=_("Retry now"), permissions=["change"])
    def retry_now(
        self, request: HttpRequest, queryset: PendingTransferQuerySet
    ) -> None:
        count = queryset.requeue()
        self.message_user(
            request,
            ngettext("%(count)d transfer queued.", "%(count)d transfers queued.", count)
            % {"count": count},
            messages.SUCCESS,
        )
