"""The package's public names: sorted, complete, and importable."""

from __future__ import annotations

import jobrunner.machines as machines


def test_all_is_sorted_and_importable() -> None:
    assert machines.__all__ == sorted(machines.__all__)
    for name in machines.__all__:
        assert hasattr(machines, name), name


def test_main_entry_points_are_exported() -> None:
    for name in ("AsyncMachinesClient", "MachinesClient", "ClientConfig", "RequestRetryPolicy"):
        assert name in machines.__all__
    tree = {
        "MachinesError",
        "MachinesConnectionError",
        "MachinesAPIError",
        "BadRequest",
        "ValidationFailed",
        "Unauthorized",
        "NotFound",
        "MachineDestroyed",
        "WaitTimeout",
        "Conflict",
        "RateLimited",
        "InsufficientCapacity",
        "ServerError",
        "LeaseError",
    }
    assert tree <= set(machines.__all__)
