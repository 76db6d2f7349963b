"""The chaos harness (bench/chaos.py), small: 60 runs under faults and SIGKILLs, audited.

It runs the harness as a user would, in its own process with a private JOBRUNNER_HOME under
tmp_path, and asserts its verdict: no duplicate, no lost run, no wrong outcome. Then it checks
that nothing the harness started (workers, drivers, local server, shim, machines) is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "bench" / "chaos.py"
BOUND_S = 90.0


def processes_of(home: Path) -> list[str]:
    """Processes whose environment names ``home`` as JOBRUNNER_HOME, or that run inside it."""
    marker = f"JOBRUNNER_HOME={home}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            cwd = os.readlink(f"/proc/{entry}/cwd")
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker in environ or cwd.startswith(str(home)):
            found.append(f"{entry}: {argv.decode(errors='replace')}")
    return found


def wait_until_gone(home: Path, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    left = processes_of(home)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = processes_of(home)
    return left


@pytest.mark.slow
@pytest.mark.timeout(BOUND_S + 90)
@pytest.mark.parametrize("seed", [7])
def test_chaos_fast(tmp_path: Path, seed: int) -> None:
    home = tmp_path / "chaos-home"
    report_path = tmp_path / "report.json"
    command = [
        sys.executable, str(HARNESS), "--runs", "60", "--seed", str(seed), "--json",
        "--home", str(home), "--kill-interval", "0.7", "--server-gap", "4",
        "--settle-timeout", "45",
    ]  # fmt: skip
    started = time.monotonic()
    with open(report_path, "wb") as out, open(tmp_path / "harness.err", "wb") as err:
        harness = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=ROOT
        )
        try:
            returncode = harness.wait(BOUND_S)
        except subprocess.TimeoutExpired:
            harness.send_signal(signal.SIGTERM)  # the harness stops what it started, then exits
            try:
                harness.wait(60)
            except subprocess.TimeoutExpired:
                harness.kill()
                harness.wait()
            returncode = None
    elapsed = time.monotonic() - started
    stderr_tail = (tmp_path / "harness.err").read_text(errors="replace")[-3000:]
    left = wait_until_gone(home, 15)
    assert not left, f"processes left behind by the harness: {left}"
    assert returncode is not None, f"the harness took more than {BOUND_S:.0f} s:\n{stderr_tail}"
    report = json.loads(report_path.read_text())
    summary = {k: report.get(k) for k in ("duplicates", "lost", "wrong", "details", "kills")}
    assert (report["duplicates"], report["lost"], report["wrong"]) == (0, 0, 0), summary
    assert returncode == 0, f"exit {returncode} after {elapsed:.0f} s:\n{stderr_tail}"
    assert report["runs"] == 60
    assert sum(report["outcomes"].values()) == 60
    # The chaos did happen: faults of every kind reached the server, and kills were made.
    faults = report["faults_injected"]
    assert faults.get("instrumented_servers", 0) >= 1, faults
    assert faults.get("rate_limit_429", 0) + faults.get("server_error_5xx", 0) > 0, faults
    assert report["kills"].get("worker", 0) >= 1, report["kills"]
    assert report["kills"].get("server", 0) >= 1, report["kills"]
