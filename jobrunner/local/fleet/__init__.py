"""The machines a local backend holds: records, the state machine and lifecycle, leases,
schedules, volumes, images."""
