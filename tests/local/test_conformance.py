"""Conformance with Fly's (2024) swagger, and fuzzing: no input ever gets a 5xx.

schemathesis generates requests for every operation the local backend implements and checks
that no answer is a server error and that every documented answer matches the spec's schema.
``status_code_conformance`` is left out on purpose: the 2024 spec lists only success codes, while
Fly answers 404/408/409/412/422 too (fly-machines-api.md section 2; see docs/local-backend.md).

Generated machine configs get a harmless command (``true``) and no files or mounts before they
are sent: the fuzzer must never make the server run an arbitrary program on this computer.
Volume operations act on a real volume of the app (re-created when the fuzzer deletes it).
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
# exec and ps are not implemented by the local backend (they answer 404).
schema = schemathesis.openapi.from_path(SWAGGER).exclude(path_regex=r"/exec$|/ps$")


@dataclass
class Target:
    server: ServerProcess
    http: httpx.Client
    machine_id: str = ""
    volume_id: str = ""

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

    def ensure_volume(self) -> str:
        """A volume for the generated requests to act on (fuzzing may delete it)."""
        url = f"/v1/apps/{APP}/volumes"
        if self.volume_id and self.http.get(f"{url}/{self.volume_id}").status_code == 200:
            return self.volume_id
        created = self.http.post(url, json={"name": "conformance"})
        assert created.status_code == 200, created.text
        self.volume_id = created.json()["id"]
        return self.volume_id


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    process = start_server(tmp_path_factory.mktemp("conformance") / "state")
    http = httpx.Client(  # generous: a loaded CI machine can take seconds to answer
        base_url=process.base_url, headers=process.headers(), trust_env=False, timeout=60
    )
    try:
        yield Target(process, http)
    finally:
        http.close()
        process.stop()


def _make_harmless(body: Any, *, keep_mounts: bool = False) -> None:
    config = body.get("config") if isinstance(body, dict) else None
    if isinstance(config, dict):
        config["init"] = {"exec": ["true"]}
        config.pop("files", None)
        if not keep_mounts:
            config.pop("mounts", None)


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
    elif "volume_id" in parameters:
        parameters["volume_id"] = target.ensure_volume()
        parameters["app_name"] = APP
    elif case.path.endswith(("/machines", "/volumes")):
        parameters["app_name"] = APP
    if case.path.endswith("/wait"):
        case.query = {**(case.query or {}), "timeout": 1}  # keep every long poll short
    _make_harmless(case.body)
    response = case.call(
        base_url=f"{target.server.base_url}/v1", headers=target.server.headers(), timeout=60
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
     "stop_config", "files", "init", "services", "checks", "mounts"]
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
    _make_harmless(body, keep_mounts=True)  # fuzzed mounts are checked, never run: skip_launch
    if isinstance(body, dict):
        body["skip_launch"] = True
    path = f"/v1/apps/{APP}/machines" + endpoint.format(id=target.ensure_machine())
    response = target.http.post(path, json=body)
    assert response.status_code < 500, (path, body, response.text)
    if response.status_code >= 400:
        assert isinstance(response.json()["error"], str)


def test_image_only_creates_and_mounts_match_the_spec(target: Target) -> None:
    """Creates with only ``image`` (Fly's one required field) and with a volume mount answer
    the spec's Machine; the volume then shows the spec's Volume with its attachment."""
    create = schema["/apps/{app_name}/machines"]["POST"]
    url = f"/v1/apps/{APP}/machines"
    for image in ("alpine:3.20", "registry.example/unknown:1"):
        response = target.http.post(url, json={"config": {"image": image}, "skip_launch": True})
        assert response.status_code == 200, response.text
        create.validate_response(response)
        assert response.json()["config"] == {"image": image, **_defaults(response.json())}
    volume_id = target.ensure_volume()
    config = {"image": "alpine", "mounts": [{"volume": volume_id, "path": "/data"}]}
    mounted = target.http.post(url, json={"config": config, "skip_launch": True})
    assert mounted.status_code == 200, mounted.text
    create.validate_response(mounted)
    volume = target.http.get(f"/v1/apps/{APP}/volumes/{volume_id}")
    schema["/apps/{app_name}/volumes/{volume_id}"]["GET"].validate_response(volume)
    assert volume.json()["attached_machine_id"] == mounted.json()["id"]
    target.http.delete(f"{url}/{mounted.json()['id']}")


def _defaults(machine: dict[str, Any]) -> dict[str, Any]:
    """The keys the server fills into a stored config (guest and restart policy)."""
    return {k: v for k, v in machine["config"].items() if k in ("guest", "restart")}


def test_volume_answers_match_the_spec(target: Target) -> None:
    """Each volume endpoint's success answer, with real data, against the spec's schema."""
    base = "/apps/{app_name}/volumes"
    url = f"/v1/apps/{APP}/volumes"
    created = target.http.post(url, json={"name": "shapes", "size_gb": 2})
    schema[base]["POST"].validate_response(created)
    one = f"{url}/{created.json()['id']}"
    for path, method, response in (
        (base, "GET", target.http.get(url)),
        (base + "/{volume_id}", "GET", target.http.get(one)),
        (base + "/{volume_id}", "POST", target.http.post(one, json={"snapshot_retention": 7})),
        (
            base + "/{volume_id}/extend",
            "PUT",
            target.http.put(one + "/extend", json={"size_gb": 3}),
        ),
        (base + "/{volume_id}/snapshots", "POST", target.http.post(one + "/snapshots")),
        (base + "/{volume_id}/snapshots", "GET", target.http.get(one + "/snapshots")),
        (base + "/{volume_id}", "DELETE", target.http.delete(one)),
    ):
        assert response.status_code == 200, (method, path, response.text)
        schema[path][method].validate_response(response)
