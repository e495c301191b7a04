"""The 0.8 docs' ``Transfer`` subclass, word for word (Tasks page)."""

from __future__ import annotations

from mysite.notifications import notify
from queued_storage.tasks import Transfer


class TransferAndNotify(Transfer):
    def transfer(self, *args, **kwargs):
        result = super(TransferAndNotify, self).transfer(*args, **kwargs)  # noqa: UP008
        if result:
            # call the (imaginary) notify function with the result
            notify(result)
        return result
