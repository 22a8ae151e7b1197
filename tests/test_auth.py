"""Users files: scrypt-hashed passwords, the add-user command, what counts as loopback."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

import pytest

from labelsmart import auth
from labelsmart.cli import main


def test_passwords_are_stored_hashed_and_checked(tmp_path: Path):
    users_file = tmp_path / "users.json"
    assert auth.add_user(users_file, "alice", "correct horse") is True
    text = users_file.read_text()
    assert "correct horse" not in text and json.loads(text)["users"]["alice"]["scrypt"]
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600  # the owner's only
    users = auth.Users(users_file)
    assert users.check("alice", "correct horse")
    assert not users.check("alice", "correct horsE") and not users.check("bob", "correct horse")
    assert auth.add_user(users_file, "alice", "battery staple") is False  # a new password, the same user
    assert auth.Users(users_file).check("alice", "battery staple")
    a, b = auth.hash_password("same password"), auth.hash_password("same password")
    assert a["salt"] != b["salt"] and a["scrypt"] != b["scrypt"]  # a salt of its own per user


def test_bad_users_and_users_files_are_one_sentence(tmp_path: Path):
    users_file = tmp_path / "users.json"
    with pytest.raises(auth.AuthError, match="under 8 characters"):
        auth.add_user(users_file, "alice", "short")
    assert not users_file.exists()  # nothing half-written
    with pytest.raises(auth.AuthError, match="user name"):
        auth.add_user(users_file, "a:b", "long enough")
    with pytest.raises(auth.AuthError, match="users.json: users file not found; create it with"):
        auth.load_users(users_file)
    users_file.write_text("{not json")
    with pytest.raises(auth.AuthError, match="not a readable users file"):
        auth.load_users(users_file)
    users_file.write_text(json.dumps({"alice": "plain"}))
    with pytest.raises(auth.AuthError, match="not a labelsmart users file"):
        auth.load_users(users_file)


def test_add_user_command_reads_the_password_from_stdin(tmp_path: Path, monkeypatch, capsys):
    users_file = tmp_path / "u.json"
    monkeypatch.setattr("sys.stdin", io.StringIO("a long password\n"))
    assert main(["add-user", "--users", str(users_file), "carol", "--password-stdin"]) == 0
    assert capsys.readouterr().out.strip() == f"added user carol in {users_file}"
    assert auth.Users(users_file).check("carol", "a long password")
    monkeypatch.setattr("sys.stdin", io.StringIO("tiny\n"))
    assert main(["add-user", "--users", str(users_file), "carol", "--password-stdin"]) == 1
    assert "under 8 characters" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("", False)],
)
def test_loopback_hosts(host: str, loopback: bool):
    assert auth.is_loopback(host) is loopback
