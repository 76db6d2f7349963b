"""The ``[retries]`` table: when a failed attempt is tried again, and how long to wait first."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobrunner.durations import parse_duration
from jobrunner.spec.problems import spec_error
from jobrunner.states import ATTEMPT_OUTCOMES

__all__ = ["OUTCOMES", "RetryPolicy"]

# Terminal outcomes of an attempt (the run's terminal states), plus "capacity": a create that
# failed for lack of capacity, as opposed to "create_failed" for any other create error.
OUTCOMES = ATTEMPT_OUTCOMES | {"capacity"}


def duration_field(value: Any, *, minimum_exclusive: bool = False) -> float:
    """Parse a duration for a pydantic ``before`` validator, raising a spec error when invalid."""
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise spec_error(
            str(exc).split("; ")[0], 'use seconds or a string like "90s", "10m", "1h30m"'
        ) from None
    if minimum_exclusive and seconds <= 0:
        raise spec_error("must be longer than zero", 'use e.g. "30s" or "10m"')
    return seconds


class RetryPolicy(BaseModel):
    """Which failures are retried, how many attempts in all, and the backoff between them.

    ``max_attempts`` counts every attempt (1 = never retry). The wait before attempt n (n >= 2) is
    ``backoff * backoff_factor ** (n - 2)``, capped at ``max_backoff``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    max_attempts: int = Field(default=1, ge=1)
    backoff: float = 10.0
    backoff_factor: float = Field(default=2.0, ge=1.0)
    max_backoff: float = 300.0
    exit_codes: Literal["any"] | list[int] = "any"
    oom: bool = False
    capacity: bool = True
    lost: bool = True
    timeout: bool = False

    @field_validator("backoff", "max_backoff", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return duration_field(value)

    @field_validator("exit_codes", mode="before")
    @classmethod
    def _exit_codes(cls, value: Any) -> Any:
        if value == "any":
            return value
        if not isinstance(value, list):
            raise spec_error(
                'must be "any" or a list of exit codes', 'write exit_codes = "any" or [1, 75]'
            )
        for index, code in enumerate(value):
            if isinstance(code, bool) or not isinstance(code, int) or not 1 <= code <= 255:
                raise spec_error(
                    "must be an exit code from 1 to 255",
                    "list only non-zero exit codes, e.g. [1, 75]",
                    key=index,
                )
        return value

    def should_retry(
        self, outcome: str, exit_code: int | None, *, attempt: int | None = None
    ) -> bool:
        """Whether an attempt that ended with ``outcome`` deserves another attempt.

        ``capacity`` (no region had room for the machine) follows the ``capacity`` rule;
        ``create_failed`` (any other create error, e.g. an invalid config) is never retried, since
        trying again would fail the same way. When ``attempt`` (the number of the attempt that just
        ended) is given, attempts beyond ``max_attempts`` are refused too. Raises ``ValueError``
        for an unknown outcome.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {sorted(OUTCOMES)}")
        if attempt is not None and attempt >= self.max_attempts:
            return False
        if outcome == "failed":
            if self.exit_codes == "any":
                return exit_code != 0
            return exit_code in self.exit_codes
        rules = {
            "oom_killed": self.oom,
            "capacity": self.capacity,
            "lost": self.lost,
            "timed_out": self.timeout,
        }
        return rules.get(outcome, False)

    def delay_for(self, attempt_number: int) -> float:
        """Seconds to wait before starting attempt ``attempt_number`` (0 for the first)."""
        if attempt_number <= 1:
            return 0.0
        try:
            delay = self.backoff * self.backoff_factor ** (attempt_number - 2)
        except OverflowError:
            return self.max_backoff
        return float(min(delay, self.max_backoff))
