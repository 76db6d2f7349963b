"""Text a job carries must be encodable as UTF-8: the Machines API and the ledger take JSON.

Python strings can hold lone surrogates (``"\\udcff"``): ``os.environ``, ``sys.argv`` and file
names decode bytes that are not UTF-8 that way ("surrogateescape"). Such a string cannot be sent
as JSON, so a job holding one would be recorded and then fail when its machine is created. Every
string of a job is checked with :func:`utf8_problem` where it enters, instead (the ``Utf8Str``
fields of :mod:`jobrunner.spec.problems`, secrets' values, ``--env`` flags).
"""

from __future__ import annotations

__all__ = ["UTF8_FIX", "is_utf8", "printable", "utf8_problem"]

UTF8_FIX = "use UTF-8 text only (base64-encode binary data and decode it in the job)"


def utf8_problem(text: str) -> str | None:
    """What is wrong when ``text`` cannot be encoded as UTF-8 (a message continuing "KEY: "),
    else None. The message shows where and which character, so never pass it a secret."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        origin = ""
        if 0xDC80 <= code <= 0xDCFF:  # how surrogateescape carries a byte that is not UTF-8
            origin = f": the byte 0x{code - 0xDC00:02x}, which is not valid UTF-8"
        return (
            f"is not valid UTF-8 text: character {exc.start + 1} is a lone surrogate "
            f"(U+{code:04X}{origin})"
        )
    return None


def is_utf8(text: str) -> bool:
    """Whether ``text`` can be encoded as UTF-8 (and so sent as JSON)."""
    return utf8_problem(text) is None


def printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode written as a backslash escape (``\\udcff``)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
