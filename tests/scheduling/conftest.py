"""The scheduling tests reuse the CLI tests' ``cli`` fixture (the real command, isolated home)."""

from __future__ import annotations

from tests.cli.conftest import cli

__all__ = ["cli"]
