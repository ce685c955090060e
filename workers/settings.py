"""Runtime configuration, from the environment (flags override in the CLI)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    libvirt_uri: str = ""  # empty: libvirt's own default (LIBVIRT_DEFAULT_URI)
    prefix: str = "dc"
    queue: str = "domcapture"
    lease_ttl: float = 5.0
    recovery_interval: float = 1.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        return cls(
            redis_url=env.get("DOMCAPTURE_REDIS_URL", cls.redis_url),
            libvirt_uri=env.get("LIBVIRT_DEFAULT_URI", cls.libvirt_uri),
            prefix=env.get("DOMCAPTURE_PREFIX", cls.prefix),
            queue=env.get("DOMCAPTURE_QUEUE", cls.queue),
            lease_ttl=float(env.get("DOMCAPTURE_LEASE_TTL", cls.lease_ttl)),
            recovery_interval=float(env.get("DOMCAPTURE_RECOVERY_INTERVAL", cls.recovery_interval)),
        )


def process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
