"""Real ``Storage`` subclasses with a fault built in, used as remotes by the tests.

Each is a ``FileSystemStorage`` so that the bytes really move; the fault is the
only difference. The tests reach them by dotted path, as a user's settings would.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage
from django.db import transaction
from django.utils import timezone, translation

#: Calls per (storage location, method name), for tests that pin network use.
CALLS: Counter[tuple[str, str]] = Counter()
COUNTING_LOCK = threading.Lock()


class CountingStorage(FileSystemStorage):
    """Counts calls to the methods that would reach the network on a real remote."""

    def _count(self, method: str) -> None:
        with COUNTING_LOCK:  # += on a Counter is a read and a write
            CALLS[(str(self.location), method)] += 1

    def calls(self, method: str) -> int:
        return CALLS[(str(self.location), method)]

    def exists(self, name: str) -> bool:
        self._count("exists")
        self._count(f"exists {name}")
        return super().exists(name)

    def _save(self, name: str, content: Any) -> str:
        self._count("save")
        return super()._save(name, content)  # type: ignore[misc, no-any-return]

    def size(self, name: str) -> int:
        self._count("size")
        return super().size(name)

    def url(self, name: str | None) -> str:
        self._count("url")
        return super().url(name)

    def delete(self, name: str) -> None:
        self._count("delete")
        super().delete(name)


class UnlistedStorage(CountingStorage):
    """A remote that cannot list a directory (Django's base ``Storage`` cannot)."""

    def listdir(self, path: str) -> tuple[list[str], list[str]]:
        raise NotImplementedError("this remote cannot list a directory")


class FlakyStorage(CountingStorage):
    """Fails the first ``failures`` uploads with a ConnectionError."""

    def __init__(self, failures: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures = failures

    def _save(self, name: str, content: Any) -> str:
        # Lanes share the instance: two uploads at once must not both take the
        # last failure.
        with COUNTING_LOCK:
            fail = self.failures > 0
            self.failures -= fail
        if fail:
            raise ConnectionError("remote unreachable")
        return super()._save(name, content)


class RenamingStorage(CountingStorage):
    """Saves every file under another name."""

    def get_available_name(self, name: str, max_length: int | None = None) -> str:
        return f"renamed/{name}"


class MisreportingStorage(CountingStorage):
    """Writes at the name it is given and answers another one, ``elsewhere/...``."""

    def _save(self, name: str, content: Any) -> str:
        super()._save(name, content)
        return f"elsewhere/{name}"


class FullDiskStorage(FileSystemStorage):
    """A local storage whose writes fail."""

    def _save(self, name: str, content: Any) -> str:
        raise OSError(28, "No space left on device")


class OverlookingStorage(FileSystemStorage):
    """Says a name is free the first time it is asked, and then finds it taken when
    it writes: the race of two saves of one name on a local storage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: set[str] = set()

    def is_name_available(self, name: str, max_length: int | None = None) -> bool:
        if name not in self.asked:
            self.asked.add(name)
            return True
        return super().is_name_available(name, max_length=max_length)


class OverwritingStorage(FileSystemStorage):
    """The well-known recipe for a storage that replaces a file of the same name."""

    def get_available_name(self, name: str, max_length: int | None = None) -> str:
        if self.exists(name):
            self.delete(name)
        return name


class TruncatingStorage(CountingStorage):
    """Loses the last byte of every file."""

    def _save(self, name: str, content: Any) -> str:
        return super()._save(name, ContentFile(content.read()[:-1]))


class SwappingStorage(FileSystemStorage):
    """Replaces a file by a symlink to ``target`` as it opens it: the swap that
    lands between a worker's check of the local file and its read."""

    target = ""

    def _open(self, name: str, mode: str = "rb") -> Any:
        if type(self).target:
            path = self.path(name)
            os.remove(path)
            os.symlink(type(self).target, path)
        return super()._open(name, mode)  # type: ignore[misc]


class GatedStorage(CountingStorage):
    """Blocks each upload until the test opens the gate: the window for races."""

    entered = threading.Event()
    gate = threading.Event()

    def _save(self, name: str, content: Any) -> str:
        type(self).entered.set()
        if not type(self).gate.wait(timeout=30):
            raise TimeoutError("the test never opened the gate")
        return super()._save(name, content)


class SteppingStorage(CountingStorage):
    """Lets the first ``free`` uploads through; each one after sets ``held`` and
    waits until the test sets ``release``: a drain stopped with files done."""

    free = 1
    uploads = 0
    held = threading.Event()
    release = threading.Event()

    @classmethod
    def reset(cls, free: int) -> None:
        with COUNTING_LOCK:
            cls.free, cls.uploads = free, 0
        cls.held, cls.release = threading.Event(), threading.Event()

    def _save(self, name: str, content: Any) -> str:
        cls = type(self)
        with COUNTING_LOCK:
            cls.uploads += 1
            hold = cls.uploads > cls.free
        if hold:
            cls.held.set()
            if not cls.release.wait(timeout=30):
                raise TimeoutError("the test never released the upload")
        return super()._save(name, content)


class PausingStorage(CountingStorage):
    """Pauses once in the method named by ``PausingStorage.pause_in`` (``exists``
    and ``get_available_name`` after their answer, ``_save`` and ``delete`` before
    acting) until the test sets ``resume``: a worker stopped between a check and
    the call that acts on it. ``paused`` is set when it stops. Uploads made by
    the thread ``break_write_in`` fail half-way."""

    pause_in = ""
    thread: threading.Thread | None = None
    #: Uploads made by this thread write half the file and fail.
    break_write_in: threading.Thread | None = None
    paused = threading.Event()
    resume = threading.Event()

    @classmethod
    def arm(cls, method: str, thread: threading.Thread | None = None) -> None:
        """Pause the next call of ``method`` (made by ``thread``, when given), with
        fresh ``paused`` and ``resume`` events."""
        cls.paused = threading.Event()
        cls.resume = threading.Event()
        cls.thread = thread
        cls.pause_in = method

    def _pause(self, method: str) -> None:
        cls = type(self)
        if cls.pause_in != method or cls.thread not in (
            None,
            threading.current_thread(),
        ):
            return
        cls.pause_in = ""
        paused, resume = cls.paused, cls.resume
        paused.set()
        if not resume.wait(timeout=30):
            raise TimeoutError("the test never resumed the paused call")

    def exists(self, name: str) -> bool:
        found = super().exists(name)
        self._pause("exists")
        return found

    def get_available_name(self, name: str, max_length: int | None = None) -> str:
        available = super().get_available_name(name, max_length=max_length)
        self._pause("get_available_name")
        return available

    def _save(self, name: str, content: Any) -> str:
        self._pause("_save")
        if type(self).break_write_in is threading.current_thread():
            # The connection drops half-way: what is there is half a file.
            data = content.read()
            super()._save(name, ContentFile(data[: len(data) // 2]))
            raise ConnectionResetError("the connection dropped mid-upload")
        return super()._save(name, content)

    def delete(self, name: str) -> None:
        self._pause("delete")
        super().delete(name)

    def listdir(self, path: str) -> tuple[list[str], list[str]]:
        found = super().listdir(path)
        self._pause("listdir")
        return found


class FailingExistsStorage(CountingStorage):
    """Its first ``exists()`` times out, as a remote's existence check can."""

    failures = 1

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures = type(self).failures

    def exists(self, name: str) -> bool:
        if self.failures > 0:
            self.failures -= 1
            raise TimeoutError("the existence check timed out")
        return super().exists(name)


class ExplodingStorage(FileSystemStorage):
    """Any call fails: proves that a code path never touches the remote."""

    def __getattribute__(self, name: str) -> Any:
        if name in {
            "exists",
            "save",
            "_save",
            "open",
            "_open",
            "url",
            "size",
            "delete",
            "listdir",
            "get_available_name",
        }:
            raise AssertionError(f"the remote's {name}() was called")
        return super().__getattribute__(name)


_recording = threading.local()


class RecordingStorage(FileSystemStorage):
    """Records every call of the ``Storage`` API made to it, as (method, name), in
    ``RecordingStorage.calls``: proves which calls a code path makes to the remote."""

    calls: list[tuple[str, str]] = []
    API = frozenset(
        {
            "exists",
            "save",
            "open",
            "url",
            "size",
            "path",
            "delete",
            "listdir",
            "get_available_name",
            "is_name_available",
            "get_accessed_time",
            "get_created_time",
            "get_modified_time",
        }
    )

    def __getattribute__(self, name: str) -> Any:
        found = super().__getattribute__(name)
        if name not in type(self).API:
            return found

        def recorded(*args: Any, **kwargs: Any) -> Any:
            inner = _recording.__dict__.setdefault("depth", 0)
            if not inner:  # not the storage's own calls to itself
                type(self).calls.append((name, str(args[0]) if args else ""))
            _recording.depth = inner + 1
            try:
                return found(*args, **kwargs)
            finally:
                _recording.depth = inner

        return recorded


class SizeFailingStorage(CountingStorage):
    """Raises ``SizeFailingStorage.error`` from ``size()`` of the name
    ``SizeFailingStorage.fail_on``, once: a crash at a known point of a listing."""

    fail_on = ""
    error: BaseException = KeyboardInterrupt()

    def size(self, name: str) -> int:
        cls = type(self)
        if name == cls.fail_on:
            cls.fail_on = ""
            raise cls.error
        return super().size(name)


class SizeOutageStorage(CountingStorage):
    """A remote whose ``size()`` fails while ``SizeOutageStorage.down`` is set."""

    down = False

    def size(self, name: str) -> int:
        if type(self).down:
            raise ConnectionError("the remote is unreachable")
        return super().size(name)


def wait_for_gate_file(gate: str, timeout: float = 60) -> None:
    """Wait until the test creates the file ``gate``: a gate that works across
    processes (polled: a file has no event to wait on)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError("the test never created the gate file")
        time.sleep(0.02)


class SizeGatedStorage(CountingStorage):
    """A remote for command processes: its ``size()`` of the name ``stop_at``
    creates the file ``entered`` and waits for the file ``gate``, which the test
    never creates when it kills the process there."""

    def __init__(self, stop_at: str, entered: str, gate: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stop_at = stop_at
        self.entered = entered
        self.gate = gate

    def size(self, name: str) -> int:
        if name == self.stop_at:
            with open(self.entered, "w") as mark:
                mark.write(name)
            wait_for_gate_file(self.gate)
        return super().size(name)


def append_journal(journal: str, event: str, name: str) -> None:
    """Append ``event<TAB>pid<TAB>time<TAB>name`` to ``journal`` in one write.

    O_APPEND makes each line land whole, whichever worker process writes it."""
    line = f"{event}\t{os.getpid()}\t{time.time():.6f}\t{name}\n".encode()
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class _Paced:
    """File content whose chunks arrive ``delay`` seconds apart: a slow upload."""

    def __init__(self, content: Any, delay: float, chunk_size: int) -> None:
        self.content = content
        self.delay = delay
        self.chunk_size = chunk_size

    def chunks(self, chunk_size: int | None = None) -> Iterator[bytes]:
        for chunk in self.content.chunks(chunk_size=self.chunk_size):
            time.sleep(self.delay)
            yield chunk


class _Stepped:
    """File content whose every chunk is read only once ``step()`` returns."""

    def __init__(self, content: Any, step: Callable[[], None], size: int) -> None:
        self.content = content
        self.step = step
        self.size = size

    def chunks(self, chunk_size: int | None = None) -> Iterator[bytes]:
        chunks = self.content.chunks(chunk_size=self.size)
        while True:
            self.step()
            chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk


class SteppedStorage(CountingStorage):
    """Uploads read the file ``SteppedStorage.chunk_size`` bytes at a time, each
    read (the last one, which finds the end, too) only once the test's
    ``SteppedStorage.step()`` returns: a slow upload paced by the test, not by
    the clock."""

    step: Callable[[], None] | None = None
    chunk_size = 10

    def _save(self, name: str, content: Any) -> str:
        step = type(self).step
        if step is not None:
            content = _Stepped(content, step, self.chunk_size)
        return super()._save(name, content)


class JournalingStorage(FileSystemStorage):
    """Journals every upload (``begin`` and ``saved`` lines) to the file ``journal``,
    so a test counts the remote's writes across worker processes; ``delay`` seconds
    between chunks of ``chunk_size`` bytes make uploads slow, and with ``gate``
    each upload waits after its ``begin`` until the test creates that file."""

    def __init__(
        self,
        journal: str,
        delay: float = 0.0,
        chunk_size: int = 64 * 1024,
        gate: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.journal = journal
        self.delay = delay
        self.chunk_size = chunk_size
        self.gate = gate

    def _save(self, name: str, content: Any) -> str:
        append_journal(self.journal, "begin", name)
        if self.gate:
            wait_for_gate_file(self.gate)
        if self.delay:
            content = _Paced(content, self.delay, self.chunk_size)
        saved: str = super()._save(name, content)  # type: ignore[misc]
        append_journal(self.journal, "saved", saved)
        return saved


class CorruptingStorage(CountingStorage):
    """Flips one byte of every file: same size, wrong content."""

    def _save(self, name: str, content: Any) -> str:
        data = bytearray(content.read())
        if data:
            data[len(data) // 2] ^= 0xFF
        return super()._save(name, ContentFile(bytes(data)))


class KeyedRemote(FileSystemStorage):
    """A remote that takes credentials and fails, quoting them as careless client
    libraries do."""

    def __init__(self, secret_key: str = "", url: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.secret_key = secret_key
        self.url_with_password = url

    def _save(self, name: str, content: Any) -> str:
        raise PermissionError(
            f"access denied for secret_key={self.secret_key} at {self.url_with_password}"
        )


class DeleteRefusingRemote(FileSystemStorage):
    """Saves, and fails to delete quoting its credential."""

    def __init__(self, api_secret: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.api_secret = api_secret

    def delete(self, name: str) -> None:
        raise PermissionError(f"delete {name!r} refused for {self.api_secret}")


class HookedStorage(FileSystemStorage):
    """Calls ``HookedStorage.before_write(name)`` as an upload starts and
    ``HookedStorage.after_write(name)`` once its bytes are written, before the
    save returns, and ``HookedStorage.before_delete(name)`` as a delete starts:
    the moments around a worker's upload or a purge where the property test
    replays races, crashes and failures. Each hook runs once."""

    before_write: Callable[[str], None] | None = None
    after_write: Callable[[str], None] | None = None
    before_delete: Callable[[str], None] | None = None

    def delete(self, name: str) -> None:
        hook = type(self).before_delete
        if hook is not None:
            type(self).before_delete = None
            hook(name)
        super().delete(name)

    def _save(self, name: str, content: Any) -> str:
        hook = type(self).before_write
        if hook is not None:
            type(self).before_write = None
            hook(name)
        saved: str = super()._save(name, content)  # type: ignore[misc]
        hook = type(self).after_write
        if hook is not None:
            type(self).after_write = None
            hook(saved)
        return saved


class FileGatedStorage(CountingStorage):
    """A remote for worker processes: its first upload in a process creates the
    file ``entered`` and waits until the test creates the file ``gate``."""

    def __init__(self, entered: str, gate: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entered = entered
        self.gate = gate

    def _save(self, name: str, content: Any) -> str:
        if not os.path.exists(self.entered):
            with open(self.entered, "w") as mark:
                mark.write(name)
            wait_for_gate_file(self.gate)
        return super()._save(name, content)


class UndeletableStorage(FileSystemStorage):
    """A local storage whose delete() fails."""

    def delete(self, name: str) -> None:
        raise PermissionError(f"cannot delete {name}")


class WindowStorage(FileSystemStorage):
    """A local storage that calls ``WindowStorage.before_delete(name)`` just before
    a file is deleted and ``WindowStorage.after_delete(name)`` just after: the
    window between a check and a delete, where a test lands a re-save. Each hook
    runs once."""

    before_delete: Callable[[str], None] | None = None
    after_delete: Callable[[str], None] | None = None

    def delete(self, name: str) -> None:
        hook = type(self).before_delete
        if hook is not None:
            type(self).before_delete = None
            hook(name)
        super().delete(name)
        hook = type(self).after_delete
        if hook is not None:
            type(self).after_delete = None
            hook(name)


class StallingStorage(CountingStorage):
    """The first upload of each name in ``StallingStorage.stall`` writes half the
    file and stalls until the test sets ``released``, then fails: a connection
    that stopped mid-upload."""

    stall: set[str] = set()
    #: Set once the half file is written and the upload stalls.
    entered = threading.Event()
    released = threading.Event()
    returned = threading.Event()

    def _save(self, name: str, content: Any) -> str:
        cls = type(self)
        if name not in cls.stall:
            return super()._save(name, content)
        cls.stall.discard(name)
        data = content.read()
        try:
            super()._save(name, ContentFile(data[: len(data) // 2]))
            cls.entered.set()
            cls.released.wait(timeout=30)
            raise ConnectionResetError("the connection stalled mid-upload")
        finally:
            cls.returned.set()


class HangingStorage(CountingStorage):
    """The first upload of each name in ``HangingStorage.hang`` hangs until the test
    sets ``released``: a stalled connection. Other uploads go through."""

    hang: set[str] = set()
    entered = threading.Event()
    released = threading.Event()
    returned = threading.Event()
    #: Uploads hanging now, and the most that ever hung at once.
    hanging = 0
    most = 0
    _lock = threading.Lock()

    def _save(self, name: str, content: Any) -> str:
        cls = type(self)
        if name not in cls.hang:
            return super()._save(name, content)
        cls.hang.discard(name)
        with cls._lock:
            cls.hanging += 1
            cls.most = max(cls.most, cls.hanging)
        cls.entered.set()
        try:
            if not cls.released.wait(timeout=30):
                raise TimeoutError("the test never released the hung upload")
            return super()._save(name, content)
        finally:
            with cls._lock:
                cls.hanging -= 1
            cls.returned.set()


class SaveWindowStorage(WindowStorage):
    """A ``WindowStorage`` that also calls ``before_save(name)`` and
    ``after_save(name)`` around the writes made by ``SaveWindowStorage.thread``:
    a save stopped between its check of the ledger and its write, or between its
    write and its row."""

    thread: threading.Thread | None = None
    before_save: Callable[[str], None] | None = None
    after_save: Callable[[str], None] | None = None

    def _save(self, name: str, content: Any) -> str:
        cls = type(self)
        mine = threading.current_thread() is cls.thread
        if mine and cls.before_save is not None:
            cls.before_save(name)
        saved: str = super()._save(name, content)  # type: ignore[misc]
        if mine and cls.after_save is not None:
            cls.after_save(name)
        return saved


class ReadThenHangStorage(CountingStorage):
    """The first upload of each name in ``ReadThenHangStorage.hang`` reads the whole
    file, then hangs until the test sets ``released``, then writes what it read: a
    request whose body was sent and whose answer is late."""

    hang: set[str] = set()
    entered = threading.Event()
    released = threading.Event()
    returned = threading.Event()

    def _save(self, name: str, content: Any) -> str:
        cls = type(self)
        if name not in cls.hang:
            return super()._save(name, content)
        cls.hang.discard(name)
        data = content.read()
        cls.entered.set()
        try:
            if not cls.released.wait(timeout=30):
                raise TimeoutError("the test never released the hung upload")
            return super()._save(name, ContentFile(data))
        finally:
            cls.returned.set()


class BlindStorage(CountingStorage):
    """A remote whose first ``exists()`` says no, whatever it holds (a replica
    that lags); the later ones tell the truth."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lies = 1

    def exists(self, name: str) -> bool:
        if self.lies > 0:
            self.lies -= 1
            return False
        return super().exists(name)


#: The thread of each upload, by name (for ThreadClientStorage).
UPLOAD_THREADS: dict[str, int] = {}
#: The clients ThreadClientStorage built, one per thread, as S3Storage does.
CLIENTS_BUILT: list[int] = []


class ThreadClientStorage(CountingStorage):
    """Builds a client the first time a thread uploads, as django-storages'
    S3Storage does (its boto3 client is per thread)."""

    _threads = threading.local()

    def _save(self, name: str, content: Any) -> str:
        if getattr(self._threads, "client", None) is None:
            self._threads.client = object()
            CLIENTS_BUILT.append(threading.get_ident())
        UPLOAD_THREADS[name] = threading.get_ident()
        return super()._save(name, content)


#: What each upload of a StateLeakingStorage found when it began, by name.
FOUND_AT_UPLOAD: dict[str, dict[str, Any]] = {}


class StateLeakingStorage(CountingStorage):
    """Notes the language and time zone active when each upload begins; the upload
    of a name in ``leak_activation`` then leaves French and Paris activated on its
    thread, and that of a name in ``leak_transaction`` a transaction open on its
    thread's ledger connection, as a careless remote or hook could."""

    leak_activation: set[str] = set()
    leak_transaction: set[str] = set()

    def _save(self, name: str, content: Any) -> str:
        FOUND_AT_UPLOAD[name] = {
            "language": translation.get_language(),
            "timezone": timezone.get_current_timezone_name(),
        }
        UPLOAD_THREADS[name] = threading.get_ident()
        saved = super()._save(name, content)
        if name in self.leak_activation:
            translation.activate("fr")
            timezone.activate("Europe/Paris")
        if name in self.leak_transaction:
            transaction.atomic().__enter__()
        return saved


#: The thread of each upload that hung, by name (for HangingThreadStorage).
HUNG_THREADS: dict[str, int] = {}


class HangingThreadStorage(HangingStorage):
    """A ``HangingStorage`` that notes the thread of each upload: in
    ``HUNG_THREADS`` for one that hangs, else in ``UPLOAD_THREADS``."""

    def _save(self, name: str, content: Any) -> str:
        threads = HUNG_THREADS if name in type(self).hang else UPLOAD_THREADS
        threads[name] = threading.get_ident()
        return super()._save(name, content)


class OutageStorage(FileSystemStorage):
    """A remote whose uploads and deletes raise ConnectionError while its
    location is in ``OutageStorage.down`` (reads still work), and which calls
    ``OutageStorage.after_write(name)`` once an upload's bytes are written, before
    the save returns (the hook runs once): the mirrored property test takes one
    destination down, or kills a worker right after its upload, by location."""

    down: set[str] = set()
    after_write: Callable[[str], None] | None = None

    def _refuse_if_down(self, what: str, name: str) -> None:
        if str(self.location) in OutageStorage.down:
            raise ConnectionError(f"remote unreachable: {what} {name}")

    def delete(self, name: str) -> None:
        self._refuse_if_down("delete", name)
        super().delete(name)

    def _save(self, name: str, content: Any) -> str:
        self._refuse_if_down("upload", name)
        saved: str = super()._save(name, content)  # type: ignore[misc]
        hook = OutageStorage.after_write
        if hook is not None:
            OutageStorage.after_write = None
            hook(saved)
        return saved
