"""Conformance with Fly's (2024) swagger, and fuzzing: no input ever gets a 5xx.

schemathesis generates requests for every operation the local backend implements and checks
that no answer is a server error and that every documented answer matches the spec's schema.
``status_code_conformance`` is left out on purpose: the 2024 spec lists only success codes, while
Fly answers 404/408/409/412/422 too (fly-machines-api.md section 2; see docs/local-backend.md).

Generated machine configs get a harmless command (``true``) and no files before they are sent:
the fuzzer must never make the server run an arbitrary program on this computer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from .local_harness import APP, ServerProcess, command_config, start_server

SWAGGER = Path(__file__).with_name("fly-machines-swagger.json")
# Volumes, exec and ps are not implemented by the local backend (they answer 404).
schema = schemathesis.openapi.from_path(SWAGGER).exclude(path_regex=r"/volumes|/exec$|/ps$")


@dataclass
class Target:
    server: ServerProcess
    http: httpx.Client
    machine_id: str = ""

    def ensure_machine(self) -> str:
        """A live machine for the generated requests to act on (fuzzing may destroy it)."""
        url = f"/v1/apps/{APP}/machines"
        if self.machine_id:
            current = self.http.get(f"{url}/{self.machine_id}")
            lease = self.http.get(f"{url}/{self.machine_id}/lease")
            # A fuzzed lease would turn every later action into a 409: start afresh instead.
            if current.json().get("state") != "destroyed" and lease.status_code == 404:
                return self.machine_id
        created = self.http.post(url, json={"config": command_config("true"), "skip_launch": True})
        assert created.status_code == 200, created.text
        self.machine_id = created.json()["id"]
        return self.machine_id


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    process = start_server(tmp_path_factory.mktemp("conformance") / "state")
    http = httpx.Client(base_url=process.base_url, headers=process.headers(), trust_env=False)
    try:
        yield Target(process, http)
    finally:
        http.close()
        process.stop()


def _make_harmless(body: Any) -> None:
    config = body.get("config") if isinstance(body, dict) else None
    if isinstance(config, dict):
        config["init"] = {"exec": ["true"]}
        config.pop("files", None)


@schema.parametrize()
@settings(
    # Only generated examples: schemathesis's explicit "coverage" examples run to thousands of
    # requests per operation here, far past this suite's time budget.
    phases=[Phase.generate],
    max_examples=8,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_spec_conformance_and_no_server_errors(case: Any, target: Target) -> None:
    parameters = case.path_parameters or {}
    if "machine_id" in parameters:
        parameters["machine_id"] = target.ensure_machine()
        parameters["app_name"] = APP
    elif case.path.endswith("/machines"):
        parameters["app_name"] = APP
    if case.path.endswith("/wait"):
        case.query = {**(case.query or {}), "timeout": 1}  # keep every long poll short
    _make_harmless(case.body)
    response = case.call(
        base_url=f"{target.server.base_url}/v1", headers=target.server.headers(), timeout=10
    )
    assert response.status_code < 500, (case.method, case.formatted_path, response.text)
    if response.status_code >= 400:
        assert "error" in response.json()
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
CONFIG_KEYS = st.sampled_from(
    ["image", "env", "guest", "size", "restart", "schedule", "auto_destroy", "metadata",
     "stop_config", "files", "init", "services", "checks"]
)  # fmt: skip
CONFIGS = st.dictionaries(CONFIG_KEYS, JSON, max_size=6)
BODIES = JSON | st.fixed_dictionaries({"config": CONFIGS}, optional={"name": JSON, "region": JSON,
                                      "skip_launch": JSON, "lease_ttl": JSON})  # fmt: skip
ENDPOINTS = ["", "/{id}", "/{id}/stop", "/{id}/signal", "/{id}/lease", "/{id}/metadata/k",
             "/{id}/restart", "/{id}/start"]  # fmt: skip


@given(endpoint=st.sampled_from(ENDPOINTS), body=BODIES)
@settings(
    max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
def test_arbitrary_json_bodies_never_get_a_server_error(
    target: Target, endpoint: str, body: Any
) -> None:
    _make_harmless(body)
    if isinstance(body, dict):
        body["skip_launch"] = True
    path = f"/v1/apps/{APP}/machines" + endpoint.format(id=target.ensure_machine())
    response = target.http.post(path, json=body)
    assert response.status_code < 500, (path, body, response.text)
    if response.status_code >= 400:
        assert isinstance(response.json()["error"], str)
