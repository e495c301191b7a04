"""A ``FileField`` whose files can be sent to the remote on demand."""

from __future__ import annotations

from django.db.models.fields.files import FieldFile, FileField

from queued_storage.storage import QueuedStorage


class QueuedFieldFile(FieldFile):
    def transfer(self) -> bool:
        """Queue this file's transfer now (for storages built with ``delayed=True``)."""
        if not isinstance(self.storage, QueuedStorage):
            raise TypeError(
                f"{self.field} uses {type(self.storage).__name__}; transfer() needs "
                "a QueuedStorage."
            )
        return self.storage.transfer(str(self.name))


class QueuedFileField(FileField):
    """A ``FileField`` whose value has :meth:`QueuedFieldFile.transfer`."""

    attr_class = QueuedFieldFile
