"""Concurrency limits: counting semaphores in Redis, held with leases.

``P:limit:<name>`` is a sorted set of holders scored by the moment their lease
ends (Redis server time, milliseconds).  ``acquire`` takes every named limit
or none, in one Lua step, after dropping holders whose lease ended (a SIGKILLed
worker frees its place within one TTL).  The holder renews while it runs.

A workflow takes its limits before its first step runs, and keeps them until
its job ends: a limit is never waited on between a freeze and its thaw.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import redis

_ACQUIRE = """
-- KEYS: one sorted set per limit   ARGV: holder, ttl_ms, limit per key...
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if not redis.call('ZSCORE', key, ARGV[1]) and redis.call('ZCARD', key) >= tonumber(ARGV[i + 2]) then
    return {0, key}
  end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', key, tonumber(ARGV[2]) * 2)
end
return {1, ''}
"""

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = 0
for _, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1]) == 1 then held = held + 1 end
  redis.call('PEXPIRE', key, tonumber(ARGV[2]) * 2)
end
return held
"""


class Limits:
    def __init__(self, client: redis.Redis[bytes], prefix: str, ttl: float = 10.0) -> None:
        self.r, self.prefix, self.ttl = client, prefix, ttl
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)

    def key(self, name: str) -> str:
        return f"{self.prefix}:limit:{name}"

    def try_acquire(self, holder: str, limits: dict[str, int]) -> str | None:
        """Take every limit in ``limits`` (name -> how many at once) for ``holder``; None when taken,
        else the name of a limit that is full (nothing was taken)."""
        names = sorted(limits)
        res = self._acquire(keys=[self.key(n) for n in names],
                            args=[holder, int(self.ttl * 1000), *[limits[n] for n in names]])
        if int(res[0]) == 1:
            return None
        full: str = res[1].decode()
        return full.removeprefix(f"{self.prefix}:limit:")

    def renew(self, holder: str, names: list[str]) -> bool:
        return int(self._renew(keys=[self.key(n) for n in sorted(names)],
                               args=[holder, int(self.ttl * 1000)])) == len(names)

    def release(self, holder: str, names: list[str]) -> None:
        pipe = self.r.pipeline()
        for n in names:
            pipe.zrem(self.key(n), holder)
        pipe.execute()

    def holders(self, name: str) -> list[str]:
        now_ms = time.time() * 1000
        return [m.decode() for m, s in self.r.zrange(self.key(name), 0, -1, withscores=True) if s > now_ms]

    def held(self, holder: str, limits: dict[str, int], *, poll: float = 0.2,
             waiting: Callable[[str], None] | None = None) -> "Held":
        """Wait until every limit is taken; ``waiting(name)`` is told which one is full at each try."""
        while True:
            full = self.try_acquire(holder, limits)
            if full is None:
                return Held(self, holder, sorted(limits))
            if waiting is not None:
                waiting(full)
            time.sleep(poll)


class Held:
    """Held limits, renewed by a thread until ``release`` (a context manager)."""

    def __init__(self, limits: Limits, holder: str, names: list[str]) -> None:
        self.limits, self.holder, self.names = limits, holder, names
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"limits-{holder}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.limits.ttl / 3):
            try:
                self.limits.renew(self.holder, self.names)
            except redis.RedisError:
                pass  # the next round tries again; a lease that ends frees the place, as for a dead worker

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        self.limits.release(self.holder, self.names)

    def __enter__(self) -> "Held":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
