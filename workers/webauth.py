"""Who may use the web console: a shared token or a user file, roles, sessions, CSRF tokens.

The user file holds one user a line, ``name:scrypt$<n>$<r>$<p>$<salt hex>$<hash hex>[:role]``
(``domcapture web --add-user NAME --role ROLE --users FILE`` writes such a
line); blank lines and lines starting with ``#`` are ignored.  A role is one
of ``viewer`` (read), ``operator`` (read, submit, resume, rollback, abort,
verify) and ``admin`` (all that, and policies, hosts and users); a line
without one (written before roles existed, when every user could act) is an
``operator``.  The shared token is compared in constant time, like the
password hashes; its holder is an ``admin``, ``--no-auth``'s anonymous user
an ``operator``, and ``--read-only`` makes everyone a ``viewer``.

A session lives in Redis (``P:web:session:<sha256 of its id>``, expiring
after ``SESSION_TTL``); the cookie (signed) carries only its random id, the
CSRF token and a one-shot message.  Logout deletes the session; a password
change or a removal of the user deletes all of that user's sessions, and a
session whose user's entry changed since the login is refused even before
that (the console re-reads the user file when it changes).  Every form that
acts carries the CSRF token; a request without it, or with another one, is
refused with 403 before anything is read or changed.

A login for an unknown name checks the password against a dummy hash, so it
takes as long as one for a known name.  Failed logins are counted per client
address and per user name (``P:web:login-fail:...``, one minute); after
``LOGIN_LIMIT`` in a minute further tries get 429 with ``Retry-After``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
ROLES = ("viewer", "operator", "admin")
DEFAULT_ROLE = "operator"
SESSION_TTL = 12 * 3600
LOGIN_LIMIT, LOGIN_WINDOW = 5, 60


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


@functools.cache
def dummy_hash() -> str:
    """What an unknown name's password is checked against, so that a miss costs a hash too."""
    return hash_password(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class User:
    name: str
    encoded: str  # the password hash; empty for the token holder and the anonymous user
    role: str

    @property
    def stamp(self) -> str:
        """Changes whenever the password or the role does: a session remembers the one it began with."""
        return hashlib.sha256(f"{self.encoded}|{self.role}".encode()).hexdigest()[:24]


def user_name(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > 64 or ":" in name or name != name.strip() \
            or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise AuthConfigError(f"bad user name {str(name)[:80]!r}: 1-64 characters, no colon, no control "
                              "characters, no surrounding spaces")
    return name


def role_name(role: object) -> str:
    if role not in ROLES:
        raise AuthConfigError(f"role {str(role)[:40]!r}: choose one of {', '.join(ROLES)}")
    return str(role)


def load_users(path: Path) -> dict[str, User]:
    users: dict[str, User] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise AuthConfigError(f"user file {path}: {exc.strerror or exc}") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        encoded, _, role = rest.partition(":")
        if not sep or not name or len(encoded.split("$")) != 6 or not encoded.startswith("scrypt$"):
            raise AuthConfigError(f"user file {path}, line {n}: expected name:scrypt$n$r$p$salt$hash[:role]")
        if role and role not in ROLES:
            raise AuthConfigError(f"user file {path}, line {n}: role {role[:40]!r}: choose one of {', '.join(ROLES)}")
        users[name] = User(name, encoded, role or DEFAULT_ROLE)
    return users


def _write_users(path: Path, users: dict[str, User]) -> None:
    text = "".join(f"{u.name}:{u.encoded}:{u.role}\n" for u in users.values())
    path.touch(mode=0o600, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def add_user(path: Path, name: str, password: str | None, role: str | None = None) -> User:
    """Add or replace ``name`` in the user file (mode 0600); ``password`` None keeps the password,
    ``role`` None keeps the role (a new user: ``operator``)."""
    user_name(name)
    if role is not None:
        role_name(role)
    users = load_users(path) if path.exists() else {}
    old = users.get(name)
    if password is None and old is None:
        raise AuthConfigError(f"no user {name!r} in {path}")
    users[name] = User(name, hash_password(password) if password is not None else old.encoded if old else "",
                       role or (old.role if old else DEFAULT_ROLE))
    _write_users(path, users)
    return users[name]


def remove_user(path: Path, name: str) -> None:
    users = load_users(path)
    if name not in users:
        raise AuthConfigError(f"no user {name!r} in {path}")
    del users[name]
    _write_users(path, users)


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
    users: dict[str, User] = field(default_factory=dict)
    no_auth: bool = False  # explicit --no-auth: everyone is "anonymous"
    metrics: str = "loopback"  # open | loopback | token
    metrics_token: str | None = None
    users_path: Path | None = None  # re-read when it changes, so a removal or a new password counts at once
    _seen: tuple[int, int] | None = None

    TOKEN_USER = User("token", "", "admin")
    ANONYMOUS = User("anonymous", "", "operator")

    def refresh(self) -> None:
        """Re-read the user file when its size or modification time changed; a broken file admits no one."""
        if self.users_path is None:
            return
        try:
            st = self.users_path.stat()
            seen = (st.st_mtime_ns, st.st_size)
        except OSError:
            seen = (0, 0)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            self.users = load_users(self.users_path)
        except AuthConfigError:
            self.users = {}

    def user(self, name: str) -> User | None:
        """The current entry of the user a session names (None: removed)."""
        if self.no_auth:
            return self.ANONYMOUS
        if name == self.TOKEN_USER.name and self.token is not None and not self.users:
            return self.TOKEN_USER
        self.refresh()
        return self.users.get(name)

    def login(self, username: str, secret: str) -> User | None:
        """The user to keep in the session, or None when the credentials are wrong.

        An unknown name costs the same scrypt as a known one (a dummy hash)."""
        self.refresh()
        if self.users or self.users_path is not None:
            entry = self.users.get(username) if username else None
            ok = check_password(secret, entry.encoded if entry else dummy_hash())
            return entry if entry is not None and ok else None
        if self.token is not None and secret and hmac.compare_digest(secret.encode(), self.token.encode()):
            return self.TOKEN_USER
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


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Sessions:
    """Console sessions in Redis: ``P:web:session:<sha256(id)>`` (a hash, expiring) and, per user,
    ``P:web:user-sessions:<sha256(name)>`` (the set of that user's session keys)."""

    def __init__(self, client: redis.Redis[bytes], prefix: str, ttl: int = SESSION_TTL) -> None:
        self.r = client
        self.prefix = prefix
        self.ttl = ttl

    def _key(self, sid: str) -> str:
        return f"{self.prefix}:web:session:{_digest(sid)}"

    def _user_key(self, name: str) -> str:
        return f"{self.prefix}:web:user-sessions:{_digest(name)}"

    def create(self, user: User, client: str) -> str:
        sid = secrets.token_urlsafe(32)
        key, ukey = self._key(sid), self._user_key(user.name)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, mapping={"user": user.name, "stamp": user.stamp, "client": client,
                                "created": f"{time.time():.3f}"})
        pipe.expire(key, self.ttl)
        pipe.sadd(ukey, key)
        pipe.expire(ukey, self.ttl)
        pipe.execute()
        return sid

    def get(self, sid: object) -> dict[str, str] | None:
        if not isinstance(sid, str) or not 20 <= len(sid) <= 100:
            return None
        raw = self.r.hgetall(self._key(sid))
        return {k.decode(): v.decode(errors="replace") for k, v in raw.items()} if raw else None

    def end(self, sid: object) -> None:
        if isinstance(sid, str):
            doc = self.get(sid)
            self.r.delete(self._key(sid))
            if doc:
                self.r.srem(self._user_key(doc["user"]), self._key(sid))

    def end_user(self, name: str) -> int:
        """End every session of ``name`` (a password change, a removal); how many there were."""
        ukey = self._user_key(name)
        keys = [k.decode() for k in self.r.smembers(ukey)]
        live = int(self.r.delete(*keys)) if keys else 0
        self.r.delete(ukey)
        return live


class LoginLimiter:
    """Failed logins per client address and per user name, in fixed one-minute windows."""

    def __init__(self, client: redis.Redis[bytes], prefix: str, limit: int = LOGIN_LIMIT,
                 window: int = LOGIN_WINDOW) -> None:
        self.r = client
        self.prefix = prefix
        self.limit = limit
        self.window = window

    def _keys(self, client: str, username: str) -> list[str]:
        return [f"{self.prefix}:web:login-fail:addr:{_digest(client)}",
                f"{self.prefix}:web:login-fail:user:{_digest(username)}"]

    def retry_after(self, client: str, username: str) -> int:
        """Seconds to wait before another try, or 0 when a try is allowed now."""
        wait = 0
        for key in self._keys(client, username):
            count = self.r.get(key)
            if count is not None and int(count) >= self.limit:
                wait = max(wait, int(self.r.ttl(key)), 1)
        return wait

    def failed(self, client: str, username: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        for key in self._keys(client, username):
            pipe.incr(key)
            pipe.expire(key, self.window, nx=True)
        pipe.execute()


def describe(user: Any) -> str:
    return f"{user.name} ({user.role})" if isinstance(user, User) else "-"
