"""Resume the transfers of paused storages."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from queued_storage.management.cli import (
    LedgerCommand,
    add_output_arguments,
    check_storage_keys,
    operator,
    write_json,
)
from queued_storage.pausing import resume


class Command(LedgerCommand):
    help = (
        "Resume the transfers of the paused storages KEY...: every worker takes "
        "their due rows again at its next claim. Exit status 2 for an unknown key."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("keys", nargs="+", metavar="KEY", help="A storage key.")
        add_output_arguments(parser, progress=False)

    def handle(
        self, *, keys: list[str], json: bool, verbosity: int, **options: Any
    ) -> None:
        check_storage_keys(keys)
        resumed = resume(keys, by=operator())
        running = sorted(set(keys) - set(resumed))
        if json:
            write_json(self, {"resumed": resumed, "not_paused": running})
        elif verbosity > 0:
            for key in resumed:
                self.stdout.write(f"Resumed {key}: workers take its due rows again.")
            for key in running:
                self.stdout.write(f"{key} was not paused.")
