"""Name rules: what a file name is, the one place that says so."""

from __future__ import annotations

import re
import unicodedata

from django.core.exceptions import SuspiciousFileOperation

__all__ = [
    "BAD_CHARACTERS",
    "BIDI_CONTROLS",
    "DEVICE_NAMES",
    "MAX_NAME_LENGTH",
    "SURROGATES",
    "canonical_directory",
    "canonical_name",
    "check_name",
    "check_portable",
    "clean_name",
    "misspelling",
    "portable_name",
]

#: Longest file name the ledger stores.
MAX_NAME_LENGTH = 1024

#: Unicode bidirectional controls: they make a name read differently than it is.
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
#: Names Windows reserves for devices, whatever the extension.
DEVICE_NAMES = frozenset(
    ["con", "prn", "aux", "nul"]
    + [f"com{n}" for n in range(1, 10)]
    + [f"lpt{n}" for n in range(1, 10)]
)


#: The characters :func:`check_name` rejects: C0 and C1 controls (NUL, DEL and
#: NEL among them), the Unicode line and paragraph separators, bidi controls.
BAD_CHARACTERS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029" + "".join(sorted(BIDI_CONTROLS)) + "]"
)

#: Halves of UTF-16 pairs: a str holding one alone is not text any encoding takes.
SURROGATES = re.compile("[\ud800-\udfff]")


def check_name(name: str) -> None:
    """Reject names no storage should see, before anything is written."""
    if not isinstance(name, str):
        raise ValueError(f"A file name must be a string, not {type(name).__name__}.")
    if not name:
        raise ValueError("A file name must not be empty.")
    if len(name) > MAX_NAME_LENGTH:
        raise SuspiciousFileOperation(
            f"File name is {len(name)} characters long; the ledger stores at most "
            f"{MAX_NAME_LENGTH}."
        )
    if SURROGATES.search(name):
        raise SuspiciousFileOperation(
            f"File name {name!r} contains a lone surrogate, which is not Unicode text."
        )
    if BAD_CHARACTERS.search(name):
        if any(char in BIDI_CONTROLS for char in name):
            raise SuspiciousFileOperation(
                f"File name {name!r} contains a bidirectional text control character."
            )
        raise SuspiciousFileOperation(
            f"File name {name!r} contains a NUL, a control character or a line "
            "separator."
        )


def portable_name(name: str) -> str:
    """``name`` with what :func:`clean_name` rejects mended, for uploaded names."""
    name = unicodedata.normalize("NFC", name.replace("\\", "/"))
    name = SURROGATES.sub("", BAD_CHARACTERS.sub("", name))
    parts = []
    for part in name.split("/"):
        part = part.rstrip(" .")
        if not part or part == "..":
            continue
        if part.split(".")[0].lower() in DEVICE_NAMES:
            part = f"_{part}"
        parts.append(part)
    return "/".join(parts)


def canonical_name(name: str) -> str:
    """The one spelling of ``name`` that every entry point uses before it looks at
    the ledger or a storage: checked, ``\\`` as ``/``, Unicode NFC. A spelling
    with an empty, ``.`` or ``..`` component, or an absolute one, is refused
    rather than resolved: it could reach another file's row or copies."""
    check_name(name)
    canonical = unicodedata.normalize("NFC", name.replace("\\", "/"))
    if canonical.startswith("/"):
        raise SuspiciousFileOperation(f"File name {name!r} is an absolute path.")
    if any(part in ("", ".", "..") for part in canonical.split("/")):
        raise SuspiciousFileOperation(
            f"File name {name!r} has an empty, '.' or '..' path component."
        )
    if len(canonical) > MAX_NAME_LENGTH:
        raise SuspiciousFileOperation(
            f"File name is {len(canonical)} characters long; the ledger stores at "
            f"most {MAX_NAME_LENGTH}."
        )
    return canonical


def misspelling(name: str) -> str | None:
    """Why a name read from the ledger must not be acted on, or None: a spelling
    that a storage may read as another file's name (``./x``, ``a/../x``,
    ``d\\x``, NFD), as versions that did not canonicalise wrote rows for. Its
    files are that other name's; removing or uploading them would reach them."""
    spelled = name.replace("\\", "/")
    if not spelled.isascii():
        spelled = unicodedata.normalize("NFC", spelled)
    # An empty, "." or ".." part (a leading "/" is an empty one), found without a
    # loop over the parts: this runs for every row a worker transfers.
    wrapped = f"/{spelled}/"
    if "//" in wrapped or "/./" in wrapped or "/../" in wrapped:
        return (
            f"the ledger's name {name!r} is absolute or has an empty, '.' or '..' "
            "path component: a storage may read it as another file's name, so "
            "nothing was uploaded or removed"
        )
    if spelled != name:
        return (
            f"the ledger's name {name!a} is another spelling of {spelled!a}: a "
            "storage may read it as that file's name, so nothing was uploaded or "
            "removed"
        )
    return None


def canonical_directory(path: str) -> str:
    """``listdir``'s directory in its canonical spelling: ``""`` for the top, and
    one trailing slash allowed."""
    if path == "":
        return ""
    if isinstance(path, str) and path[-1:] in ("/", "\\") and path[:-1]:
        path = path[:-1]
    return canonical_name(path)


def check_portable(name: str) -> None:
    """Reject a canonical name that some remote would store under another name
    (Windows drops trailing dots and spaces, and reserves device names)."""
    for part in name.split("/"):
        if part != part.rstrip(" ."):
            raise SuspiciousFileOperation(
                f"File name {name!r} has a component ending in a dot or a space, "
                "which Windows and some remotes drop."
            )
        if part.split(".")[0].lower() in DEVICE_NAMES:
            raise SuspiciousFileOperation(
                f"File name {name!r} uses {part.split('.')[0]!r}, a name Windows "
                "reserves for a device."
            )


def clean_name(name: str) -> str:
    """The name a new save stores: the canonical spelling (so one file cannot have
    two ledger rows), portable to every remote."""
    canonical = canonical_name(name)
    check_portable(canonical)
    return canonical
