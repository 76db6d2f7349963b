"""``python -m jobrunner`` is the ``jobrunner`` command."""

from __future__ import annotations

from jobrunner.cli import main

main()
