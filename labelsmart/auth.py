"""Users of a labelsmart server: a JSON file of names and scrypt-hashed passwords, checked at login.

``python -m labelsmart add-user --users FILE NAME`` adds (or changes) a user; ``python app.py --auth FILE``
lets only those users in, on the page and on every HTTP route, and records the logged-in name as the author
of each saved label revision. Passwords are stored as ``hashlib.scrypt`` hashes with a per-user random salt
(N = 2^14, r = 8, p = 1), never in the clear, and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
from pathlib import Path
from typing import Any

from labelsmart import imageio

SCRYPT = {"n": 2**14, "r": 8, "p": 1}
MIN_PASSWORD = 8
FORMAT = "labelsmart-users/1"


class AuthError(ValueError):
    """A users file or a user that cannot be used; the message names the file and what to do."""


def hash_password(password: str, salt: bytes | None = None, **params: int) -> dict[str, Any]:
    """A stored form of a password: ``{"scrypt": hex hash, "salt": hex, "n", "r", "p"}``."""
    cost = {**SCRYPT, **params}
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=cost["n"], r=cost["r"], p=cost["p"], dklen=32)
    return {"scrypt": digest.hex(), "salt": salt.hex(), **cost}


def verify_password(record: dict[str, Any], password: str) -> bool:
    """Whether ``password`` is the one ``record`` (from :func:`hash_password`) was made from."""
    try:
        cost = {k: int(record[k]) for k in ("n", "r", "p")}
        salt, want = bytes.fromhex(record["salt"]), bytes.fromhex(record["scrypt"])
    except (KeyError, TypeError, ValueError):
        return False
    got = hashlib.scrypt(password.encode(), salt=salt, dklen=len(want), **cost)
    return hmac.compare_digest(got, want)


def load_users(path: Path) -> dict[str, dict[str, Any]]:
    """``{name: stored password}`` of a users file.

    Raises:
        AuthError: the file is missing, not a users file, or lists no user.
    """
    path = Path(path)
    hint = "create it with `python -m labelsmart add-user --users FILE NAME`."
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise AuthError(f"{path}: users file not found; {hint}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuthError(f"{path}: not a readable users file ({exc}); {hint}") from exc
    users = data.get("users") if isinstance(data, dict) and data.get("format") == FORMAT else None
    if not isinstance(users, dict) or not all(isinstance(v, dict) and "scrypt" in v for v in users.values()):
        raise AuthError(f"{path}: not a labelsmart users file; {hint}")
    if not users:
        raise AuthError(f"{path}: lists no user; {hint}")
    return users


def add_user(path: Path, name: str, password: str) -> bool:
    """Add a user to a users file (created if missing, readable by its owner only), or change their password.

    Returns:
        True when the user is new.

    Raises:
        AuthError: a bad name or a password under 8 characters; the file is left as it was.
    """
    name = name.strip()
    if not name or any(c in name for c in ":/\\") or not name.isprintable():
        raise AuthError(f"user name {name!r}: use letters, digits and punctuation other than : / \\.")
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"the password for {name} is under {MIN_PASSWORD} characters; choose a longer one.")
    path = Path(path)
    users = load_users(path) if path.exists() else {}
    new = name not in users
    users[name] = hash_password(password)
    body = json.dumps({"format": FORMAT, "users": users}, indent=2, sort_keys=True) + "\n"
    imageio.atomic_write_bytes(path, body.encode())
    os.chmod(path, 0o600)
    return new


class Users:
    """The users of a running server; :meth:`check` is what the login page calls."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.users = load_users(self.path)

    def check(self, name: str, password: str) -> bool:
        """Whether ``name`` is a user and ``password`` theirs (scrypt, constant-time comparison)."""
        record = self.users.get(name)
        if record is None:
            verify_password(next(iter(self.users.values())), password)  # the same work for unknown names
            return False
        return verify_password(record, password)


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` reaches this machine only (127.0.0.0/8, ::1, localhost)."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False
