"""The ``jobrunner`` command run as a user would, on a JOBRUNNER_HOME it has not created yet."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..cli.conftest import Cli, isolated_cli


@pytest.fixture
def fresh_cli(tmp_path: Path) -> Iterator[Cli]:
    """A Cli whose JOBRUNNER_HOME does not exist yet (jobrunner creates it)."""
    with isolated_cli(tmp_path / "made-by-jobrunner" / "home") as made:
        yield made
