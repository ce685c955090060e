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
        uri = env.get("LIBVIRT_DEFAULT_URI", cls.libvirt_uri)
        return cls(
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
        )

    def with_redis_url(self, url: str) -> "Settings":
        """``--redis-url``: argv is visible to every local user, so it may not carry a password."""
        url = validate.redis_url(url, "redis_url")
        if validate.url_has_password(url):
            raise ConfigError("--redis-url must not carry a password (argv is visible in ps); put it in "
                              "DOMCAPTURE_REDIS_PASSWORD_FILE")
        return replace(self, redis_url=url)

    @property
    def rq_prefix(self) -> str:
        """The namespace of RQ's keys: under the deployment's prefix, so deployments never share jobs."""
        return f"{self.prefix}:rq"


def read_password_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"DOMCAPTURE_REDIS_PASSWORD_FILE: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"DOMCAPTURE_REDIS_PASSWORD_FILE: {path} is not UTF-8 text") from None
    password = text.rstrip("\r\n")
    if not password or "\n" in password or validate.has_control(password):
        raise ConfigError(f"DOMCAPTURE_REDIS_PASSWORD_FILE: {path} must hold one line, the password")
    return password


def process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
