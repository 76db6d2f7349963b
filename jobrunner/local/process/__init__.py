"""Running machines as local processes: the shim that outlives the server, spawning, output,
limits, files."""
