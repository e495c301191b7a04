"""The ledger floor of the drain benchmark, a process of its own: the raw loop of
``benchmarks/raw_copy.py`` plus the least a ledger-backed drain must do, in plain
SQL built once: ``python benchmarks/ledger_floor.py LOCAL REMOTE KEY``.

Per 200 rows (the drain's largest claim): one transaction that selects the due
rows of ``KEY`` (``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and marks them
transferring; then, per row, ``remote.save(name, local.open(name))`` and a size
check of the copy; then one transaction that marks the 200 rows done. No lease,
no compare-and-set, no history: what is left of ``process_transfers`` when its
guarantees are taken out. The drain benchmark reports the raw loop against this
floor beside its target, so that what the ledger itself costs on the day's disk
is read next to the package's figure."""

from __future__ import annotations

import sys

from benchmarks.raw_copy import site_storages

#: The rows of one claim: ``queued_storage.worker.DEFAULT_BATCH_SIZE``.
CLAIM = 200


def main(argv: list[str]) -> int:
    local_root, remote_root, key = argv
    local, remote = site_storages(local_root, remote_root)
    from django.db import connection, transaction

    table = "queued_storage_pendingtransfer"
    lock = " FOR UPDATE SKIP LOCKED" if connection.vendor == "postgresql" else ""
    select = (
        f"SELECT id, name FROM {table} WHERE storage_key = %s AND status = 'queued' "
        f"ORDER BY id LIMIT {CLAIM}{lock}"
    )
    while True:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(select, [key])
            rows = cursor.fetchall()
            if not rows:
                return 0
            ids = [row[0] for row in rows]
            marks = ", ".join(["%s"] * len(ids))
            cursor.execute(
                f"UPDATE {table} SET status = 'transferring' WHERE id IN ({marks})",
                ids,
            )
        for _, name in rows:
            with local.open(name, "rb") as source:
                remote.save(name, source)
            if remote.size(name) != local.size(name):
                raise SystemExit(f"size mismatch: {name}")
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {table} SET status = 'done' WHERE id IN ({marks})", ids
            )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
