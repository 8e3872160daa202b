"""The token file: only hashes stored, written atomically 0600, unsafe or malformed files refused with
the reason, verification that follows the file without a restart and fails closed."""

from __future__ import annotations

import hashlib
import os
import stat
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nspawn_mcp.auth.tokens import (
    TOKEN_PREFIX,
    TokenEntry,
    TokenError,
    TokenFile,
    TokenFileError,
    TokenIdentity,
    TokenStore,
    _toml_string,
    parse_token_file,
    render_token_file,
)
from nspawn_mcp.cli import main


@pytest.fixture
def store(tmp_path: Path) -> TokenStore:
    return TokenStore(tmp_path / "state" / "tokens.toml")


def test_add_stores_only_the_hash_in_a_0600_file(store: TokenStore) -> None:
    token = store.add("ci-runner", ["default"])
    assert token.startswith(TOKEN_PREFIX)
    assert len(token) == len(TOKEN_PREFIX) + 43  # 32 random bytes, base64url
    text = store.path.read_text()
    assert token not in text
    assert hashlib.sha256(token.encode()).hexdigest() in text
    info = store.path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    assert [p.name for p in store.path.parent.iterdir()] == ["tokens.toml"]  # no temporary left


def test_the_written_file_is_the_documented_toml(store: TokenStore) -> None:
    store.add("alice", ["default", "net"])
    store.add("bob")
    data = tomllib.loads(store.path.read_text())
    assert set(data["tokens"]) == {"alice", "bob"}
    assert data["tokens"]["alice"]["policies"] == ["default", "net"]
    assert data["tokens"]["bob"]["policies"] == []
    assert data["tokens"]["alice"]["created"].tzinfo is not None


def test_verify_finds_the_identity_of_the_right_token_only(store: TokenStore) -> None:
    alice = store.add("alice", ["default"])
    bob = store.add("bob")
    found = store.verify(alice)
    assert found is not None
    assert (found.name, found.policies) == ("alice", ("default",))
    assert found.may_use("default")
    assert not found.may_use("net")
    found_bob = store.verify(bob)
    assert found_bob is not None
    assert found_bob.may_use("anything")  # no policies listed: all
    assert store.verify(alice + "x") is None
    assert store.verify(alice[:-1]) is None
    assert store.verify("") is None
    assert store.verify("x" * 10_000) is None
    assert store.verify("\udcff") is None  # a lone surrogate is hashed, not an exception


def test_added_and_removed_tokens_take_effect_without_a_new_store(store: TokenStore) -> None:
    first = store.add("alice")
    assert store.verify(first) is not None
    second = store.add("bob")
    assert store.verify(second) is not None
    replaced = store.add("alice", replace=True)
    assert store.verify(first) is None
    assert store.verify(replaced) is not None
    store.remove("alice")
    assert store.verify(replaced) is None
    assert store.verify(second) is not None


def test_a_hand_edit_of_the_same_size_is_noticed(store: TokenStore) -> None:
    token = store.add("alice")
    assert store.verify(token) is not None
    text = store.path.read_text()
    store.path.write_text(text.replace("[tokens.alice]", "[tokens.alicf]"))
    found = store.verify(token)
    assert found is not None
    assert found.name == "alicf"


def test_an_existing_name_is_refused_unless_replaced(store: TokenStore) -> None:
    store.add("alice")
    with pytest.raises(TokenError, match=r"a token named 'alice' exists; give --replace"):
        store.add("alice")


@pytest.mark.parametrize("name", ["", "Alice", "-x", "_x", "a" * 33, "a b", "a.b", "ä"])
def test_bad_names_are_refused_with_the_rule(store: TokenStore, name: str) -> None:
    with pytest.raises(TokenError, match=r"bad token name .*must match"):
        store.add(name)
    assert not store.path.exists()


def test_bad_policy_names_are_refused(store: TokenStore) -> None:
    with pytest.raises(TokenError, match=r"bad policy name 'Net'"):
        store.add("alice", ["Net"])


def test_remove_of_an_unknown_name_says_so(store: TokenStore) -> None:
    store.add("alice")
    with pytest.raises(TokenError, match=r"no token named 'bob'"):
        store.remove("bob")


def test_a_missing_file_is_an_error_for_list_but_nobody_for_verify(store: TokenStore) -> None:
    with pytest.raises(TokenFileError, match=r"tokens.toml: no such file .*token add NAME"):
        store.identities()
    assert store.verify("nsm_anything") is None


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_file_others_may_access_is_refused_with_chmod_600(store: TokenStore, mode: int) -> None:
    token = store.add("alice")
    assert store.verify(token) is not None
    store.path.chmod(mode)
    with pytest.raises(TokenFileError, match=rf"group or others may access it \(mode 0{mode:o}\).*chmod 600"):
        store.identities()
    assert store.verify(token) is None  # fails closed while serving
    with pytest.raises(TokenFileError, match=r"chmod 600"):
        store.add("bob")  # and is not silently rewritten
    store.path.chmod(0o600)
    assert store.verify(token) is not None


def test_a_file_owned_by_someone_else_is_refused(store: TokenStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add("alice")
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(store.path).st_uid + 1)
    with pytest.raises(TokenFileError, match=r"owned by uid \d+, not by uid \d+ that runs nspawn-mcp"):
        store.identities()


def test_a_symlink_is_not_followed(store: TokenStore, tmp_path: Path) -> None:
    real = TokenStore(tmp_path / "real.toml")
    token = real.add("alice")
    store.path.parent.mkdir()
    store.path.symlink_to(real.path)
    with pytest.raises(TokenFileError, match=r"a symbolic link; refusing to follow it"):
        store.identities()
    assert store.verify(token) is None
    with pytest.raises(TokenFileError, match=r"symbolic link"):
        store.add("bob")


def test_malformed_toml_names_the_line(store: TokenStore) -> None:
    store.add("alice")
    with store.path.open("a") as file:
        file.write("policies = [\n\n[tokens.bob]\n")
    with pytest.raises(TokenFileError, match=r"tokens.toml: not valid TOML: .*\(at line \d+, column \d+\)"):
        store.identities()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('[tokens.alice]\nsha256 = "abc"\ncreated = 2025-01-01T00:00:00Z\n', "tokens.alice.sha256"),
        (f'[tokens.alice]\nsha256 = "{"0" * 64}"\n', "tokens.alice.created"),
        (f'[tokens.alice]\nsha256 = "{"0" * 64}"\ncreated = 2025-01-01T00:00:00\n', "tokens.alice.created"),
        (
            f'[tokens.alice]\nsha256 = "{"0" * 64}"\ncreated = 2025-01-01T00:00:00Z\npolicies = ["Net"]\n',
            "tokens.alice.policies.0",
        ),
        (
            f'[tokens.alice]\nsha256 = "{"0" * 64}"\ncreated = 2025-01-01T00:00:00Z\ntoken = "nsm_x"\n',
            "tokens.alice.token",
        ),
        (f'[tokens.Alice]\nsha256 = "{"0" * 64}"\ncreated = 2025-01-01T00:00:00Z\n', "tokens.Alice.[key]"),
        ("version = 2\n", "version"),
    ],
)
def test_malformed_content_names_the_field(text: str, field: str) -> None:
    with pytest.raises(TokenFileError) as caught:
        parse_token_file(text, "/etc/t.toml")
    assert str(caught.value).startswith("/etc/t.toml: invalid token file")
    assert f"\n  {field}: " in str(caught.value)


def test_two_names_with_one_hash_are_refused() -> None:
    entry = f'sha256 = "{"0" * 64}"\ncreated = 2025-01-01T00:00:00Z\n'
    with pytest.raises(TokenFileError, match=r"tokens 'a' and 'b' have the same sha256"):
        parse_token_file(f"[tokens.a]\n{entry}[tokens.b]\n{entry}", "t.toml")


def test_an_empty_file_has_no_tokens() -> None:
    assert parse_token_file("", "t.toml") == TokenFile()


def test_the_file_round_trips_through_the_model() -> None:
    data = TokenFile(
        tokens={
            "alice": TokenEntry(
                sha256="ab" * 32, policies=("default", "net"), created=datetime(2025, 5, 1, 12, tzinfo=UTC)
            ),
            "b_2": TokenEntry(sha256="cd" * 32, created=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
        }
    )
    assert parse_token_file(render_token_file(data), "t.toml") == data


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
def test_any_string_survives_the_toml_writer(text: str) -> None:
    assert tomllib.loads(f"value = {_toml_string(text)}\n") == {"value": text}


def test_identities_are_listed_by_name_without_hashes(store: TokenStore) -> None:
    store.add("bob")
    store.add("alice", ["default"])
    listed = store.identities()
    assert [i.name for i in listed] == ["alice", "bob"]
    assert all(isinstance(i, TokenIdentity) for i in listed)
    assert not any(hasattr(i, "sha256") for i in listed)


def test_cli_add_prints_the_token_once_on_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tokens.toml"
    assert main(["token", "add", "alice", "--policy", "default", "--file", str(path)]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n"
    assert token.startswith(TOKEN_PREFIX)
    assert "Authorization: Bearer" in err
    assert token not in err
    assert TokenStore(path).verify(token) is not None

    assert main(["token", "add", "alice", "--file", str(path)]) == 1
    assert "--replace" in capsys.readouterr().err
    assert main(["token", "add", "alice", "--replace", "--file", str(path)]) == 0
    assert TokenStore(path).verify(token) is None
    capsys.readouterr()

    assert main(["token", "list", "--file", str(path)]) == 0
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "POLICIES", "CREATED"]
    assert lines[1].split()[:2] == ["alice", "(all)"]
    assert "sha256" not in out
    assert hashlib.sha256(token.encode()).hexdigest() not in out

    assert main(["token", "remove", "alice", "--file", str(path)]) == 0
    assert main(["token", "remove", "alice", "--file", str(path)]) == 1
    assert "no token named 'alice'" in capsys.readouterr().err


def test_cli_uses_the_state_directory_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NSPAWN_MCP_STATE_DIR", str(tmp_path / "state"))
    assert main(["token", "add", "alice"]) == 0
    assert (tmp_path / "state" / "tokens.toml").is_file()
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    (tmp_path / "state" / "tokens.toml").chmod(0o644)
    capsys.readouterr()
    assert main(["token", "list"]) == 1
    assert "chmod 600" in capsys.readouterr().err
