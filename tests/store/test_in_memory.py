"""An in-memory ledger (``sqlite://``) is one connection shared by all threads of the process:
reads and writes from many threads (as ``SqlLedger``'s do) must not nest transactions."""

from __future__ import annotations

import threading

from jobrunner.store import Store


def test_threads_read_and_write_an_in_memory_ledger_at_once() -> None:
    store = Store("sqlite://")
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(60):
                run = store.create_run(
                    job_name="mem",
                    job_snapshot={"name": "mem"},
                    backend="local",
                    app=None,
                    region=None,
                    max_attempts=1,
                    timeout_s=None,
                )
                store.get_run(run.id)
                store.list_runs(job="mem", limit=5)
        except BaseException as exc:  # reported below, with the thread's own error
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not failures, failures[0]
        assert len(store.list_runs(job="mem", limit=1_000)) == 8 * 60
    finally:
        store.close()
