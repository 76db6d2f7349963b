"""The state directory's database: apps, machines, events and log lines in one SQLite file.

SQLite in WAL mode with ``synchronous=NORMAL``: each write is a small row, cheap enough to do on
the event loop, and a crash of the server loses at most the last moments (a power loss could
lose a little more; the local backend is a development tool, not a datacentre). Machines are one
JSON document each; events and log lines are rows so they can grow without rewriting the machine.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from jobrunner.local.fleet.records import AppRecord, EventRecord, MachineRecord
from jobrunner.machines.models import MachineEvent

__all__ = ["LogRow", "StateDatabase"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS apps (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS machines (id TEXT PRIMARY KEY, app TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    machine_id TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (machine_id, seq)
);
CREATE TABLE IF NOT EXISTS logs (
    token INTEGER PRIMARY KEY, app TEXT NOT NULL, instance TEXT NOT NULL, region TEXT NOT NULL,
    level TEXT NOT NULL, message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_instance ON logs (app, instance, token);
CREATE TABLE IF NOT EXISTS volumes (id TEXT PRIMARY KEY, app TEXT NOT NULL, data TEXT NOT NULL);
"""

# (token, app, instance, region, level, message); token is the entry's nanosecond timestamp.
LogRow = tuple[int, str, str, str, str, str]


class StateDatabase:
    """All reads and writes of the database. Used from the server's event loop thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # autocommit (batches use BEGIN); built in one thread, used from the loop thread only.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise RuntimeError(
                f"{path} was written by a newer jobrunner (schema {row[0]}); upgrade jobrunner "
                "or use another --state-dir"
            )

    def close(self) -> None:
        self._db.close()

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Several writes in one transaction (one commit instead of one each)."""
        return self._transaction()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # apps
    def load_apps(self) -> list[AppRecord]:
        rows = self._db.execute("SELECT data FROM apps ORDER BY name").fetchall()
        return [AppRecord.from_json(json.loads(data)) for (data,) in rows]

    def save_app(self, app: AppRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO apps VALUES (?, ?)", (app.name, json.dumps(app.to_json()))
        )

    def delete_app(self, name: str) -> None:
        self._db.execute("DELETE FROM apps WHERE name = ?", (name,))

    # machines and events
    def load_machines(self) -> list[MachineRecord]:
        events: dict[str, list[EventRecord]] = {}
        for machine_id, seq, data in self._db.execute(
            "SELECT machine_id, seq, data FROM events ORDER BY machine_id, seq DESC"
        ):
            event = MachineEvent.model_validate(json.loads(data))
            events.setdefault(machine_id, []).append(EventRecord(event=event, seq=seq))
        machines = []
        for machine_id, data in self._db.execute("SELECT id, data FROM machines"):
            machines.append(MachineRecord.from_json(json.loads(data), events.get(machine_id, [])))
        return machines

    def save_machine(self, machine: MachineRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO machines VALUES (?, ?, ?)",
            (machine.id, machine.app, json.dumps(machine.to_json())),
        )

    def add_event(self, machine_id: str, record: EventRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO events VALUES (?, ?, ?)",
            (machine_id, record.seq, json.dumps(record.to_api())),
        )

    def drop_events_before(self, machine_id: str, seq: int) -> None:
        self._db.execute("DELETE FROM events WHERE machine_id = ? AND seq < ?", (machine_id, seq))

    def delete_machine(self, machine_id: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM events WHERE machine_id = ?", (machine_id,))
            self._db.execute("DELETE FROM logs WHERE instance = ?", (machine_id,))
            self._db.execute("DELETE FROM machines WHERE id = ?", (machine_id,))

    # volumes (one JSON document each; see volumes.py)
    def load_volumes(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT data FROM volumes ORDER BY id").fetchall()
        return [json.loads(data) for (data,) in rows]

    def save_volume(self, volume_id: str, app: str, data: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO volumes VALUES (?, ?, ?)", (volume_id, app, json.dumps(data))
        )

    def delete_volume(self, volume_id: str) -> None:
        self._db.execute("DELETE FROM volumes WHERE id = ?", (volume_id,))

    # logs
    def add_logs(self, rows: Iterable[LogRow], shim_seq: int | None = None) -> None:
        """Insert log lines; ``shim_seq``: the shim record they cover, in the same transaction,
        so a restarted server never asks the shim for lines it already has."""
        with self._transaction():
            self._db.executemany("INSERT INTO logs VALUES (?, ?, ?, ?, ?, ?)", rows)
            if shim_seq is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('shim_seq', ?)", (str(shim_seq),)
                )

    def shim_seq(self) -> int:
        """The last shim record stored with log lines (0: none)."""
        row = self._db.execute("SELECT value FROM meta WHERE key='shim_seq'").fetchone()
        return int(row[0]) if row else 0

    def last_log_token(self) -> int:
        row = self._db.execute("SELECT MAX(token) FROM logs").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def query_logs(
        self,
        app: str,
        *,
        instance: str | None,
        region: str | None,
        after: int | None,
        limit: int,
    ) -> list[LogRow]:
        """Entries strictly after ``after`` (oldest first), or the newest ``limit`` without it."""
        where = ["app = ?"]
        params: list[Any] = [app]
        if instance:
            where.append("instance = ?")
            params.append(instance)
        if region:
            where.append("region = ?")
            params.append(region)
        if after is not None:
            where.append("token > ?")
            params.append(after)
        order = "ASC" if after is not None else "DESC"
        sql = (
            "SELECT token, app, instance, region, level, message FROM logs WHERE "
            + " AND ".join(where)
            + f" ORDER BY token {order} LIMIT ?"
        )
        rows: list[LogRow] = self._db.execute(sql, [*params, limit]).fetchall()
        return rows if after is not None else rows[::-1]

    def delete_logs_before(self, token: int) -> None:
        self._db.execute("DELETE FROM logs WHERE token < ?", (token,))
