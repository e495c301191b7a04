"""Install the django-q2 schedule that sweeps due transfers (idempotent)."""

from __future__ import annotations

import importlib.util
from typing import Any

from django.apps import apps
from django.core.management.base import CommandError, CommandParser

from queued_storage.management.cli import LedgerCommand, positive_int


class Command(LedgerCommand):
    help = (
        "Create or update the django-q2 Schedule that runs the transfer engine for "
        "due retries, expired leases and lost wake-ups. Safe to run on every deploy."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--minutes",
            type=positive_int,
            default=1,
            help="Run the sweep every this many minutes (default: 1).",
        )
        parser.add_argument(
            "--remove",
            action="store_true",
            help="Delete the schedule instead.",
        )

    def handle(
        self, *, minutes: int, remove: bool, verbosity: int, **options: Any
    ) -> None:
        if importlib.util.find_spec("django_q") is None:
            raise CommandError(
                "django-q2 is not installed: pip install 'django-queued-storage[q2]'."
            )
        if not apps.is_installed("django_q"):
            raise CommandError(
                "Add 'django_q' to INSTALLED_APPS and migrate, then run this again."
            )
        from queued_storage.integrations.django_q import (
            SCHEDULE_NAME,
            install_schedule,
            remove_schedule,
        )

        if remove:
            removed = remove_schedule()
            if verbosity > 0:
                self.stdout.write(
                    f"Removed the schedule {SCHEDULE_NAME!r}."
                    if removed
                    else f"No schedule {SCHEDULE_NAME!r} to remove."
                )
            return
        _schedule, created = install_schedule(minutes)
        if verbosity > 0:
            every = "every minute" if minutes == 1 else f"every {minutes} minutes"
            verb = "Installed" if created else "Kept"
            self.stdout.write(f"{verb} the schedule {SCHEDULE_NAME!r} ({every}).")
