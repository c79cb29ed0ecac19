"""Key configuration and permissions (service.auth): parsing owner:role:secret, digests only, constant-time lookup
over every key, the role each route needs."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import Forbidden, KeyRing, Principal, Role, required_role
from service.config import Settings

A = "a" * 32
B = "b" * 32
C = "c" * 32


def test_keys_name_their_owner_and_role_and_are_kept_as_digests() -> None:
    ring = KeyRing([f"team-a:train:{A}", f"web:infer:{B}", f"ops:admin:{C}"])
    assert ring.enabled and ring.owners == ["ops", "team-a", "web"]
    assert ring.principal(A) == Principal("team-a", Role.train)
    assert ring.principal(B) == Principal("web", Role.infer)
    assert ring.principal(C) == Principal("ops", Role.admin) and ring.principal(C).sees_every_owner
    assert ring.principal("x" * 32) is None and ring.principal("") is None
    assert A not in repr(vars(ring))  # only digests are kept


def test_a_keys_file_adds_one_key_per_line(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# the serving clients\nweb:infer:{B}\n\nops:admin:{C}\n")
    ring = KeyRing.from_settings([f"team-a:train:{A}"], keys_file)
    assert ring.owners == ["ops", "team-a", "web"]


@pytest.mark.parametrize(("entry", "message"), [
    ("team-a:train", "is not owner:role:secret"),
    (f"Team A:train:{A}", "invalid owner"),
    (f"team-a:root:{A}", "unknown role"),
    ("team-a:train:short", "short secret"),
])
def test_bad_entries_say_what_was_expected_without_the_secret(entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        KeyRing([entry])
    assert A not in str(caught.value) and "short" not in str(caught.value).split("secret", 1)[-1][:7]


def test_a_bare_secret_of_the_first_wave_is_the_default_owners_admin_key() -> None:
    ring = KeyRing(["test-key"])
    assert ring.principal("test-key") == Principal("default", Role.admin)


def test_two_keys_with_one_secret_are_refused() -> None:
    with pytest.raises(ValueError, match="same secret"):
        KeyRing([f"team-a:train:{A}", f"team-b:infer:{A}"])


@pytest.mark.parametrize(("method", "path", "role"), [
    ("POST", "/reconstruct", Role.infer),
    ("GET", "/models", Role.infer),
    ("GET", "/models/m_0123456789ab/model.onnx", Role.infer),
    ("DELETE", "/models/x", Role.train),
    ("POST", "/jobs", Role.train),
    ("GET", "/jobs/j_0123456789abcdef/events", Role.train),
    ("DELETE", "/datasets/ds_0123456789ab", Role.train),
    ("GET", "/datasets", Role.train),
    ("GET", "/metrics", Role.admin),
    ("GET", "/no-such-route", Role.infer),
])
def test_each_route_needs_its_role(method: str, path: str, role: Role) -> None:
    assert required_role(method, path) == role


def test_acting_as_another_owner_needs_the_admin_role() -> None:
    assert Principal("team-a", Role.train).acting_as(None) == ("team-a", False)
    assert Principal("team-a", Role.train).acting_as("team-a") == ("team-a", False)
    assert Principal("ops", Role.admin).acting_as(None) == ("ops", True)
    assert Principal("ops", Role.admin).acting_as("team-a") == ("team-a", False)
    with pytest.raises(Forbidden, match="Only an admin key may name another owner.*owner='team-b'"):
        Principal("team-a", Role.train).acting_as("team-b")


def _app_client(settings: Settings, **changes: object) -> TestClient:
    return TestClient(create_app(Settings(**{**settings.model_dump(), **changes})))


def test_metrics_and_docs_can_be_put_behind_a_key_and_the_probes_stay_open(settings: Settings) -> None:
    keys = f"team-a:train:{A},ops:admin:{C}"
    with _app_client(settings, api_keys=keys) as client:  # defaults: metrics and docs open
        assert client.get("/metrics").status_code == 200 and client.get("/docs").status_code == 200
    with _app_client(settings, api_keys=keys, metrics_require_key=True, docs_require_key=True) as client:
        assert client.get("/metrics").status_code == 401
        refused = client.get("/metrics", headers={"X-API-Key": A})
        assert refused.status_code == 403 and "role admin" in refused.json()["detail"] and A not in refused.text
        assert client.get("/metrics", headers={"X-API-Key": C}).status_code == 200
        assert client.get("/docs").status_code == 401 and client.get("/openapi.json").status_code == 401
        assert client.get("/docs", headers={"X-API-Key": A}).status_code == 200
        for probe in ("/healthz", "/readyz"):
            assert client.get(probe).status_code == 200
        assert client.get("/readyz").json()["auth"] == "api_keys"


def test_keys_from_a_file_are_accepted_by_the_gateway(settings: Settings, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"team-a:train:{A}\n")
    with _app_client(settings, api_keys_file=keys_file) as client:
        assert client.get("/jobs").status_code == 401
        assert client.get("/jobs", headers={"X-API-Key": A}).status_code == 200


def test_a_bad_key_entry_stops_the_gateway_at_start_naming_its_position(settings: Settings) -> None:
    with pytest.raises(ValueError, match="API key #2 .*short secret.*Received: 5 characters") as error:
        create_app(Settings(**{**settings.model_dump(), "api_keys": f"team-a:train:{A},web:infer:tiny5"}))
    assert "tiny5" not in str(error.value)
