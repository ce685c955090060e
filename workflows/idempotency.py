"""Idempotent submits: one workflow per ``Idempotency-Key``, however often or concurrently it is sent.

``P:idem:<sha256 of the key>`` holds ``<request digest>|pending`` while the first
submit with that key runs, then ``<request digest>|<workflow id>``.  The claim is
one ``SET NX`` (with ``PENDING_TTL``, so a submit that died half way frees its key),
so of any number of concurrent submits with one key exactly one goes on to
``Captures.submit``; the others wait for its id (up to ``WAIT``) and return it.
A submit the library refused frees the key (nothing was recorded, so a retry may
go on).  Once the id is there the key lives ``KEY_TTL`` (25 hours: at least the
24 hours promised in docs/api.md).  The same key with another request (another
strategy, domain, host or options) is refused with ``IdempotencyConflict``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis

from .errors import DomcaptureError, InputError, InvalidOperation
from .record import Record

KEY_TTL = 25 * 3600
PENDING_TTL = 120
WAIT = 60.0
KEY_MAX = 200


class IdempotencyConflict(InputError):
    """The key was used with another request: the caller's mistake (exit 2, HTTP 409)."""

    exit_code = 2


@dataclass(frozen=True)
class Outcome:
    workflow_id: str
    replayed: bool  # True: an earlier submit with this key made it; nothing new was recorded


def check_key(key: object) -> str:
    if not isinstance(key, str) or not 1 <= len(key) <= KEY_MAX or any(ord(c) < 33 or ord(c) > 126 for c in key):
        raise InputError(f"idempotency key: 1-{KEY_MAX} printable ASCII characters without spaces")
    return key


def request_digest(strategy: str, domain: str, host: str, options: dict[str, Any]) -> str:
    doc = json.dumps({"strategy": strategy, "domain": domain, "host": host, "options": options}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


class Idempotency:
    def __init__(self, client: redis.Redis[bytes], prefix: str) -> None:
        self.r = client
        self.prefix = prefix

    def _k(self, key: str) -> str:
        return f"{self.prefix}:idem:{hashlib.sha256(key.encode()).hexdigest()}"

    def lookup(self, key: str) -> tuple[str, str] | None:
        raw = self.r.get(self._k(key))
        if raw is None:
            return None
        digest, _, value = raw.decode().partition("|")
        return digest, value

    def submit(self, key: str, digest: str, submit: Callable[[], Record], *, wait: float = WAIT) -> Outcome:
        """Run ``submit`` once for ``key``; every other call with the key gets that workflow's id."""
        k = self._k(check_key(key))
        deadline = time.monotonic() + wait
        while True:
            if self.r.set(k, f"{digest}|pending", nx=True, ex=PENDING_TTL):
                try:
                    rec = submit()
                except DomcaptureError:
                    self.r.delete(k)  # refused: nothing recorded, the key is free again
                    raise
                except BaseException:
                    raise  # unknown outcome: the pending mark expires by itself
                self.r.set(k, f"{digest}|{rec.id}", ex=KEY_TTL)
                return Outcome(rec.id, False)
            found = self.lookup(key)
            if found is None:
                continue  # freed in between: try to claim it again
            theirs, value = found
            if theirs != digest:
                raise IdempotencyConflict("idempotency key: already used with another request (another "
                                          "strategy, domain, host or options); use a new key")
            if value != "pending":
                return Outcome(value, True)
            if time.monotonic() > deadline:
                raise InvalidOperation("idempotency key: the first submit with this key is still running; "
                                       "try again")
            time.sleep(0.05)
