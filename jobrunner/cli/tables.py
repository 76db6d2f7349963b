"""Plain tables and styles: complete cells, no trailing spaces, escape codes only for a terminal.

Tables are never cut to the terminal's (or a pipe's assumed 80 columns') width: a script reading
``jobrunner jobs list | ...`` gets every character of every cell. Styles (bold headers, coloured
states) are added only when the stream is a terminal and ``NO_COLOR`` is not set; otherwise the
output holds no escape code at all.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TextIO

__all__ = ["Cell", "color_enabled", "format_table", "paint", "write_table"]

_CODES = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "magenta": "35",
    "cyan": "36",
}

# A cell: its text, or (text, style) where style is space-separated names from _CODES.
Cell = str | tuple[str, str | None]


def color_enabled(stream: TextIO | None = None) -> bool:
    """Whether escape codes may be written to ``stream`` (stdout by default)."""
    target = sys.stdout if stream is None else stream
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    try:
        return target.isatty()
    except (AttributeError, ValueError):
        return False


def paint(text: str, style: str | None, *, color: bool) -> str:
    if not color or not style or not text:
        return text
    codes = ";".join(_CODES[name] for name in style.split() if name in _CODES)
    return f"\x1b[{codes}m{text}\x1b[0m" if codes else text


def _split(cell: Cell) -> tuple[str, str | None]:
    return cell if isinstance(cell, tuple) else (cell, None)


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    color: bool = False,
    right: Sequence[int] = (),
) -> str:
    """Columns separated by two spaces, each as wide as its widest cell; lines end without
    padding. ``right`` lists the columns aligned to the right (numbers)."""
    plain = [[_split(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in plain:
        for i, (text, _) in enumerate(row):
            widths[i] = max(widths[i], len(text))
    lines: list[str] = []

    def line(cells: Sequence[tuple[str, str | None]]) -> str:
        parts = []
        for i, (text, style) in enumerate(cells):
            pad = " " * (widths[i] - len(text))
            shown = paint(text, style, color=color)
            parts.append(pad + shown if i in right else shown + pad)
        return "  ".join(parts).rstrip()

    lines.append(line([(h, "bold") for h in headers]))
    lines.extend(line(row) for row in plain)
    return "\n".join(lines) + "\n"


def write_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    stream: TextIO | None = None,
    right: Sequence[int] = (),
) -> None:
    target = sys.stdout if stream is None else stream
    target.write(format_table(headers, rows, color=color_enabled(target), right=right))
    target.flush()
