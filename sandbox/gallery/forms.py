from __future__ import annotations

from django import forms

from sandbox.gallery.models import Switches, Upload


class UploadForm(forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = Upload
        fields = ["title", "file"]
        help_texts = {"file": "Any file; images get a thumbnail in the gallery."}


class SwitchesForm(forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = Switches
        fields = ["hold_transfers", "remote_down"]
