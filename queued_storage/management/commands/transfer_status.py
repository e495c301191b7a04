"""How the ledger stands: counts per status and storage, the backlog's age, stuck
rows and recent errors; with --max-age, a check for a monitor."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import CommandParser
from django.utils import timezone

from queued_storage import destinations, registry
from queued_storage.adoption import statuses as adoption_statuses
from queued_storage.destinations import Destination
from queued_storage.management.cli import (
    AttentionNeeded,
    LedgerCommand,
    add_output_arguments,
    add_storage_filter,
    check_storage_keys,
    duration,
    human_seconds,
    non_negative_int,
    of_storages,
    write_json,
)
from queued_storage.models import PendingTransfer
from queued_storage.storage_state import BREAKER_CLOSED, Controls, storage_controls

STATUSES = [status.value for status in PendingTransfer.Status]
ERROR_WINDOW = timedelta(hours=1)


class Command(LedgerCommand):
    help = (
        "Show the ledger: rows per status and storage, how long the oldest due row "
        "has waited, stuck rows (lease expired, or past the transfer timeout), errors "
        "in the last hour, whether each storage's remote files are adopted, and "
        "which storages are paused or have their circuit breaker open; a mirror's "
        "key is shown under its storage's. Exit "
        "status 3 when --max-age or --max-failed is exceeded."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        add_storage_filter(parser)
        parser.add_argument(
            "--max-age",
            type=duration,
            metavar="SECONDS",
            help="Exit with status 3 when the oldest due row has waited longer than "
            "this (seconds, or e.g. 15m, 2h).",
        )
        parser.add_argument(
            "--max-failed",
            type=non_negative_int,
            metavar="N",
            help="Exit with status 3 when more than N rows are failed.",
        )
        add_output_arguments(parser, progress=False)

    def handle(
        self,
        *,
        storages: list[str] | None,
        max_age: timedelta | None,
        max_failed: int | None,
        json: bool,
        verbosity: int,
        **options: Any,
    ) -> None:
        keys = check_storage_keys(storages)
        now = timezone.now()
        rows = of_storages(PendingTransfer.objects.all(), keys)
        counts = {key: dict.fromkeys(STATUSES, 0) for key in keys}
        counts.update(rows.status_counts_per_storage())
        totals = {
            status: sum(per_status[status] for per_status in counts.values())
            for status in STATUSES
        }
        oldest = rows.oldest_due_at(now)
        age = (now - oldest).total_seconds() if oldest is not None else None
        stuck = rows.stuck(now).count()
        errors = rows.errors_since(now - ERROR_WINDOW).count()
        shown = keys or sorted(set(counts) | set(registry.known_keys()))
        adoption = {
            key: status.as_dict() for key, status in adoption_statuses(shown).items()
        }
        controls = storage_controls(shown, now=now)
        # Each storage's destinations under its key: unasked, every one of each
        # storage shown (those without rows count 0).
        found = destinations.known()
        listed = keys or [
            k for key in counts for k in destinations.of_storage(key, found)
        ]
        order = destinations.grouped(listed, found)
        table = {d.key: counts.get(d.key) or dict.fromkeys(STATUSES, 0) for d in order}

        problems = []
        if max_age is not None and age is not None and age > max_age.total_seconds():
            problems.append(
                f"the oldest due transfer has waited {human_seconds(age)}, more than "
                f"{human_seconds(max_age.total_seconds())}"
            )
        if max_failed is not None and totals["failed"] > max_failed:
            problems.append(
                f"{totals['failed']} transfers are failed, more than {max_failed}"
            )

        if json:
            write_json(
                self,
                {
                    "storages": {key: counts[key] for key in sorted(counts)},
                    "totals": totals,
                    "oldest_due_at": oldest.isoformat() if oldest else None,
                    "oldest_due_age_seconds": None if age is None else round(age, 1),
                    "stuck": stuck,
                    "errors_last_hour": errors,
                    "problems": problems,
                    "adoption": adoption,
                    "controls": {
                        key: state.as_dict() for key, state in controls.items()
                    },
                    "destinations": destinations_json(order, table, controls),
                },
            )
        elif verbosity > 0:
            self._print(order, table, totals, age, stuck, errors)
            self._print_adoption(adoption)
            self._print_controls(controls)
        if problems:
            raise AttentionNeeded("; ".join(problems) + ".")

    def _print(
        self,
        order: list[Destination],
        counts: dict[str, dict[str, int]],
        totals: dict[str, int],
        age: float | None,
        stuck: int,
        errors: int,
    ) -> None:
        labels = {d.key: row_label(d) for d in order}
        width = max([len("storage"), len("total"), *map(len, labels.values())])
        header = "storage".ljust(width) + "".join(f"{s:>14}" for s in STATUSES)
        self.stdout.write(header)
        for destination in order:
            key = destination.key
            self.stdout.write(
                labels[key].ljust(width)
                + "".join(f"{counts[key][s]:>14}" for s in STATUSES)
            )
        self.stdout.write(
            "total".ljust(width) + "".join(f"{totals[s]:>14}" for s in STATUSES)
        )
        self.stdout.write("")
        self.stdout.write(
            "oldest due: "
            + ("nothing due" if age is None else f"waiting {human_seconds(age)}")
        )
        self.stdout.write(
            f"stuck (lease expired, or past the transfer timeout): {stuck}"
        )
        self.stdout.write(f"errors in the last hour: {errors}")

    def _print_adoption(self, adoption: dict[str, dict[str, Any]]) -> None:
        self.stdout.write("")
        for key, state in adoption.items():
            if state["adopted"]:
                self.stdout.write(f"{key}: adopted {state['adopted_at']}")
                continue
            stopped = state["adoption_cursor"]
            where = f", adoption stopped after {stopped!r}" if stopped else ""
            self.stdout.write(
                f"{key}: not adopted{where} (a save asks the remote once about each "
                "name the ledger has never seen; run manage.py adopt_remote_files "
                f"--storage {key}, or --new if its remote holds nothing from before)"
            )

    def _print_controls(self, controls: dict[str, Controls]) -> None:
        """A line per storage that is paused or whose breaker is not closed."""
        lines = []
        for key, state in controls.items():
            if state.paused:
                by = f" by {state.paused_by}" if state.paused_by else ""
                why = f": {state.pause_reason}" if state.pause_reason else ""
                lines.append(
                    f"{key}: paused since {state.paused_at:%Y-%m-%d %H:%M:%S %Z}"
                    f"{by}{why} (manage.py resume_transfers {key})"
                )
            if state.breaker != BREAKER_CLOSED:
                probe = state.next_probe_at
                lines.append(
                    f"{key}: circuit breaker {state.breaker} since "
                    f"{state.since:%Y-%m-%d %H:%M:%S %Z} after "
                    f"{state.consecutive_failures} remote failure(s) in a row; next "
                    f"probe {f'{probe:%Y-%m-%d %H:%M:%S %Z}' if probe else 'now'}"
                )
        self.stdout.write("")
        if not lines:
            self.stdout.write("No storage paused; every circuit breaker closed.")
        for line in lines:
            self.stdout.write(line)


def row_label(destination: Destination) -> str:
    """A storage's key; a mirror's indented under it: ``  → media@backup (mirror
    backup)``."""
    if not destination.is_mirror:
        return destination.key
    return f"  → {destination.key} (mirror {destination.mirror})"


def destinations_json(
    order: list[Destination],
    counts: dict[str, dict[str, int]],
    controls: dict[str, Controls],
) -> dict[str, list[dict[str, Any]]]:
    """Per storage, each destination's counts and state: its own remote's first
    (``"mirror": null``), then its mirrors'."""
    found: dict[str, list[dict[str, Any]]] = {}
    for destination in order:
        state = controls.get(destination.key) or Controls(destination.key)
        found.setdefault(destination.primary, []).append(
            {
                "key": destination.key,
                "mirror": destination.mirror or None,
                "counts": counts[destination.key],
                "paused": state.paused,
                "breaker": state.breaker,
            }
        )
    return dict(sorted(found.items()))
