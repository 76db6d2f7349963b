"""Tests of the typed Fly Machines API client (jobrunner.machines), all against respx mocks."""
