"""The client's clock is the package's one clock (:mod:`jobrunner.clock`), re-exported here so
``jobrunner.machines`` stays usable on its own."""

from __future__ import annotations

from jobrunner.clock import SYSTEM_CLOCK, Clock

__all__ = ["SYSTEM_CLOCK", "Clock"]
