"""Inserting thousands of rows in a few statements, below SQLAlchemy's per-row work.

A scheduler burst (10,000 schedules due at one minute) inserts 10,000 runs, transitions and
fire rows. Through SQLAlchemy's executemany most of that time is spent per row and per value
in Python (parameter dictionaries, compiled-statement bookkeeping), not in the database.
``BulkInsert`` converts each value with the bind processor SQLAlchemy itself would use for the
column (so what is stored is byte for byte what the ORM would store) and sends one multi-row
``INSERT`` per chunk (on PostgreSQL: one array per column, unnested) through the DBAPI cursor of
the SQLAlchemy connection, inside its transaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

__all__ = ["BulkInsert"]

# Parameters per statement: SQLite allows 32,766 (since 3.32), PostgreSQL 65,535.
MAX_PARAMS = 30_000
MAX_ROWS = 1_000


class BulkInsert:
    """A multi-row INSERT of fixed ``columns`` into ``table``, for one dialect.

    ``on_conflict`` names a unique key: rows that collide with it are left out (``ON CONFLICT
    DO NOTHING``, on SQLite and PostgreSQL alike). ``returning`` columns come back raw, as the
    driver gives them (compare them with ``convert_many``-ed values, which are in the same form).
    """

    def __init__(
        self,
        table: sa.Table,
        columns: Sequence[str],
        dialect: Dialect,
        *,
        on_conflict: Sequence[str] = (),
        returning: Sequence[str] = (),
    ) -> None:
        self.columns = tuple(columns)
        self._processors: list[Callable[[Any], Any] | None] = [
            table.c[name].type._cached_bind_processor(dialect) for name in self.columns
        ]
        quote = dialect.identifier_preparer.quote
        self._marker = "?" if dialect.paramstyle == "qmark" else "%s"
        self._head = (
            f"INSERT INTO {dialect.identifier_preparer.format_table(table)} "
            f"({', '.join(quote(c) for c in self.columns)}) VALUES "
        )
        tail = ""
        if on_conflict:
            tail += f" ON CONFLICT ({', '.join(quote(c) for c in on_conflict)}) DO NOTHING"
        if returning:
            tail += f" RETURNING {', '.join(quote(c) for c in returning)}"
        self._tail = tail
        self._returning = bool(returning)
        self._sql: dict[int, str] = {}
        self._by_column = dialect.name == "postgresql"
        if self._by_column:
            # JSON as text, serialised when the row is converted (ahead of the tick, for
            # prepared fires) rather than by psycopg while the statement is being sent.
            for position, name in enumerate(self.columns):
                if isinstance(table.c[name].type, sa.JSON):
                    self._processors[position] = _json_text
        if self._by_column:
            # One array per column, unnested server-side: a short statement psycopg caches,
            # where thousands of placeholders would be re-parsed by psycopg on every call.
            # A column with one value for the whole chunk (a burst's state, queue, moment...)
            # is sent once as a scalar instead: psycopg dumps array elements in Python.
            self._types = [
                (
                    table.c[name].type.compile(dialect=dialect),
                    isinstance(table.c[name].type, sa.JSON),
                )
                for name in self.columns
            ]
            self._pg_sql: dict[tuple[bool, ...], str] = {}
            self.chunk = MAX_ROWS * 10
        else:
            self.chunk = max(1, min(MAX_ROWS, MAX_PARAMS // len(self.columns)))

    def _cast(self, position: int, array: bool) -> str:
        sql_type, is_json = self._types[position]
        suffix = "[]" if array else ""
        if is_json:  # sent as text (see _json_text)
            return f"CAST(CAST(%b AS TEXT{suffix}) AS {sql_type}{suffix})"
        return f"CAST(%b AS {sql_type}{suffix})"

    def _unnest_statement(self, constant: tuple[bool, ...]) -> str:
        sql = self._pg_sql.get(constant)
        if sql is None:
            varying = [i for i, same in enumerate(constant) if not same]
            select = ", ".join(
                self._cast(i, array=False) if same else f"u.c{i}" for i, same in enumerate(constant)
            )
            arrays = ", ".join(self._cast(i, array=True) for i in varying)
            names = ", ".join(f"c{i}" for i in varying)
            sql = self._pg_sql[constant] = (
                self._head.replace(" VALUES ", " ")
                + f"SELECT {select} FROM unnest({arrays}) AS u({names})"
                + self._tail
            )
        return sql

    def _unnest_params(self, chunk: Sequence[Sequence[Any]]) -> tuple[str, list[Any]]:
        columns = [list(column) for column in zip(*chunk, strict=True)]
        constant = [all(v == column[0] for v in column) for column in columns]
        constant[0] = False  # unnest needs at least one array (the rows' count)
        scalars = [column[0] for column, same in zip(columns, constant, strict=True) if same]
        arrays = [column for column, same in zip(columns, constant, strict=True) if not same]
        return self._unnest_statement(tuple(constant)), scalars + arrays

    def convert_many(self, rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
        """``rows``' values in column order, as the driver receives them, converting each
        distinct time only once (a burst's rows share a few: the tick, the moment of
        recording)."""
        memo: dict[tuple[int, datetime], Any] = {}
        out: list[list[Any]] = []
        for row in rows:
            values: list[Any] = []
            for position, (name, process) in enumerate(
                zip(self.columns, self._processors, strict=True)
            ):
                value = row[name]
                if process is None or value is None:
                    values.append(value)
                elif isinstance(value, datetime):
                    key = (position, value)
                    if key not in memo:
                        memo[key] = process(value)
                    values.append(memo[key])
                else:
                    values.append(process(value))
            out.append(values)
        return out

    def stamp(self, rows: Sequence[list[Any]], values: dict[str, Any]) -> None:
        """Set ``values`` (column -> value) in ``convert_many``-ed ``rows``, in place."""
        for name, value in values.items():
            position = self.columns.index(name)
            process = self._processors[position]
            converted = value if process is None or value is None else process(value)
            for row in rows:
                row[position] = converted

    def execute(self, db: sa.Connection, rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
        """Insert ``convert_many``-ed rows; the ``returning`` values of the rows inserted."""
        returned: list[tuple[Any, ...]] = []
        cursor = db.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            for start in range(0, len(rows), self.chunk):
                chunk = rows[start : start + self.chunk]
                if self._by_column:
                    # binary (%b): no quoting of text by regular expressions either
                    cursor.execute(*self._unnest_params(chunk))
                else:
                    cursor.execute(self._statement(len(chunk)), [v for row in chunk for v in row])
                if self._returning:
                    returned.extend(tuple(r) for r in cursor.fetchall())
        finally:
            cursor.close()
        return returned

    def _statement(self, count: int) -> str:
        sql = self._sql.get(count)
        if sql is None:
            one = f"({', '.join([self._marker] * len(self.columns))})"
            sql = self._sql[count] = self._head + ", ".join([one] * count) + self._tail
        return sql


def _json_text(value: Any) -> str:
    return json.dumps(value)
