"""Pause the transfers of storages: no worker starts one until they are resumed;
saves go on and queue up."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from queued_storage.management.cli import (
    LedgerCommand,
    UsageError,
    add_output_arguments,
    check_storage_keys,
    operator,
    write_json,
)
from queued_storage.pausing import pause, reason_problem


class Command(LedgerCommand):
    help = (
        "Pause the transfers of the storages KEY...: every worker stops starting "
        "them at its next claim (the uploads in hand finish); saves go on and queue "
        "up. resume_transfers undoes it. Exit status 2 for an unknown key."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("keys", nargs="+", metavar="KEY", help="A storage key.")
        parser.add_argument(
            "--reason",
            default="",
            metavar="TEXT",
            help="Why, shown beside the pause (admin, transfer_status).",
        )
        add_output_arguments(parser, progress=False)

    def handle(
        self,
        *,
        keys: list[str],
        reason: str,
        json: bool,
        verbosity: int,
        **options: Any,
    ) -> None:
        check_storage_keys(keys)
        reason = reason.strip()
        problem = reason_problem(reason)
        if problem:
            raise UsageError(f"--reason: {problem}")
        paused = pause(keys, by=operator(), reason=reason)
        already = sorted(set(keys) - set(paused))
        if json:
            write_json(self, {"paused": paused, "already_paused": already})
        elif verbosity > 0:
            for key in paused:
                self.stdout.write(
                    f"Paused {key}: workers start none of its transfers until "
                    f"manage.py resume_transfers {key}."
                )
            for key in already:
                self.stdout.write(f"{key} was paused already.")
