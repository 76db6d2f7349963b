"""jobrunner.wakeup: a notify wakes waiting workers through local sockets and PostgreSQL LISTEN."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from jobrunner.wakeup import Wakeup, notify, socket_dir

from .conftest import POSTGRES_ADMIN_URL, _require_postgres, fresh_postgres_database

REPO = Path(__file__).resolve().parents[1]
PG_URL = POSTGRES_ADMIN_URL  # postgresql://postgres@127.0.0.1:5432/test
PG_ENGINE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
WAKE_TIMEOUT = 10.0  # generous bound for a wake expected now
QUIET_TIMEOUT = 0.05  # how long "nobody notified" is waited for


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


async def _until(predicate: Callable[[], bool], timeout: float = WAKE_TIMEOUT) -> None:
    """Yield to the loop until ``predicate()`` holds (fails after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _socket_files(url: str, home: Path) -> list[Path]:
    directory = socket_dir(url, home)
    return sorted(directory.glob("*.sock")) if directory.exists() else []


async def test_notify_wakes_a_waiting_wakeup(url: str, home: Path) -> None:
    async with await Wakeup.open(database_url=url, home=home) as wakeup:
        waiting = asyncio.create_task(wakeup.wait(WAKE_TIMEOUT))
        await asyncio.sleep(0)  # let it start waiting
        assert not waiting.done()
        notify(database_url=url, home=home)
        assert await waiting is True


async def test_wait_times_out_when_nobody_notifies(url: str, home: Path) -> None:
    async with await Wakeup.open(database_url=url, home=home) as wakeup:
        started = time.monotonic()
        assert await wakeup.wait(QUIET_TIMEOUT) is False
        assert time.monotonic() - started >= QUIET_TIMEOUT * 0.9
        assert await wakeup.wait(0) is False


async def test_notifies_before_a_wait_collapse_into_one_wake(url: str, home: Path) -> None:
    async with await Wakeup.open(database_url=url, home=home) as wakeup:
        for _ in range(5):
            notify(database_url=url, home=home)
        assert await wakeup.wait(WAKE_TIMEOUT) is True
        assert await wakeup.wait(QUIET_TIMEOUT) is False
        # Still usable afterwards.
        notify(database_url=url, home=home)
        assert await wakeup.wait(WAKE_TIMEOUT) is True


async def test_every_wakeup_on_the_ledger_wakes_and_only_those(
    url: str, home: Path, tmp_path: Path
) -> None:
    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    async with (
        await Wakeup.open(database_url=url, home=home) as first,
        await Wakeup.open(database_url=url, home=home) as second,
        await Wakeup.open(database_url=other_url, home=home) as other,
    ):
        notify(database_url=url, home=home)
        assert await first.wait(WAKE_TIMEOUT) is True
        assert await second.wait(WAKE_TIMEOUT) is True
        assert await other.wait(QUIET_TIMEOUT) is False


def test_differently_spelled_urls_of_one_ledger_share_a_folder(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = socket_dir("postgresql+psycopg://postgres@127.0.0.1:5432/test", home)
    assert socket_dir("postgres://other:secret@127.0.0.1/test", home) == pg
    assert socket_dir("postgresql://postgres@127.0.0.1:5432/other", home) != pg
    monkeypatch.chdir(tmp_path)
    assert socket_dir("sqlite:///ledger.db", home) == socket_dir(
        f"sqlite:///{tmp_path / 'ledger.db'}", home
    )
    assert len(pg.name) == 16
    assert pg.parent == home / "wakeup"


async def test_socket_file_and_folders_are_private_and_removed_on_aclose(
    url: str, home: Path
) -> None:
    wakeup = await Wakeup.open(database_url=url, home=home)
    path = wakeup.socket_path
    assert path is not None
    assert _socket_files(url, home) == [path]
    assert path.name.startswith(f"{os.getpid()}-")
    for folder in (path.parent, path.parent.parent):
        assert folder.stat().st_mode & 0o777 == 0o700
    assert wakeup._sock is not None
    assert not os.get_inheritable(wakeup._sock.fileno())  # close-on-exec
    await wakeup.aclose()
    assert not path.exists()
    await wakeup.aclose()  # idempotent
    with pytest.raises(RuntimeError):
        await wakeup.wait(0)


async def test_notify_removes_a_stale_socket_and_still_wakes_the_live_one(
    url: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await Wakeup.open(database_url=url, home=home) as wakeup:
        stale = socket_dir(url, home) / "999999-deadbeef.sock"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        monkeypatch.chdir(stale.parent)  # a relative name: tmp_path may be too long for sun_path
        dead.bind(stale.name)
        dead.close()  # as if its process died: the file stays, nobody is bound
        assert stale.exists()
        notify(database_url=url, home=home)
        assert not stale.exists()
        assert await wakeup.wait(WAKE_TIMEOUT) is True
        assert _socket_files(url, home) == [wakeup.socket_path]


async def test_notify_from_another_process_wakes_the_waiter(url: str, home: Path) -> None:
    async with await Wakeup.open(database_url=url, home=home) as wakeup:
        waiting = asyncio.create_task(wakeup.wait(WAKE_TIMEOUT))
        code = (
            "from pathlib import Path; from jobrunner.wakeup import notify; "
            f"notify(database_url={url!r}, home=Path({str(home)!r}))"
        )
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=REPO)
        assert await asyncio.wait_for(process.wait(), WAKE_TIMEOUT) == 0
        assert await waiting is True


def test_notify_with_nobody_listening_never_raises(url: str, home: Path) -> None:
    for _ in range(1000):  # the socket folder does not exist
        notify(database_url=url, home=home)
    socket_dir(url, home).mkdir(parents=True)
    for _ in range(1000):  # it exists but is empty
        notify(database_url=url, home=home)
    notify(database_url="not a url", home=home)


async def test_long_home_paths_still_work(url: str, tmp_path: Path) -> None:
    home = tmp_path / ("h" * 120)
    async with await Wakeup.open(database_url=url, home=home) as wakeup:
        if wakeup.socket_path is None:
            pytest.skip("no /proc/self/fd here: a socket path this long cannot be bound")
        notify(database_url=url, home=home)
        assert await wakeup.wait(WAKE_TIMEOUT) is True
    assert _socket_files(url, home) == []


async def test_a_cancelled_wait_leaves_the_wakeup_usable(url: str, home: Path) -> None:
    async with await Wakeup.open(database_url=url, home=home) as wakeup:
        waiting = asyncio.create_task(wakeup.wait(WAKE_TIMEOUT))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        notify(database_url=url, home=home)
        assert await wakeup.wait(WAKE_TIMEOUT) is True


async def test_aclose_releases_a_pending_wait(url: str, home: Path) -> None:
    wakeup = await Wakeup.open(database_url=url, home=home)
    waiting = asyncio.create_task(wakeup.wait(WAKE_TIMEOUT))
    await asyncio.sleep(0)
    await wakeup.aclose()
    assert await waiting is False


# -- PostgreSQL ------------------------------------------------------------------------------


@pytest.mark.postgres
async def test_pg_notify_in_a_transaction_wakes_a_wakeup_on_another_home(tmp_path: Path) -> None:
    _require_postgres()
    listener_home = tmp_path / "worker-host"
    notifier_home = tmp_path / "enqueuer-host"  # different: the socket cannot be what wakes it
    engine = sa.create_engine(PG_ENGINE_URL)
    try:
        async with await Wakeup.open(database_url=PG_URL, home=listener_home) as wakeup:
            assert wakeup.listening_on_postgres
            await wakeup.wait(0)  # forget anything that arrived before
            with engine.begin() as connection:
                connection.execute(sa.text("SELECT 1"))
                notify(database_url=PG_ENGINE_URL, home=notifier_home, connection=connection)
            assert await wakeup.wait(WAKE_TIMEOUT) is True
    finally:
        engine.dispose()


@pytest.mark.postgres
async def test_pg_notify_failure_leaves_the_callers_transaction_committable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _require_postgres()
    with fresh_postgres_database() as url:
        engine = sa.create_engine(url)
        try:
            with engine.begin() as connection:
                # A pg_notify that fails, found first on the search path.
                connection.exec_driver_sql("CREATE SCHEMA broken")
                connection.exec_driver_sql(
                    "CREATE FUNCTION broken.pg_notify(text, text) RETURNS void "
                    "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'no notify'; END $$"
                )
                connection.exec_driver_sql("CREATE TABLE work (id int)")
            with (
                caplog.at_level(logging.DEBUG, logger="jobrunner.wakeup"),
                engine.begin() as connection,
            ):
                connection.exec_driver_sql("SET LOCAL search_path = broken, pg_catalog, public")
                connection.exec_driver_sql("INSERT INTO work VALUES (1)")
                notify(database_url=url, home=tmp_path / "home", connection=connection)
                connection.exec_driver_sql("INSERT INTO work VALUES (2)")
            assert "pg_notify failed" in caplog.text
            with engine.connect() as connection:
                rows = connection.exec_driver_sql("SELECT id FROM work ORDER BY id").all()
            assert [row.id for row in rows] == [1, 2]
        finally:
            engine.dispose()


@pytest.mark.postgres
async def test_a_dropped_listen_connection_falls_back_to_sockets(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _require_postgres()
    async with await Wakeup.open(database_url=PG_URL, home=home) as wakeup:
        assert wakeup.listening_on_postgres and wakeup._listener is not None
        backend_pid = wakeup._listener.info.backend_pid
        engine = sa.create_engine(PG_ENGINE_URL)
        try:
            with engine.connect() as connection:
                connection.execute(
                    sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": backend_pid}
                )
        finally:
            engine.dispose()
        with caplog.at_level(logging.WARNING, logger="jobrunner.wakeup"):
            await _until(lambda: not wakeup.listening_on_postgres)
        assert "no PostgreSQL LISTEN" in caplog.text
        await wakeup.wait(0)  # a wake may have raced the termination
        assert await wakeup.wait(QUIET_TIMEOUT) is False  # honours its timeout, never raises
        notify(database_url=PG_URL, home=home)
        assert await wakeup.wait(WAKE_TIMEOUT) is True


async def test_an_unreachable_postgres_leaves_a_socket_only_wakeup(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://postgres@127.0.0.1:{port}/nothing"
    with caplog.at_level(logging.WARNING, logger="jobrunner.wakeup"):
        wakeup = await Wakeup.open(database_url=url, home=home)
    async with wakeup:
        assert not wakeup.listening_on_postgres
        assert caplog.text.count("no PostgreSQL LISTEN") == 1
        assert await wakeup.wait(QUIET_TIMEOUT) is False
        notify(database_url=url, home=home)
        assert await wakeup.wait(WAKE_TIMEOUT) is True
