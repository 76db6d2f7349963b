"""Retry rules: which outcomes are tried again, and how long to wait first."""

from __future__ import annotations

import pytest

from jobrunner.spec import Job, RetryPolicy


def _policy(**retries: object) -> RetryPolicy:
    job = Job(name="r", image="python:3.12-slim", cmd=["true"], retries=retries)
    return job.retries


def test_defaults_retry_nothing_but_describe_the_usual_rules() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 1
    assert (policy.backoff, policy.backoff_factor, policy.max_backoff) == (10.0, 2.0, 300.0)
    assert policy.exit_codes == "any"
    assert (policy.oom, policy.capacity, policy.lost, policy.timeout) == (False, True, True, False)
    assert not policy.should_retry("failed", 1, attempt=1), "one attempt in all by default"


@pytest.mark.parametrize(
    ("outcome", "exit_code", "expected"),
    [
        ("succeeded", 0, False),
        ("cancelled", None, False),
        ("failed", 1, True),
        ("failed", 0, False),
        ("oom_killed", 137, False),
        ("capacity", None, True),
        ("create_failed", None, False),
        ("lost", None, True),
        ("timed_out", None, False),
    ],
)
def test_should_retry_with_default_rules(
    outcome: str, exit_code: int | None, expected: bool
) -> None:
    assert _policy(max_attempts=3).should_retry(outcome, exit_code) is expected


def test_rules_can_be_switched() -> None:
    policy = _policy(max_attempts=3, oom=True, capacity=False, lost=False, timeout=True)
    assert policy.should_retry("oom_killed", 137)
    assert policy.should_retry("timed_out", None)
    assert not policy.should_retry("capacity", None)
    assert not policy.should_retry("lost", None)


def test_only_listed_exit_codes_are_retried() -> None:
    policy = _policy(max_attempts=3, exit_codes=[75, 111])
    assert policy.should_retry("failed", 75)
    assert not policy.should_retry("failed", 1)


def test_attempt_limit() -> None:
    policy = _policy(max_attempts=3)
    assert policy.should_retry("failed", 1, attempt=2)
    assert not policy.should_retry("failed", 1, attempt=3)


def test_unknown_outcome_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown outcome 'exploded'"):
        RetryPolicy().should_retry("exploded", None)


def test_backoff_grows_and_is_capped() -> None:
    policy = _policy(max_attempts=10, backoff="10s", backoff_factor=3, max_backoff="2m")
    assert [policy.delay_for(n) for n in range(1, 6)] == [0.0, 10.0, 30.0, 90.0, 120.0]
    assert policy.delay_for(5000) == 120.0
