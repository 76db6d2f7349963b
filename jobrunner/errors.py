"""The root of every exception jobrunner raises on purpose.

    JobrunnerError
    ├── ConfigError                      bad settings or environment (names the variable)
    ├── machines.errors.MachinesError    anything from talking to a Machines API
    │   ├── MachinesConnectionError      no HTTP answer (refused, reset, timed out)
    │   └── MachinesAPIError             an HTTP error answer; carries status, body, request id
    │       ├── BadRequest (400) ── ValidationFailed (422)
    │       ├── Unauthorized (401)
    │       ├── NotFound (404)
    │       ├── WaitTimeout (408)
    │       ├── Conflict (409)
    │       ├── RateLimited (429)
    │       ├── InsufficientCapacity (status "insufficient_capacity", any code)
    │       └── ServerError (5xx)
    ├── spec.JobSpecError                a job file or Job() that does not validate
    ├── claims.RunBusy                   another live process drives the run
    ├── handles.RunnerClosed             the JobRunner was closed while a handle waited
    └── store errors (see jobrunner.store)

Every message says what went wrong and what to do about it, and never contains a secret.
"""

from __future__ import annotations


class JobrunnerError(Exception):
    """Base class for all errors raised by jobrunner."""


class ConfigError(JobrunnerError):
    """A setting (environment variable, project file or argument) is missing or invalid."""
