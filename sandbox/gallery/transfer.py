"""The sandbox's transfer hook: the default copy, behind the two switches on the
gallery page, so that a person can see files wait on local disk and fail."""

from __future__ import annotations

import time
from typing import Any

from django.core.files.storage import Storage

from queued_storage.tasks import Transfer

#: How often a held worker looks at the switch again, and for how long at most
#: before it hands the row back ("retry later").
HOLD_POLL = 0.5
HOLD_LIMIT = 10 * 60


class RemoteSwitchedOff(ConnectionError):
    pass


class SandboxTransfer(Transfer):
    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        from sandbox.gallery.models import Switches

        deadline = time.monotonic() + HOLD_LIMIT
        while Switches.current().hold_transfers:
            if time.monotonic() > deadline:
                return False
            time.sleep(HOLD_POLL)
        if Switches.current().remote_down:
            raise RemoteSwitchedOff(
                "S3 is switched off (the 'S3 is down' switch on the gallery page); "
                "switch it back on and retry this transfer from the admin"
            )
        return super().transfer(name, local, remote, **kwargs)
