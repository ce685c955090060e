"""Who may use the web console: a shared token or a user file, and CSRF tokens.

The user file holds one user a line, ``name:scrypt$<n>$<r>$<p>$<salt hex>$<hash hex>``
(``domcapture web --add-user NAME --users FILE`` writes such a line); blank
lines and lines starting with ``#`` are ignored.  The shared token is compared
in constant time, like the password hashes.

A session (a signed cookie) holds the user's name and a random CSRF token;
every form that acts carries that token and a request without it, or with
another one, is refused with 403 before anything is read or changed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from pathlib import Path

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class AuthConfigError(ValueError):
    """A user file or token file that cannot be used; the message names the file and line."""


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, want = encoded.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(bytes.fromhex(want)), maxmem=256 * 1024 * 1024)
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), want)


def load_users(path: Path) -> dict[str, str]:
    users: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise AuthConfigError(f"user file {path}: {exc.strerror or exc}") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, encoded = line.partition(":")
        if not sep or not name or len(encoded.split("$")) != 6 or not encoded.startswith("scrypt$"):
            raise AuthConfigError(f"user file {path}, line {n}: expected name:scrypt$n$r$p$salt$hash")
        users[name] = encoded
    return users


def add_user(path: Path, name: str, password: str) -> None:
    """Add or replace ``name`` in the user file (created with mode 0600)."""
    if not name or ":" in name or name != name.strip():
        raise AuthConfigError(f"bad user name {name!r}: no colon, no surrounding spaces")
    users = load_users(path) if path.exists() else {}
    users[name] = hash_password(password)
    text = "".join(f"{u}:{h}\n" for u, h in users.items())
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(text)


def read_secret_file(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise AuthConfigError(f"{what} file {path}: {exc.strerror or exc}") from None
    if len(value) < 16:
        raise AuthConfigError(f"{what} file {path}: needs at least 16 characters")
    return value


@dataclass
class Auth:
    """How the console and the metrics endpoint admit a request."""

    token: str | None = None
    users: dict[str, str] = field(default_factory=dict)
    no_auth: bool = False  # explicit --no-auth: everyone is "anonymous"
    metrics: str = "loopback"  # open | loopback | token
    metrics_token: str | None = None

    def login(self, username: str, secret: str) -> str | None:
        """The user name to keep in the session, or None when the credentials are wrong."""
        if self.users and username:
            encoded = self.users.get(username)
            if encoded is not None and check_password(secret, encoded):
                return username
            return None
        if self.token is not None and secret and hmac.compare_digest(secret.encode(), self.token.encode()):
            return "token"
        return None

    def metrics_allowed(self, client_host: str | None, authorization: str | None) -> bool:
        if self.metrics == "open":
            return True
        if self.metrics_token and authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                                  self.metrics_token.encode()):
                return True
        if self.metrics == "loopback":
            return is_loopback(client_host)
        return False


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: object, given: object) -> bool:
    return (isinstance(expected, str) and isinstance(given, str) and bool(expected)
            and hmac.compare_digest(expected.encode(), given.encode()))
