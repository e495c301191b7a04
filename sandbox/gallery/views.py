"""The gallery: upload a file, see where each one is served from, flip the switches."""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from sandbox.gallery.forms import SwitchesForm, UploadForm
from sandbox.gallery.models import Switches, Upload


@dataclass
class Entry:
    """One upload as the gallery shows it."""

    upload: Upload
    served_from: str  # "local" or "remote", from the ledger
    status: str
    last_error: str
    attempts: int
    url: str
    is_image: bool


def _storage() -> QueuedStorage:
    storage = Upload._meta.get_field("file").storage
    assert isinstance(storage, QueuedStorage)
    return storage


def _entries(uploads: list[Upload]) -> list[Entry]:
    storage = _storage()
    names = [upload.file.name for upload in uploads]
    rows = {
        row.name: row
        for row in PendingTransfer.objects.filter(
            storage_key=storage.key, name__in=names
        )
    }
    entries = []
    for upload in uploads:
        name = upload.file.name
        row = rows.get(name)
        kind = mimetypes.guess_type(name)[0] or ""
        entries.append(
            Entry(
                upload=upload,
                served_from="remote" if storage.using_remote(name) else "local",
                status=row.status if row else "",
                last_error=row.last_error if row else "",
                attempts=row.attempts if row else 0,
                url=upload.file.url,
                is_image=kind.startswith("image/"),
            )
        )
    return entries


def gallery(request: HttpRequest) -> HttpResponse:
    uploads = list(Upload.objects.all()[:100])
    return render(
        request,
        "gallery/gallery.html",
        {
            "entries": _entries(uploads),
            "switches": Switches.current(),
            "remote_label": _storage().remote_alias or _storage().remote_path,
        },
    )


def upload(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        form = UploadForm(request.POST, request.FILES)
        if form.is_valid():
            saved = form.save()
            messages.success(
                request,
                f"Saved {saved.file.name} on local storage; the worker moves it to "
                "S3 next.",
            )
            return redirect("gallery")
    else:
        form = UploadForm()
    return render(request, "gallery/upload.html", {"form": form})


@require_POST
def switches(request: HttpRequest) -> HttpResponse:
    form = SwitchesForm(request.POST, instance=Switches.current())
    if form.is_valid():
        current = form.save()
        messages.info(
            request,
            "Transfers are held." if current.hold_transfers else "Transfers run.",
        )
        if current.remote_down:
            messages.warning(request, "S3 is down: new transfers fail.")
    return redirect("gallery")
