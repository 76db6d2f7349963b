"""Reading a job file's TOML without letting its shape exhaust memory or time.

``tomllib`` is fine for job files people write, but some shapes cost it far more than their size:
a 200 KB file holding one dotted key ``a.a.a...= 1`` made it grow to 23.5 GB (quadratic in the
key's parts), deeply nested arrays or inline tables exhaust the recursion limit, and an integer
of 5,000 digits trips Python's int-string conversion limit. So, before parsing:

* a job file larger than :data:`MAX_JOB_FILE_BYTES` is refused without reading more than that;
* a quick scan (regular expressions, linear in the size) refuses keys of more than
  :data:`MAX_KEY_PARTS` dotted parts, arrays and inline tables nested more than
  :data:`MAX_NESTING` deep, and numbers longer than :data:`MAX_NUMBER_CHARS` characters.

Each refusal is a :class:`Problem` naming the file, the line, the limit and the fix, so the CLI
exits 65 as for any invalid job file. The scan tracks strings and comments, so text inside them
never counts; it is only a guard: tomllib still decides what is valid TOML.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from jobrunner.spec.problems import MISSING, JobNotFound, JobSpecError, Problem

__all__ = [
    "MAX_JOB_FILE_BYTES",
    "MAX_KEY_PARTS",
    "MAX_NESTING",
    "MAX_NUMBER_CHARS",
    "parse_toml",
    "read_job_text",
    "shape_problem",
]

MAX_JOB_FILE_BYTES = 1024 * 1024  # 1 MiB: job files are small; data belongs in `source` files
MAX_KEY_PARTS = 32  # a.b.c has 3 parts
MAX_NESTING = 32  # arrays and inline tables inside each other
MAX_NUMBER_CHARS = 100  # digits (and '_') in one number

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
# The tokens that matter to the scan; anything else (bare keys, letters, spaces) is skipped.
_TOKENS = re.compile(
    r'''(?P<string>"""(?:\\.|[^\\])*?"""|\'\'\'.*?\'\'\'|"(?:\\.|[^"\\\n])*"|'[^'\n]*')
    |(?P<comment>\#[^\n]*)
    |(?P<nl>\n)
    |(?P<open>[\[{])
    |(?P<close>[\]}])
    |(?P<eq>=)
    |(?P<comma>,)
    |(?P<dot>\.)
    |(?P<number>[0-9_]{'''
    + str(MAX_NUMBER_CHARS + 1)
    + ",})",
    re.VERBOSE | re.DOTALL,
)


def read_job_text(path: Path, label: str) -> str:
    """The job file's text (UTF-8), refused beyond :data:`MAX_JOB_FILE_BYTES`."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_JOB_FILE_BYTES + 1)
    except OSError as exc:
        raise JobNotFound(
            [Problem(label, "", MISSING, f"cannot read the job file: {exc.strerror}", "check it")]
        ) from None
    if len(data) > MAX_JOB_FILE_BYTES:
        raise JobSpecError(
            [
                Problem(
                    label,
                    "",
                    MISSING,
                    f"the job file is larger than {MAX_JOB_FILE_BYTES // 1024} KiB",
                    "keep job files small: put data in a file named by [[files]] source",
                )
            ]
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobSpecError(
            [Problem(label, "", MISSING, f"not UTF-8 text ({exc.reason})", "save it as UTF-8")]
        ) from None


def shape_problem(text: str, label: str | None) -> Problem | None:
    """The first shape in ``text`` that would make parsing it too costly, else None."""
    scan = _Scan()
    for match in _TOKENS.finditer(text):
        limit = scan.step(match.lastgroup or "", match.group())
        if limit is not None:
            message, fix = _LIMITS[limit]
            return _problem(text, match.start(), label, message, fix)
    return None


_LIMITS = {
    "nesting": (
        f"arrays and inline tables are nested more than {MAX_NESTING} deep",
        "flatten the value",
    ),
    "key": (
        f"a dotted key has more than {MAX_KEY_PARTS} parts",
        "use fewer, shorter keys (a.b.c is 3 parts)",
    ),
    "number": (
        f"a number is longer than {MAX_NUMBER_CHARS} characters",
        "write a shorter number, or a string",
    ),
}


class _Scan:
    """Where the scan is: inside which arrays/inline tables, and reading a key or a value."""

    def __init__(self) -> None:
        self.stack: list[str] = []  # "[" (array) or "{" (inline table) we are inside
        self.in_key = True  # reading a key (or a [table] header), not a value
        self.in_header = False
        self.parts = 1

    def step(self, kind: str, token: str) -> str | None:
        """Take one token; the name of the limit it breaks, if any."""
        if kind == "nl" and not self.stack:
            self.in_key, self.in_header, self.parts = True, False, 1
        elif kind == "open":
            return self._open(token)
        elif kind == "close":
            if self.stack:
                self.stack.pop()
                self.in_key = False
        elif kind == "eq":
            self.in_key = False
        elif kind == "comma" and self.stack and self.stack[-1] == "{":
            self.in_key, self.parts = True, 1
        elif kind == "dot" and (self.in_key or self.in_header):
            self.parts += 1
            if self.parts > MAX_KEY_PARTS:
                return "key"
        elif kind == "number":
            return "number"
        return None  # strings and comments are skipped whole

    def _open(self, token: str) -> str | None:
        if self.in_key and not self.stack and token == "[":
            # A [table] or [[array of tables]] header: its closing bracket is not a container's.
            self.in_header, self.parts = True, 1
            return None
        self.stack.append(token)
        if len(self.stack) > MAX_NESTING:
            return "nesting"
        self.in_key, self.parts = token == "{", 1
        return None


def parse_toml(text: str, label: str) -> dict[str, Any]:
    """``text`` parsed, after :func:`shape_problem`; every failure is a :class:`JobSpecError`."""
    problem = shape_problem(text, label)
    if problem is not None:
        raise JobSpecError([problem])
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        line = column = None
        position = _TOML_POSITION.search(message)
        if position is not None:
            line, column = int(position.group(1)), int(position.group(2))
            message = message[: position.start()]
        fix = "fix the TOML syntax there" if line else "fix the TOML syntax"
        problem = Problem(label, "", MISSING, f"invalid TOML: {message}", fix, line, column)
        raise JobSpecError([problem]) from None
    except (ValueError, RecursionError, MemoryError) as exc:
        # What the scan did not foresee (tomllib raises ValueError for an integer beyond
        # Python's conversion limit): still a problem with the file, never an internal error.
        reason = "too deeply nested" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise JobSpecError(
            [Problem(label, "", MISSING, f"cannot parse the TOML: {reason}", "simplify the file")]
        ) from None


def _problem(text: str, offset: int, label: str | None, message: str, fix: str) -> Problem:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return Problem(label, "", MISSING, f"too costly to read: {message}", fix, line, column)
