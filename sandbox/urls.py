"""The gallery, the admin, the metrics Prometheus scrapes, and uploads still on
local storage served under MEDIA_URL."""

from __future__ import annotations

from django.conf import settings
from django.conf.urls.static import static
from django.contrib import admin
from django.urls import path

from queued_storage.integrations.prometheus import metrics_view
from sandbox.gallery import views

urlpatterns = [
    path("", views.gallery, name="gallery"),
    path("upload/", views.upload, name="upload"),
    path("switches/", views.switches, name="switches"),
    path("admin/", admin.site.urls),
    # What Prometheus scrapes; from loopback only (QUEUED_STORAGE_METRICS_ALLOWED_IPS).
    path("metrics", metrics_view, name="metrics"),
    # static() returns no patterns unless DEBUG is on.
    *static(settings.MEDIA_URL, document_root=settings.MEDIA_ROOT),
]
