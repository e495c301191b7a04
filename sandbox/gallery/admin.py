from __future__ import annotations

from django.contrib import admin

from sandbox.gallery.models import Upload


@admin.register(Upload)
class UploadAdmin(admin.ModelAdmin):
    list_display = ["title", "file", "created_at"]
    search_fields = ["title", "file"]
    date_hierarchy = "created_at"
