"""The admin's pause and resume buttons for a storage's transfers: POST views
under the ledger's admin (CSRF-protected, the change permission on the ledger
needed, logged), as ``admin:queued_storage_pendingtransfer_pause`` and
``admin:queued_storage_pendingtransfer_resume``.

A button posts ``key`` (repeatable: the storage keys), ``reason`` (pause only,
optional) and ``next`` (optional: where to go back to, a URL of this site)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import URLPattern, path, reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext
from django.views.decorators.http import require_POST

from queued_storage import registry
from queued_storage.pausing import pause, reason_problem, resume

logger = logging.getLogger("queued_storage")

#: The URL names (in the admin site's namespace) of the two buttons' views.
PAUSE_URL_NAME = "queued_storage_pendingtransfer_pause"
RESUME_URL_NAME = "queued_storage_pendingtransfer_resume"


def control_urls(model_admin: admin.ModelAdmin[Any]) -> list[URLPattern]:
    """The pause and resume views of the ledger's ModelAdmin ``model_admin``."""
    site = model_admin.admin_site

    def view(action: Callable[..., HttpResponse]) -> Any:
        @require_POST
        def run(request: HttpRequest) -> HttpResponse:
            return action(model_admin, request)

        # admin_view(): logged-in staff only, CSRF-protected, never cached.
        return site.admin_view(run)

    return [
        path("pause/", view(pause_view), name=PAUSE_URL_NAME),
        path("resume/", view(resume_view), name=RESUME_URL_NAME),
    ]


def _checked(
    model_admin: admin.ModelAdmin[Any], request: HttpRequest
) -> tuple[list[str], HttpResponseRedirect]:
    """The keys posted, and the way back; no keys when the request changes
    nothing (the error said on the page)."""
    if not model_admin.has_change_permission(request):
        raise PermissionDenied
    back = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(
        back, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        back = reverse(
            f"{model_admin.admin_site.name}:queued_storage_pendingtransfer_changelist"
        )
    redirect = HttpResponseRedirect(back)
    keys = sorted(set(request.POST.getlist("key")))
    if not keys:
        model_admin.message_user(
            request, gettext("Name the storage (key)."), messages.ERROR
        )
        return [], redirect
    unknown = sorted(set(keys) - set(registry.known_keys()))
    if unknown:
        model_admin.message_user(
            request,
            gettext("Unknown storage key(s): %(keys)s. Nothing was changed.")
            % {"keys": ", ".join(unknown)},
            messages.ERROR,
        )
        return [], redirect
    return keys, redirect


def pause_view(
    model_admin: admin.ModelAdmin[Any], request: HttpRequest
) -> HttpResponse:
    keys, redirect = _checked(model_admin, request)
    if not keys:
        return redirect
    reason = request.POST.get("reason", "").strip()
    problem = reason_problem(reason)
    if problem:
        model_admin.message_user(
            request, problem + " " + gettext("Nothing was changed."), messages.ERROR
        )
        return redirect
    user = request.user.get_username()
    paused = pause(keys, by=user, reason=reason)
    logger.info(
        "admin pause user=%s keys=%s paused=%s", user, ",".join(keys), ",".join(paused)
    )
    for key in paused:
        model_admin.message_user(
            request,
            gettext(
                "Paused the transfers of %(key)s: workers start none until it is "
                "resumed; saves queue up."
            )
            % {"key": key},
            messages.SUCCESS,
        )
    for key in sorted(set(keys) - set(paused)):
        model_admin.message_user(
            request, gettext("%(key)s was paused already.") % {"key": key}
        )
    return redirect


def resume_view(
    model_admin: admin.ModelAdmin[Any], request: HttpRequest
) -> HttpResponse:
    keys, redirect = _checked(model_admin, request)
    if not keys:
        return redirect
    user = request.user.get_username()
    resumed = resume(keys, by=user)
    logger.info(
        "admin resume user=%s keys=%s resumed=%s",
        user,
        ",".join(keys),
        ",".join(resumed),
    )
    for key in resumed:
        model_admin.message_user(
            request,
            gettext("Resumed the transfers of %(key)s.") % {"key": key},
            messages.SUCCESS,
        )
    for key in sorted(set(keys) - set(resumed)):
        model_admin.message_user(
            request, gettext("%(key)s was not paused.") % {"key": key}
        )
    return redirect
