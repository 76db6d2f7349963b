"""Machine leases (fly-machines-api.md section 6): an exclusive, expiring right to change a machine.

A lease is held by whoever knows its nonce. Mutating calls on a leased machine must carry the
nonce in the ``fly-machine-lease-nonce`` header, otherwise they get 409; a nonce sent for a machine
that holds no lease (it expired, or was released) is accepted, since the caller did nothing wrong.
Acquiring again with the current nonce refreshes the lease and returns the same nonce.
"""

from __future__ import annotations

from datetime import datetime

from jobrunner.local.api.errors import ApiError, bad_request, conflict, not_found
from jobrunner.local.fleet import ids as ids
from jobrunner.local.fleet.records import LeaseRecord, MachineRecord

__all__ = ["DEFAULT_TTL", "MAX_TTL", "NONCE_HEADER", "acquire", "active_lease", "check", "release"]

NONCE_HEADER = "fly-machine-lease-nonce"
DEFAULT_TTL = 30  # seconds, when the request names none
MAX_TTL = 86_400
OWNER = "local@jobrunner"


def active_lease(machine: MachineRecord, now: datetime) -> LeaseRecord | None:
    """The machine's lease if it has one that has not expired."""
    lease = machine.lease
    if lease is None or lease.expires_at <= now.timestamp():
        return None
    return lease


def check(machine: MachineRecord, now: datetime, nonce: str | None) -> None:
    """409 unless the machine is unleased or ``nonce`` is its lease's nonce."""
    lease = active_lease(machine, now)
    if lease is not None and nonce != lease.nonce:
        raise ApiError(
            409,
            f"machine {machine.id} is leased by {lease.owner} until {lease.expires_at} (Unix "
            f"seconds): send its nonce in the {NONCE_HEADER} header, or wait for it to expire",
        )


def acquire(
    machine: MachineRecord, now: datetime, ttl: int, description: str, nonce: str | None
) -> LeaseRecord:
    """Take the lease, or refresh it when ``nonce`` is the current one.

    409 when someone else holds it.
    """
    if not 1 <= ttl <= MAX_TTL:
        raise bad_request(f"ttl must be between 1 and {MAX_TTL} seconds, got {ttl}")
    lease = active_lease(machine, now)
    expires_at = int(now.timestamp()) + ttl
    if lease is not None:
        if nonce != lease.nonce:
            raise conflict(
                f"machine {machine.id} is already leased by {lease.owner} until "
                f"{lease.expires_at} (Unix seconds): wait for it to expire or be released"
            )
        lease.expires_at = expires_at
        if description:
            lease.description = description
        lease.version = machine.instance_id
        return lease
    machine.lease = LeaseRecord(
        nonce=ids.lease_nonce(),
        expires_at=expires_at,
        owner=OWNER,
        description=description,
        version=machine.instance_id,
    )
    return machine.lease


def release(machine: MachineRecord, now: datetime, nonce: str | None) -> None:
    """Drop the lease; the nonce is required and must match."""
    if not nonce:
        raise bad_request(f"releasing a lease needs its nonce in the {NONCE_HEADER} header")
    lease = active_lease(machine, now)
    if lease is None:
        raise not_found(f"machine {machine.id} has no lease to release")
    if nonce != lease.nonce:
        raise conflict(
            f"the nonce in the {NONCE_HEADER} header does not match the lease on machine "
            f"{machine.id}: send the nonce that acquiring the lease returned"
        )
    machine.lease = None
