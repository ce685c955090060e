"""API tokens: a name, a scope, and only the SHA-256 of the secret kept.

Scopes are the console's roles under the API's names, one model: ``read`` is a
``viewer``, ``operate`` an ``operator``, ``admin`` an ``admin``.  Keys:

- ``P:api:tokens``            hash: name -> JSON ``{"scope", "digest", "created", "by"}``
- ``P:api:token:<digest>``    the name of the token whose secret has that SHA-256

A secret is ``dct_`` and 43 URL-safe characters (256 bits), shown once when it
is created; a lookup hashes the presented secret and reads one key.  Revoking
deletes both keys: the next request with that secret is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis

from .errors import InputError, RecordNotFound

SCOPES = ("read", "operate", "admin")
ROLE_OF_SCOPE = {"read": "viewer", "operate": "operator", "admin": "admin"}
SCOPE_OF_ROLE = {v: k for k, v in ROLE_OF_SCOPE.items()}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PREFIX = "dct_"


@dataclass(frozen=True)
class Token:
    name: str
    scope: str
    created: float
    by: str

    @property
    def role(self) -> str:
        return ROLE_OF_SCOPE[self.scope]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scope": self.scope, "created": self.created, "by": self.by}


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InputError(f"token name {str(name)[:70]!r}: 1-64 letters, digits, '_', '.', '-', starting with a "
                         "letter or digit")
    return name


def check_scope(scope: object) -> str:
    if scope not in SCOPES:
        raise InputError(f"scope {str(scope)[:40]!r}: choose one of {', '.join(SCOPES)}")
    return str(scope)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Tokens:
    def __init__(self, client: redis.Redis[bytes], prefix: str) -> None:
        self.r = client
        self.table = f"{prefix}:api:tokens"
        self.prefix = prefix

    def _by_digest(self, d: str) -> str:
        return f"{self.prefix}:api:token:{d}"

    def create(self, name: str, scope: str, by: str) -> str:
        """A new token; returns its secret (never stored). An existing name is refused."""
        check_name(name)
        check_scope(scope)
        secret = PREFIX + secrets.token_urlsafe(32)
        d = digest(secret)
        doc = json.dumps({"scope": scope, "digest": d, "created": time.time(), "by": by})
        if not self.r.hsetnx(self.table, name, doc):
            raise InputError(f"token {name!r} exists; revoke it first ('domcapture token revoke {name}')")
        self.r.set(self._by_digest(d), name)
        return secret

    def _parse(self, name: str, raw: bytes) -> tuple[Token, str]:
        doc = json.loads(raw)
        return Token(name, doc["scope"], float(doc["created"]), str(doc.get("by", ""))), str(doc["digest"])

    def list(self) -> list[Token]:
        return sorted((self._parse(k.decode(), v)[0] for k, v in self.r.hgetall(self.table).items()),
                      key=lambda t: t.name)

    def revoke(self, name: str) -> None:
        raw = self.r.hget(self.table, name)
        if raw is None:
            raise RecordNotFound(f"no token named {name!r}; see 'domcapture token list'")
        _, d = self._parse(name, raw)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self._by_digest(d))
        pipe.hdel(self.table, name)
        pipe.execute()

    def authenticate(self, secret: str) -> Token | None:
        """The token whose secret this is, or None (unknown, revoked, malformed)."""
        if not secret.startswith(PREFIX) or len(secret) > 100:
            return None
        d = digest(secret)
        name = self.r.get(self._by_digest(d))
        if name is None:
            return None
        raw = self.r.hget(self.table, name.decode())
        if raw is None:
            return None
        token, stored = self._parse(name.decode(), raw)
        return token if secrets.compare_digest(stored, d) else None
