"""Moving a storage's files to a new remote through a serving mirror: how far the
copy has come (files and bytes verified on the new remote, of the storage's live
files), whether the storage is ready to switch to the mirror's rows, and the
configuration to switch to. Read from the ledger alone; the copying is the
mirror's workers' and the backfill's."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from django.db import connections, router

from queued_storage import registry
from queued_storage.configuration import DEFAULT_TASK
from queued_storage.ledger_sql import column
from queued_storage.models import PendingTransfer
from queued_storage.storage import QueuedStorage, class_path

Status = PendingTransfer.Status


@dataclass
class MigrationProgress:
    """The live files of storage ``key`` and where each stands on mirror
    ``mirror_key``. A file is verified when the mirror's row of its name is done
    and live at the storage's generation (equal: see ``prefetch.serving``): it is
    served from the new remote already. Every file that is not counts once more, in
    ``copying`` (its mirror row is queued, transferring or held), ``failed``
    (its mirror row ran out of attempts), ``on_its_way`` (the storage's own row
    is queued or transferring: the mirror copies the file once it is done),
    ``blocked`` (the storage's own row is failed or held: it waits for a requeue
    or ``transfer()``) or ``missing`` (done, with no mirror row at its
    generation yet: the backfill queues it)."""

    key: str
    mirror_key: str
    files: int = 0
    bytes: int = 0
    verified_files: int = 0
    verified_bytes: int = 0
    copying: int = 0
    failed: int = 0
    on_its_way: int = 0
    blocked: int = 0
    missing: int = 0

    @property
    def ready(self) -> bool:
        """Every live file is verified on the new remote."""
        return self.verified_files == self.files

    @property
    def in_motion(self) -> bool:
        """Some file that is not verified yet may be without anyone's help."""
        return bool(self.copying or self.on_its_way)

    @property
    def attention(self) -> int:
        """Files that a person must act on before the storage is ready: failed
        copies and files that did not reach the storage's own remote."""
        return self.failed + self.blocked

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ready": self.ready}

    def line(self) -> str:
        """``9,312 of 10,000 files verified on media-new (1.2 GiB of 1.3 GiB)``."""
        return (
            f"{self.verified_files:,} of {self.files:,} files verified on "
            f"{self.mirror_key} ({_size(self.verified_bytes)} of {_size(self.bytes)})"
        )


def progress(key: str, mirror_key: str) -> MigrationProgress:
    """How far the copy of storage ``key``'s live files to ``mirror_key`` has come:
    one query, which reads each live row of the storage and finds its mirror row
    on the unique index."""
    db = router.db_for_read(PendingTransfer)
    connection = connections[db]
    quote = connection.ops.quote_name
    table = quote(PendingTransfer._meta.db_table)
    key_c, hash_c, status_c, deleted_c, size_c, generation_c = (
        quote(column(PendingTransfer, field))
        for field in (
            "storage_key",
            "name_hash",
            "status",
            "deleted",
            "size",
            "generation",
        )
    )
    done, failed = Status.DONE.value, Status.FAILED.value
    queued, transferring = Status.QUEUED.value, Status.TRANSFERRING.value
    sql = (
        "SELECT COUNT(*), "
        f"SUM(COALESCE(p.{size_c}, 0)), "
        f"SUM(CASE WHEN m.{status_c} = %s THEN 1 ELSE 0 END), "
        f"SUM(CASE WHEN m.{status_c} = %s THEN COALESCE(m.{size_c}, 0) ELSE 0 END), "
        f"SUM(CASE WHEN m.{status_c} = %s THEN 1 ELSE 0 END), "
        f"SUM(CASE WHEN m.{status_c} IS NULL AND p.{status_c} IN (%s, %s) "
        "THEN 1 ELSE 0 END), "
        f"SUM(CASE WHEN m.{status_c} IS NULL AND p.{status_c} IN (%s, %s) "
        "THEN 1 ELSE 0 END), "
        f"SUM(CASE WHEN m.{status_c} IS NULL AND p.{status_c} = %s THEN 1 ELSE 0 END) "
        f"FROM {table} p LEFT JOIN {table} m ON m.{key_c} = %s "
        f"AND m.{hash_c} = p.{hash_c} AND m.{deleted_c} = %s "
        f"AND m.{generation_c} = p.{generation_c} "
        f"WHERE p.{key_c} = %s AND p.{deleted_c} = %s"
    )
    params: list[str | bool] = [
        *(done, done, failed),
        *(queued, transferring),
        *(failed, Status.HELD.value),
        done,
        *(mirror_key, False, key, False),
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        (
            files,
            size,
            verified,
            verified_size,
            failures,
            on_its_way,
            blocked,
            missing,
        ) = (int(value or 0) for value in cursor.fetchone())
    return MigrationProgress(
        key=key,
        mirror_key=mirror_key,
        files=files,
        bytes=size,
        verified_files=verified,
        verified_bytes=verified_size,
        copying=files - verified - failures - on_its_way - blocked - missing,
        failed=failures,
        on_its_way=on_its_way,
        blocked=blocked,
        missing=missing,
    )


def migrations(keys: list[str]) -> dict[str, MigrationProgress]:
    """The :func:`progress` of each storage of ``keys`` that has a serving mirror
    (a migration under way): one query each."""
    found = {}
    for key in keys:
        try:
            storage = registry.get(key)
        except registry.KeyConflict:
            continue  # the dashboard shows the conflict's storages as they are
        if storage is None or storage.serving_mirror is None:
            continue
        found[key] = progress(key, storage.mirror_key(storage.serving_mirror))
    return found


def switch_arguments(storage: QueuedStorage, mirror: QueuedStorage) -> dict[str, str]:
    """The arguments of the storage to switch to, as Python source: the mirror's
    remote and key, and the storage's other arguments as they are. Options are
    never quoted (they may hold secrets): a comment stands for them."""
    arguments = {"local": repr(storage.local_alias or storage.local_path)}
    if storage.local_options:
        arguments["local_options"] = "...  # as now"
    arguments["remote"] = repr(mirror.remote_alias or mirror.remote_path)
    if mirror.remote_options:
        arguments["remote_options"] = "...  # the mirror's options"
    arguments["key"] = repr(mirror.key)
    if storage.delayed:
        arguments["delayed"] = "True"
    if storage.task_path != DEFAULT_TASK:
        arguments["task"] = repr(storage.task_path)
    for flag, default in (
        ("verify_checksum", False),
        ("overwrite_remote", False),
        ("local_shared", True),
    ):
        if getattr(storage, flag) != default:
            arguments[flag] = repr(getattr(storage, flag))
    return arguments


def switch_configuration(storage: QueuedStorage, mirror: QueuedStorage) -> str:
    """:func:`switch_arguments` as the call that builds the storage."""
    cls = type(storage)
    lines = [f"{class_path(cls)}("]
    for name, value in switch_arguments(storage, mirror).items():
        value, _sep, comment = value.partition("  # ")
        lines.append(f"    {name}={value}," + (f"  # {comment}" if comment else ""))
    lines.append(")")
    return "\n".join(lines)


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
