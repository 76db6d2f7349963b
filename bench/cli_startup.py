"""How long each ``jobrunner`` command takes as a whole process, start-up included.

    python bench/cli_startup.py                    # this checkout, 7 rounds
    python bench/cli_startup.py --repeat 11 --json
    python bench/cli_startup.py --pythonpath /tmp/base   # another checkout (e.g. `git archive`)
    python bench/cli_startup.py --no-bytecode-cache      # as with PYTHONDONTWRITEBYTECODE=1

It makes a private JOBRUNNER_HOME and local backend (on a free port), runs ``jobs/hello.toml``
once so the ledger has a run to show, then runs every command ``--repeat`` times, the commands
taking turns (so a burst of load elsewhere on the machine hits all of them alike). For each it
reports the median wall time, the median CPU time (user + system of the child, from
``getrusage(RUSAGE_CHILDREN)``) and the ratio of its wall time to ``python -c pass`` measured in
the same rounds: on a loaded machine the ratio moves less than the seconds do.

Byte code: by default the commands run with a private ``PYTHONPYCACHEPREFIX`` (filled during the
warm-up round), as an installed jobrunner has its ``.pyc`` files; ``--no-bytecode-cache`` sets
``PYTHONDONTWRITEBYTECODE=1`` instead, so every jobrunner module is compiled from source on every
start (a source checkout run that way pays ~0.2 s more per heavy command).

The local server is stopped (with its machines) and the home removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Sample:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _jobrunner() -> list[str]:
    """The console script next to this interpreter (what a user types), else ``-m jobrunner``."""
    script = Path(sys.executable).parent / "jobrunner"
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "jobrunner"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(
    argv: list[str], env: dict[str, str]
) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    cpu_before = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run(
        argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    return wall, _children_cpu() - cpu_before, done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="Rounds (at least 5).")
    parser.add_argument("--pythonpath", help="Put this checkout first on PYTHONPATH.")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="Compile jobrunner's modules on every start (PYTHONDONTWRITEBYTECODE=1).",
    )
    args = parser.parse_args()
    repeat = max(5, args.repeat)

    home = Path(tempfile.mkdtemp(prefix="jobrunner-cli-bench-"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "JOBRUNNER_"))}
    env.update({"JOBRUNNER_HOME": str(home), "JOBRUNNER_LOCAL_PORT": str(port), "NO_COLOR": "1"})
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    if args.no_bytecode_cache:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(home / "pycache")
    jr = _jobrunner()
    try:
        started = subprocess.run(
            [*jr, "local", "start", "--port", str(port)], env=env, capture_output=True, text=True
        )
        if started.returncode != 0:
            print(f"could not start the local backend: {started.stderr}", file=sys.stderr)
            return 1
        first = subprocess.run(
            [*jr, "run", "jobs/hello.toml", "--json"], cwd=REPO, env=env, capture_output=True,
            text=True,
        )  # fmt: skip
        if first.returncode != 0:
            print(f"jobs/hello.toml failed: {first.stderr}", file=sys.stderr)
            return 1
        run_id = json.loads(first.stdout)["id"]
        commands: dict[str, list[str]] = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "jobrunner --help": [*jr, "--help"],
            "jobrunner runs list": [*jr, "runs", "list"],
            "jobrunner runs show RUN": [*jr, "runs", "show", run_id],
            "jobrunner logs RUN": [*jr, "logs", run_id],
            "jobrunner jobs list": [*jr, "jobs", "list"],
            "jobrunner run jobs/hello.toml": [*jr, "run", "jobs/hello.toml"],
        }
        samples = {name: Sample() for name in commands}
        job_durations: list[float] = []
        for argv in commands.values():  # warm the bytecode and page caches
            subprocess.run(argv, cwd=REPO, env=env, capture_output=True)
        for _ in range(repeat):
            for name, argv in commands.items():
                wall, cpu, done = _timed(argv, env)
                if done.returncode not in (0, 65):  # jobs list: 65 when an example is invalid
                    print(f"{name} exited {done.returncode}: {done.stderr}", file=sys.stderr)
                    return 1
                samples[name].wall.append(wall)
                samples[name].cpu.append(cpu)
        listed = subprocess.run(
            [*jr, "runs", "list", "--json", "--limit", str(repeat)], cwd=REPO, env=env,
            capture_output=True, text=True,
        )  # fmt: skip
        job_durations = [r["duration_s"] for r in json.loads(listed.stdout) if r["duration_s"]]
    finally:
        subprocess.run([*jr, "local", "stop", "--stop-machines"], env=env, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)

    base = statistics.median(samples["python -c pass"].wall)
    results = [
        {
            "command": name,
            "wall_s": round(statistics.median(s.wall), 3),
            "cpu_s": round(statistics.median(s.cpu), 3),
            "ratio": round(statistics.median(s.wall) / base, 1),
            "runs": len(s.wall),
        }
        for name, s in samples.items()
    ]
    job_s = round(statistics.median(job_durations), 3) if job_durations else None
    if args.json:
        data = {
            "results": results,
            "hello_job_duration_s": job_s,
            "bytecode_cache": not args.no_bytecode_cache,
        }
        print(json.dumps(data, indent=2))
        return 0
    print(f"{'command':34} {'wall (median)':>14} {'cpu (median)':>13} {'x python -c pass':>17}")
    for r in results:
        print(f"{r['command']:34} {r['wall_s']:>13.3f}s {r['cpu_s']:>12.3f}s {r['ratio']:>16.1f}x")
    cache = "no byte-code cache" if args.no_bytecode_cache else "byte code cached"
    print(f"({repeat} rounds, {cache}; hello.toml's own duration in the ledger: median {job_s} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
