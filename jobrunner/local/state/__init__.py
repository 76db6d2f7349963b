"""The local backend's persistence: one SQLite file of apps, machines, events, volumes and
log lines."""
