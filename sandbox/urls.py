"""The gallery, the admin, and uploads still on local storage served under
MEDIA_URL."""

from __future__ import annotations

from django.conf import settings
from django.conf.urls.static import static
from django.contrib import admin
from django.urls import path

from sandbox.gallery import views

urlpatterns = [
    path("", views.gallery, name="gallery"),
    path("upload/", views.upload, name="upload"),
    path("switches/", views.switches, name="switches"),
    path("admin/", admin.site.urls),
    # static() returns no patterns unless DEBUG is on.
    *static(settings.MEDIA_URL, document_root=settings.MEDIA_ROOT),
]
