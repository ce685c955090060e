"""Runtime configuration, from the environment (flags override in the CLI).

Every value goes through ``workflows.validate``: a bad one is refused with one
line naming the variable, before anything connects anywhere.

The Redis password never comes from argv (``ps`` shows argv to every local
user): it comes from ``DOMCAPTURE_REDIS_PASSWORD_FILE`` (a file holding it;
trailing newline ignored) or ``DOMCAPTURE_REDIS_PASSWORD``, or from
``DOMCAPTURE_REDIS_URL`` in the environment.  An ACL user name comes from
``DOMCAPTURE_REDIS_USERNAME`` or the URL.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace

from workflows import validate
from workflows.errors import ConfigError

ENV = {
    "DOMCAPTURE_REDIS_URL": "Redis URL (redis://, rediss:// or unix://)",
    "DOMCAPTURE_REDIS_PASSWORD": "Redis password (prefer the _FILE variant)",
    "DOMCAPTURE_REDIS_PASSWORD_FILE": "file holding the Redis password",
    "DOMCAPTURE_REDIS_USERNAME": "Redis ACL user",
    "DOMCAPTURE_REDIS_SENTINEL_PASSWORD_FILE": "file holding the sentinels' own password (redis+sentinel:// URLs)",
    "DOMCAPTURE_REDIS_REPLICA_ACKS": "replicas that must hold an intent before its effect (default 1 with "
                                     "redis+sentinel://, else 0)",
    "DOMCAPTURE_REDIS_ACK_TIMEOUT": "seconds an intent waits for those replicas (0.01 to 60, default 1)",
    "DOMCAPTURE_REDIS_FAILOVER_WAIT": "seconds a command keeps looking for a new primary (1 to 300, default 20)",
    "LIBVIRT_DEFAULT_URI": "libvirt URI",
    "DOMCAPTURE_PREFIX": "prefix of every Redis key of the deployment, RQ's included",
    "DOMCAPTURE_QUEUE": "RQ queue name",
    "DOMCAPTURE_LEASE_TTL": "lease time to live, seconds (0.5 to 300)",
    "DOMCAPTURE_RECOVERY_INTERVAL": "seconds between recovery sweeps (0.05 to 3600)",
    "DOMCAPTURE_RUN_DIR": "folder of pull-mode NBD sockets (default /run/domcapture)",
    "DOMCAPTURE_MANIFEST_KEY_FILE": "key file (0600, >= 32 bytes): sign backup manifests, refuse unsigned ones",
    "DOMCAPTURE_HOST": "worker: the host whose queue it serves (or 'libvirt': the name libvirt reports)",
    "DOMCAPTURE_FAULT": "fault injection for tests: kill-at:<pattern>",
}


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    libvirt_uri: str = ""  # empty: libvirt's own default (LIBVIRT_DEFAULT_URI)
    prefix: str = "dc"
    queue: str = "domcapture"
    lease_ttl: float = 5.0
    recovery_interval: float = 1.0
    redis_password: str | None = None
    redis_username: str | None = None
    sentinel_password: str | None = None
    replica_acks_set: int | None = None  # None: 1 with a Sentinel URL, 0 without
    ack_timeout: float = 1.0
    failover_wait: float = 20.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        password = env.get("DOMCAPTURE_REDIS_PASSWORD")
        pw_file = env.get("DOMCAPTURE_REDIS_PASSWORD_FILE")
        if password is not None and pw_file is not None:
            raise ConfigError("set DOMCAPTURE_REDIS_PASSWORD or DOMCAPTURE_REDIS_PASSWORD_FILE, not both")
        if pw_file is not None:
            password = read_password_file(validate.path("DOMCAPTURE_REDIS_PASSWORD_FILE", pw_file))
        elif password is not None:
            password = validate.text("DOMCAPTURE_REDIS_PASSWORD", password)
        if "DOMCAPTURE_RUN_DIR" in env:  # read by workflows.naming; checked here with the rest
            validate.path("DOMCAPTURE_RUN_DIR", env["DOMCAPTURE_RUN_DIR"])
        fault = env.get("DOMCAPTURE_FAULT")
        if fault is not None:
            kind, _, pattern = validate.text("DOMCAPTURE_FAULT", fault).partition(":")
            if kind != "kill-at" or not pattern:
                raise ConfigError(f"DOMCAPTURE_FAULT must look like kill-at:<pattern> (got {fault!r})")
        username = env.get("DOMCAPTURE_REDIS_USERNAME")
        s_file = env.get("DOMCAPTURE_REDIS_SENTINEL_PASSWORD_FILE")
        sentinel_password = read_password_file(validate.path("DOMCAPTURE_REDIS_SENTINEL_PASSWORD_FILE", s_file),
                                               "DOMCAPTURE_REDIS_SENTINEL_PASSWORD_FILE") if s_file else None
        acks = env.get("DOMCAPTURE_REDIS_REPLICA_ACKS")
        if acks is not None and not (acks.strip().isdigit() and int(acks) <= 16):
            raise ConfigError(f"DOMCAPTURE_REDIS_REPLICA_ACKS must be a whole number from 0 to 16 (got {acks!r})")
        uri = env.get("LIBVIRT_DEFAULT_URI", cls.libvirt_uri)
        out = cls(
            redis_url=validate.redis_url(env.get("DOMCAPTURE_REDIS_URL", cls.redis_url)),
            libvirt_uri=validate.libvirt_uri("LIBVIRT_DEFAULT_URI", uri) if uri else "",
            prefix=validate.key_part("DOMCAPTURE_PREFIX", env.get("DOMCAPTURE_PREFIX", cls.prefix)),
            queue=validate.key_part("DOMCAPTURE_QUEUE", env.get("DOMCAPTURE_QUEUE", cls.queue)),
            lease_ttl=validate.number("DOMCAPTURE_LEASE_TTL", env.get("DOMCAPTURE_LEASE_TTL", cls.lease_ttl),
                                      minimum=0.5, allow_minimum=True, maximum=300, unit=" of seconds"),
            recovery_interval=validate.number("DOMCAPTURE_RECOVERY_INTERVAL",
                                              env.get("DOMCAPTURE_RECOVERY_INTERVAL", cls.recovery_interval),
                                              minimum=0.05, allow_minimum=True, maximum=3600,
                                              unit=" of seconds"),
            redis_password=password,
            redis_username=validate.text("DOMCAPTURE_REDIS_USERNAME", username) if username is not None else None,
            sentinel_password=sentinel_password,
            replica_acks_set=int(acks) if acks is not None else None,
            ack_timeout=validate.number("DOMCAPTURE_REDIS_ACK_TIMEOUT", env.get("DOMCAPTURE_REDIS_ACK_TIMEOUT", 1.0),
                                        minimum=0.01, allow_minimum=True, maximum=60, unit=" of seconds"),
            failover_wait=validate.number("DOMCAPTURE_REDIS_FAILOVER_WAIT",
                                          env.get("DOMCAPTURE_REDIS_FAILOVER_WAIT", 20.0), minimum=1,
                                          allow_minimum=True, maximum=300, unit=" of seconds"),
        )
        if out.ack_timeout > out.lease_ttl * 0.5:
            # WAIT blocks the connection: it must end well inside the socket timeout (0.8 x the lease TTL)
            raise ConfigError(f"DOMCAPTURE_REDIS_ACK_TIMEOUT ({out.ack_timeout:g} s) must be at most half the "
                              f"lease TTL ({out.lease_ttl:g} s)")
        return out

    def with_redis_url(self, url: str) -> "Settings":
        """``--redis-url``: argv is visible to every local user, so it may not carry a password."""
        url = validate.redis_url(url, "redis_url")
        if validate.url_has_password(url):
            raise ConfigError("--redis-url must not carry a password (argv is visible in ps); put it in "
                              "DOMCAPTURE_REDIS_PASSWORD_FILE")
        return replace(self, redis_url=url)

    @property
    def replica_acks(self) -> int:
        """Replicas that must hold an intent before its effect runs (WAIT): 1 behind Sentinel by default."""
        if self.replica_acks_set is not None:
            return self.replica_acks_set
        return 1 if validate.is_sentinel_url(self.redis_url) else 0

    @property
    def rq_prefix(self) -> str:
        """The namespace of RQ's keys: under the deployment's prefix, so deployments never share jobs."""
        return f"{self.prefix}:rq"


def read_password_file(path: str, name: str = "DOMCAPTURE_REDIS_PASSWORD_FILE") -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: {path} is not UTF-8 text") from None
    password = text.rstrip("\r\n")
    if not password or "\n" in password or validate.has_control(password):
        raise ConfigError(f"{name}: {path} must hold one line, the password")
    return password


def process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
