"""``python -m jobrunner`` is the ``jobrunner`` command."""

from __future__ import annotations

from jobrunner.cli import main

# The name shell completion (_JOBRUNNER_COMPLETE) and usage lines use, however it was started.
main(prog_name="jobrunner")
