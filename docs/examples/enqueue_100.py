"""Enqueue 100 jobs from Python, let a `jobrunner worker` run them, and check every result.

In one terminal start a worker (it serves the queue "default"):

    jobrunner worker

In another, with the same environment (JOBRUNNER_HOME / JOBRUNNER_DATABASE_URL):

    python docs/examples/enqueue_100.py

The script only enqueues and reads: it never runs a job itself. Each job prints its number;
the script waits for all 100 outcomes (up to ENQUEUE_100_TIMEOUT seconds, default 600), checks
that each succeeded and printed the right number, prints a summary, and exits 0 only if all 100
did.
"""

from __future__ import annotations

import os
import sys
import time

from jobrunner import Job, JobRunner, RunHandle, as_completed

COUNT = 100
TIMEOUT = float(os.environ.get("ENQUEUE_100_TIMEOUT", "600"))
# A worker copies a run's last output lines just after it records the outcome.
LOGS_GRACE = 15.0


def echo_job(n: int) -> Job:
    return Job(name="echo-n", image="alpine", cmd=["sh", "-c", "echo $N"], env={"N": str(n)})


def main() -> int:
    started = time.monotonic()
    with JobRunner.from_env() as runner:
        # One transaction for the whole batch; idle workers are woken at once.
        handles = runner.enqueue_many(echo_job(n) for n in range(COUNT))
        expected = {handle.id: str(n) for n, handle in enumerate(handles)}
        print(f"enqueued {len(handles)} runs; waiting for a `jobrunner worker` to run them")

        finished: list[RunHandle] = []
        try:
            for handle in as_completed(handles, timeout=TIMEOUT):
                finished.append(handle)
                if len(finished) % 25 == 0:
                    print(f"  {len(finished)}/{COUNT} finished")
        except TimeoutError:
            print(
                f"only {len(finished)} of {COUNT} runs finished within {TIMEOUT:g}s: "
                "is `jobrunner worker` running with the same JOBRUNNER_HOME/DATABASE_URL?"
            )
            return 1

        problems = check(handles, expected)
        elapsed = time.monotonic() - started
        results = [handle.result() for handle in handles]
        slowest = max(result.duration_s or 0.0 for result in results)

    ok = COUNT - len(problems)
    print(f"{ok}/{COUNT} runs succeeded with the right output in {elapsed:.1f}s")
    print(f"slowest run: {slowest:.2f}s; attempts: {sum(r.attempts for r in results)}")
    for problem in problems[:10]:
        print(f"  {problem}")
    return 0 if not problems else 1


def check(handles: list[RunHandle], expected: dict[str, str]) -> list[str]:
    """What is wrong with each run (nothing, when all is well)."""
    deadline = time.monotonic() + LOGS_GRACE
    while True:
        problems: list[str] = []
        for handle in handles:
            result = handle.result()
            if not result.ok:
                problems.append(f"run {handle.id}: {result.outcome} ({result.reason})")
            elif (lines := handle.logs()) != [expected[handle.id]]:
                problems.append(f"run {handle.id}: printed {lines}, not {expected[handle.id]!r}")
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
