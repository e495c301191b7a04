"""What counts as a secret of a storage, and its removal from every text that
leaves the process (rows, logs, signals, admin pages, command output).

A storage's secrets are, by value, whatever its name:

* every string of at least :data:`MIN_LENGTH` characters found anywhere in its
  options (``local_options``, ``remote_options`` and the ``OPTIONS`` of the
  ``STORAGES`` aliases it uses): nested in dicts, lists, tuples, JSON text and
  the attributes of objects such as credentials, and each line of a multi-line
  value (a PEM key);
* from :data:`MIN_SECRET_LENGTH` characters, a value that stands as a secret: one
  under a name that looks secret (:data:`SECRET_WORDS`), a URL's password, the
  value of a secret part of a connection or query string (``AccountKey=``,
  ``sig=``);
* the same of the attributes of the built storages whose names look secret
  (what a storage read from other settings, e.g. ``AWS_SECRET_ACCESS_KEY``).

Shorter strings are common words ("media", "eu") that would turn every text into
``[redacted]`` noise; they are redacted where they stand as a secret in the text
itself: a URL's password, a secret part of a connection string, a secret key of
a dict. A ``pathlib.Path`` (not a string) stays readable. The storage's key,
paths and aliases are never secrets: every text carries them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import traceback
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, quote_plus, unquote, urlsplit

from django.conf import settings
from django.core.files.storage import storages
from django.db import transaction

if TYPE_CHECKING:
    from queued_storage.configuration import ConfiguredStorage

logger = logging.getLogger("queued_storage")

REDACTED = "[redacted]"
#: Any string this long in a storage's options is a secret.
MIN_LENGTH = 8
#: A string that stands as a secret (under a secret-looking name, a URL's
#: password) is one from this length.
MIN_SECRET_LENGTH = 4
SECRET_WORDS = (
    "key",
    "secret",
    "password",
    "passwd",
    "pwd",
    "token",
    "credential",
    "sas",
    "auth",
    "passphrase",
)
#: Objects in options are looked into this deep, and at most this many values.
MAX_DEPTH = 4
MAX_VALUES = 2000

#: Names whose value is a secret where the text itself says so: connection and
#: query strings (``;AccountKey=…``, ``&sig=…``) and dict reprs (``'password': …``).
#: Not a bare ``key``/``token``: the package's own lines carry ``key=`` (the
#: storage key) and ``token=`` (a lease).
_SECRET_NAMES = (
    r"AccountKey|SharedAccessKey|SharedAccessSignature|sig|Signature"
    r"|X-Amz-Signature|X-Amz-Security-Token|X-Amz-Credential|X-Goog-Signature"
    r"|X-Goog-Credential|password|passwd|pwd|passphrase|secret|client_secret"
    r"|secret_key|access_key|account_key|api_key|apikey|app_secret|private_key"
    r"|access_token|refresh_token|session_token|security_token|sas_token"
    r"|oauth2_access_token|oauth2_refresh_token|pkey"
)
URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s/]+@")
ASSIGNED_SECRET = re.compile(rf"(?i)(?<![\w-])((?:{_SECRET_NAMES})=)[^;&\s\"',]+")
QUOTED_SECRET = re.compile(
    rf"(?i)((['\"])(?:{_SECRET_NAMES})\2\s*:\s*(['\"]))(?:(?!\3).)+(?=\3)"
)


def _looks_secret(name: Any) -> bool:
    lowered = str(name).lower()
    return any(word in lowered for word in SECRET_WORDS)


class _Collector:
    """Walks an options tree (or a storage's attributes) for secret strings."""

    def __init__(self, *, every_string: bool) -> None:
        #: Options: every long string counts. A built storage's attributes: only
        #: those under secret-looking names (the rest is what its options said).
        self.every_string = every_string
        self.found: set[str] = set()
        #: What was looked into, by id, kept alive until the walk ends: the
        #: temporaries it makes (an object's attributes, parsed JSON) are freed
        #: as soon as they are walked, and a later one may get the same id.
        self.seen: dict[int, Any] = {}
        self.values = 0

    def walk(self, value: Any, *, secret: bool, depth: int = 0) -> None:
        self.values += 1
        if self.values > MAX_VALUES or depth > MAX_DEPTH:
            return
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value).decode("utf-8", "ignore")
        if isinstance(value, str):
            self.string(value, secret=secret, depth=depth)
        elif (
            isinstance(value, (bool, int, float, complex, type(None), type))
            or id(value) in self.seen
        ):
            return
        else:
            self.seen[id(value)] = value
            # Whatever an object does when looked into, redaction runs on error
            # paths and must not fail there.
            with contextlib.suppress(Exception):
                self.container(value, secret=secret, depth=depth)

    def container(self, value: Any, *, secret: bool, depth: int) -> None:
        if isinstance(value, Mapping):
            for name, item in list(value.items()):
                self.walk(item, secret=secret or _looks_secret(name), depth=depth + 1)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in list(value):
                self.walk(item, secret=secret, depth=depth + 1)
        elif (
            (self.every_string or secret)
            and not callable(value)
            and not isinstance(value, types.ModuleType)
        ):
            # A credentials object: its attributes, whatever they are called.
            self.walk(dict(vars(value)), secret=secret, depth=depth + 1)

    def string(self, value: str, *, secret: bool, depth: int) -> None:
        if len(value) >= (MIN_SECRET_LENGTH if secret else MIN_LENGTH) and (
            secret or self.every_string
        ):
            self.add(value)
        if "://" in value:
            try:
                password = urlsplit(value.strip()).password
            except ValueError:
                password = None
            if password:
                self.string(password, secret=True, depth=depth)
        if "=" in value and (";" in value or "&" in value or value.count("=") == 1):
            # A connection string (``AccountKey=…;``) or a query string (``sig=…&``).
            for part in re.split(r"[;&]", value):
                name, sep, item = part.partition("=")
                if sep and item and item != value:
                    self.string(
                        item.strip(),
                        secret=secret or _looks_secret(name),
                        depth=depth + 1,
                    )
        stripped = value.strip()
        if stripped[:1] in ("{", "[") and depth < MAX_DEPTH:
            try:
                parsed = json.loads(stripped)
            except ValueError:
                parsed = None
            if isinstance(parsed, (dict, list)):
                self.walk(parsed, secret=secret, depth=depth + 1)

    def add(self, value: str) -> None:
        self.found.add(value)
        lines = value.splitlines()
        if len(lines) > 1:
            self.found.update(
                line.strip() for line in lines if len(line.strip()) >= MIN_LENGTH
            )
        # How an error may quote it: escaped, URL-encoded (a path keeps its
        # slashes) or decoded, or its UTF-8 bytes as Python shows them.
        encoded = value.encode("utf-8", "surrogatepass")
        self.found.update(
            {
                json.dumps(value)[1:-1],
                repr(value)[1:-1],
                repr(encoded)[2:-1],
                quote(value, safe=""),
                quote(value),
                quote_plus(value, safe=""),
                quote_plus(value),
                unquote(value),
            }
        )


def scrub(storage: ConfiguredStorage | None, error: BaseException) -> None:
    """Redact ``error`` in place, and every error it chains, before it reaches a
    caller: it keeps its type (a ``FileNotFoundError`` stays one), but neither its
    message nor its traceback quotes a secret of ``storage`` or of any storage
    this process built. What an error's own ``__str__`` makes of attributes other
    than its arguments (and ``OSError``'s) is beyond reach."""
    secrets = set(known_secrets())
    if storage is not None:
        secrets |= secrets_of(storage)
    seen: set[int] = set()
    stack: list[BaseException] = [error]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        # Whatever an error does when changed, the caller must get it raised.
        with contextlib.suppress(Exception):
            _scrub_one(secrets, current)
        stack += [e for e in (current.__cause__, current.__context__) if e is not None]


def _scrub_one(secrets: set[str], error: BaseException) -> None:
    notes = getattr(error, "__notes__", None)
    if isinstance(notes, list):
        error.__notes__ = [redact_with(secrets, str(note)) for note in notes]
    text = str(error)
    if redact_with(secrets, text) == text:
        return
    if isinstance(error, OSError):
        for attribute in ("strerror", "filename", "filename2"):
            value = getattr(error, attribute)
            if isinstance(value, str):
                setattr(error, attribute, redact_with(secrets, value))
    error.args = tuple(_scrub_arg(secrets, arg) for arg in error.args)


def _scrub_arg(secrets: set[str], arg: Any) -> Any:
    if isinstance(arg, str):
        return redact_with(secrets, arg)
    shown = repr(arg)
    clean = redact_with(secrets, shown)
    return arg if clean == shown else clean


def options_secrets(*trees: Any) -> set[str]:
    """Every secret string in options trees (see the module's docstring)."""
    collector = _Collector(every_string=True)
    for tree in trees:
        collector.walk(tree, secret=False)
    return collector.found


def attribute_secrets(*instances: Any) -> set[str]:
    """The secrets among built storages' attributes: those under secret-looking
    names, URL passwords and secret parts of connection strings."""
    collector = _Collector(every_string=False)
    for instance in instances:
        try:
            attributes = dict(vars(instance))
        except TypeError:
            continue
        collector.walk(attributes, secret=False)
    return collector.found


_cache_lock = threading.Lock()
#: storage -> (what its secrets were computed from, the secrets)
_cache: weakref.WeakKeyDictionary[
    ConfiguredStorage, tuple[tuple[Any, ...], frozenset[str]]
]
_cache = weakref.WeakKeyDictionary()


def secrets_of(storage: ConfiguredStorage) -> frozenset[str]:
    """``storage``'s secrets, computed once for the options, the ``STORAGES``
    entries and the built storages it uses (again only when one of those is
    replaced, as ``override_settings(STORAGES=...)`` does)."""
    configs = cast("dict[str, dict[str, Any]]", getattr(settings, "STORAGES", {}))
    # A mirror's target too: an error of the storage may quote its client.
    targets = list(getattr(storage, "mirror_targets", {}).values())
    named = [storage.local_alias, storage.remote_alias, *(t.storage for t in targets)]
    aliases = [a for a in named if a in configs]
    built = [storage.__dict__.get(n) for n in ("_local_instance", "_remote_instance")]
    instances = [b for b in map(_built, aliases) if b] + [b for b in built if b]
    options = (
        storage.local_options,
        storage.remote_options,
        *(t.options for t in targets),
    )
    sources = (
        *options,
        *(configs[alias] for alias in aliases),
        *instances,
    )
    with _cache_lock:
        cached = _cache.get(storage)
    if cached is not None and _same(cached[0], sources):
        return cached[1]
    found = options_secrets(
        *options,
        *(configs[alias].get("OPTIONS", {}) for alias in aliases),
    ) | attribute_secrets(*instances)
    found -= {
        storage.key,
        storage.local_path,
        storage.remote_path,
        storage.local_alias,
        storage.remote_alias,
        storage.task_path,
        *(t.storage for t in targets),
        *(t.key for t in targets),
        REDACTED,
    }
    secrets = frozenset(s for s in found if len(s) >= MIN_SECRET_LENGTH)
    with _cache_lock:
        _cache[storage] = (sources, secrets)
    return secrets


def _built(alias: str) -> Any:
    # A storage that cannot be built has quoted nothing yet; its options are
    # walked all the same.
    try:
        return storages[alias]
    except Exception:
        return None


def _same(before: tuple[Any, ...], now: tuple[Any, ...]) -> bool:
    return len(before) == len(now) and all(
        a is b for a, b in zip(before, now, strict=True)
    )


@lru_cache(maxsize=256)
def _pattern(secrets: frozenset[str]) -> re.Pattern[str] | None:
    if not secrets:
        return None
    # Longest first, in a lookahead: every place any secret starts is found,
    # also inside or across another one, so that none leaves a piece behind. A
    # short one only as a word of its own: "pass" is a password, not "password".
    alternatives = "|".join(
        re.escape(s)
        if len(s) >= MIN_LENGTH
        else rf"(?<![^\W_]){re.escape(s)}(?![^\W_])"
        for s in sorted(secrets, key=len, reverse=True)
    )
    return re.compile(f"(?=({alternatives}))", re.DOTALL)


def redact_with(secrets: Iterable[str], text: str) -> str:
    """``text`` with each of ``secrets`` and every URL password and secret part
    of a connection string replaced by ``[redacted]``."""
    # A substring test per secret is cheap; the pattern then has only the few
    # that the text holds.
    pattern = _pattern(frozenset(s for s in secrets if s in text))
    if pattern is not None:
        spans: list[list[int]] = []
        for match in pattern.finditer(text):
            start, end = match.start(), match.start() + len(match.group(1))
            if spans and start <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        if spans:
            pieces, last = [], 0
            for start, end in spans:
                pieces += [text[last:start], REDACTED]
                last = end
            text = "".join([*pieces, text[last:]])
    text = URL_PASSWORD.sub(rf"\1{REDACTED}@", text)
    text = ASSIGNED_SECRET.sub(rf"\1{REDACTED}", text)
    return QUOTED_SECRET.sub(rf"\1{REDACTED}", text)


def redact(storage: ConfiguredStorage | None, text: str) -> str:
    """``text`` without ``storage``'s secrets, nor those of any other storage
    this process built (an error may quote another storage's client)."""
    secrets = set(known_secrets())
    if storage is not None:
        secrets |= secrets_of(storage)
    return redact_with(secrets, text)


def redact_options(options: Any, text: str) -> str:
    """``text`` without the secrets of an options tree (a ``STORAGES`` entry that
    could not be built)."""
    return redact_with(options_secrets(options) | known_secrets(), text)


#: Every storage this process built, those that loading migrations built included
#: (their options may hold a credential that a row kept from before): for
#: redaction only, never to find a storage by key (see queued_storage.registry).
_built_storages: weakref.WeakSet[ConfiguredStorage] = weakref.WeakSet()


def remember(storage: ConfiguredStorage) -> None:
    """Redact ``storage``'s secrets wherever this process quotes an error."""
    with _cache_lock:
        _built_storages.add(storage)


def known_secrets() -> frozenset[str]:
    """The secrets of every storage this process built (not building any)."""
    found: set[str] = set()
    with _cache_lock:
        built = list(_built_storages)
    for storage in built:
        try:
            found |= secrets_of(storage)
        except Exception:  # a storage that cannot be built has no attributes yet
            found |= options_secrets(storage.local_options, storage.remote_options)
    return frozenset(found)


def after_commit(
    using: str, func: Callable[..., Any], /, *args: Any, **kwargs: Any
) -> None:
    """Call ``func(*args, **kwargs)`` after ``using``'s transaction commits.

    A failure is logged here, redacted, and goes no further: Django would log a
    failing callback's error as it is, with its traceback, secrets included."""

    def callback() -> None:
        try:
            func(*args, **kwargs)
        except Exception as exc:
            logger.error(
                "after-commit work failed callback=%s error=%s: %s",
                getattr(func, "__qualname__", type(func).__name__),
                type(exc).__name__,
                redact(None, str(exc)),
            )

    callback.__qualname__ = getattr(func, "__qualname__", callback.__qualname__)
    transaction.on_commit(callback, using=using, robust=True)


_filtering = threading.local()


class RedactingFilter(logging.Filter):
    """Redacts warnings and errors (the lines that quote an error) with the
    secrets of every storage this process built. The package's lower levels
    quote no storage: keys, names, counters, a database's lock error."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Building a storage to learn its secrets may log in turn.
        if record.levelno < logging.WARNING or getattr(_filtering, "active", False):
            return True
        _filtering.active = True
        try:
            message = record.getMessage()
            secrets = known_secrets()
            clean = redact_with(secrets, message)
            if clean != message:
                record.msg, record.args = clean, ()
            if record.exc_info:
                trace = "".join(traceback.format_exception(*record.exc_info))
                clean = redact_with(secrets, trace)
                if clean != trace:
                    # Only then: error trackers read the exception itself.
                    record.exc_text, record.exc_info = clean.rstrip("\n"), None
        except Exception:
            record.msg, record.args = "log line withheld: redaction failed", ()
            record.exc_info = record.exc_text = None
        finally:
            _filtering.active = False
        return True


#: The package's logger, and Django's that ``Signal.send_robust()`` logs a
#: failing receiver's error with (its traceback included) to.
FILTERED_LOGGERS = ("queued_storage", "django.dispatch")


def install_log_filter() -> None:
    for name in FILTERED_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in target.filters):
            target.addFilter(RedactingFilter())


install_log_filter()


def error_text(storage: ConfiguredStorage | None, error: BaseException) -> str:
    """``Class: message`` of an error, without the storage's credentials."""
    return redact(storage, f"{type(error).__name__}: {error}")
