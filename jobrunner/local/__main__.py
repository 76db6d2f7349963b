"""``python -m jobrunner.local serve ...``: how the background server is started."""

from __future__ import annotations

from jobrunner.local.cli import local

if __name__ == "__main__":
    local(prog_name="python -m jobrunner.local")
