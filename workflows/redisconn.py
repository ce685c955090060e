"""How every process reaches Redis: one server by its URL, or the primary of a Sentinel set.

With a ``redis+sentinel://`` URL (``workflows.validate.sentinel_url``) the client is redis-py's
``Sentinel.master_for``: each new connection asks the sentinels for the current primary, a
connection to a demoted primary (``READONLY``) is dropped, and every command is tried again
with back-off for ``failover_wait`` seconds, so a process finds a newly promoted primary by
itself.  The same client serves the store and RQ (queues and workers take it as their
connection).
"""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection

from . import validate

T = TypeVar("T")
#: the longest pause between two tries while the sentinels elect a new primary
RETRY_CAP = 0.25


class FailoverRetry(Retry):
    """redis-py's Retry bounded by time, not by a count: a command (or a connect, which redis-py tries
    inside the command's own tries) is tried again until ``within`` seconds have passed since its first
    try, the pause growing from 20 ms to ``RETRY_CAP``."""

    def __init__(self, within: float) -> None:
        super().__init__(ExponentialBackoff(cap=RETRY_CAP, base=0.02), retries=-1)
        self.within = within

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:
        deadline = time.monotonic() + self.within

        def again(error: Exception) -> bool:
            return time.monotonic() < deadline and (is_retryable is None or is_retryable(error))
        return super().call_with_retry(do, fail, is_retryable=again,  # type: ignore[call-arg]  # stubs of redis 4
                                       with_failure_count=with_failure_count)


class PrimaryConnection(SentinelManagedConnection):
    """A connection to the address the sentinels name, kept only if that server says it is the primary.

    A sentinel that has not yet learnt of a failover still names the old primary; if that machine came
    back (empty, as a replica) on the same address, redis-py would read from it: a workflow's record
    would look missing.  Writes to it fail (READONLY) and are retried, reads would not, so every new
    connection asks ``INFO replication`` (allowed to the project's ACL user, unlike ROLE) first.
    """

    def connect_to(self, address: tuple[str, int]) -> None:
        super().connect_to(address)
        if not self.connection_pool.is_master:
            return
        self.send_command("INFO", "replication")
        info = self.read_response()
        text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
        if "role:master" not in text:
            self.disconnect()
            raise redis.ConnectionError(f"{address[0]}:{address[1]} is not the primary now (a sentinel's "
                                        "answer was out of date); asking again")


class PrimarySSLConnection(PrimaryConnection, SentinelManagedSSLConnection):
    pass


def connect(url: str, *, timeout: float, creds: dict[str, Any], sentinel_password: str | None = None,
            failover_wait: float = 20.0) -> redis.Redis[bytes]:
    """A client on ``url``; ``timeout`` bounds every socket wait, ``creds`` are the servers' user and password."""
    if not validate.is_sentinel_url(url):
        return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                    health_check_interval=10, **creds)
    spec = validate.sentinel_url(url)
    tls: dict[str, Any] = {"ssl": True, **dict(spec.tls_params)} if spec.tls else {}
    server_tls = {k: v for k, v in tls.items() if k != "ssl"}  # the connection class says TLS
    server_creds = dict(creds)
    if spec.password is not None:
        server_creds.setdefault("password", spec.password)
    if spec.username is not None:
        server_creds.setdefault("username", spec.username)
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": timeout, "socket_timeout": timeout, **tls}
    if sentinel_password is not None:
        sentinel_kwargs["password"] = sentinel_password
    sentinel = Sentinel(list(spec.sentinels), sentinel_kwargs=sentinel_kwargs)
    client: redis.Redis[bytes] = sentinel.master_for(
        spec.service, redis_class=redis.Redis, db=spec.db, socket_connect_timeout=timeout, socket_timeout=timeout,
        health_check_interval=10, retry=FailoverRetry(failover_wait),
        connection_class=PrimarySSLConnection if spec.tls else PrimaryConnection, **server_tls, **server_creds)
    return client


def primary_address(client: redis.Redis[bytes]) -> tuple[str, int] | None:
    """Where a Sentinel client's primary is now (asked of the sentinels), or None for a plain client."""
    pool = client.connection_pool
    get = getattr(pool, "get_master_address", None)
    if get is None:
        return None
    host, port = get()
    return str(host), int(port)
