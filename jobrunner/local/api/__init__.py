"""The local backend's HTTP API: the starlette app, request validation, API errors, wait
requests and fault injection."""
