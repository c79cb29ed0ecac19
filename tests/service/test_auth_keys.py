"""Key configuration and permissions (service.auth): parsing owner:role:secret, digests only, constant-time lookup
over every key, the role each route needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.auth import KeyRing, Principal, Role, required_role

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
