"""The host registry: the libvirt hosts a deployment reaches, by name.

A host name is what the rest of the project already calls a host: the suffix
of a per-host queue (``<queue>.<host>``, ``worker --host NAME``) and a key of
a policy's ``[hosts]``.  The registry adds the other half, the URI that
reaches it, so that a caller outside the operator's shell (the web console)
names a host and never types a URI.

- ``P:host-uris`` (hash): name -> libvirt URI, written by ``host add`` and
  ``policy apply`` (its ``[hosts]``), after the URI allowlist
  (``validate.libvirt_uri``);
- ``P:hosts`` (hash, the existing routing map): URI -> name, so a workflow on
  that URI goes to the host's queue.  ``host add`` sets it only when the URI is
  not routed yet; ``host remove`` clears it only when it names that host.

``default`` is the deployment's own URI (``LIBVIRT_DEFAULT_URI``): always
there, never stored, never removed.
"""

from __future__ import annotations

import redis

from . import validate
from .errors import InputError, RecordNotFound

DEFAULT = "default"


class UnknownHost(RecordNotFound):
    """A host name the registry does not hold (exit 2; 404 on the console)."""


class HostConflict(InputError):
    """A host name already registered with another URI."""


class HostRegistry:
    def __init__(self, client: redis.Redis[bytes], prefix: str, default_uri: str) -> None:
        self.r, self.prefix, self.default_uri = client, prefix, default_uri
        self.key = f"{prefix}:host-uris"
        self.routes = f"{prefix}:hosts"

    def all(self) -> dict[str, str]:
        """Every host, ``default`` first (its URI '' when libvirt's own default is used)."""
        stored = {k.decode(): v.decode() for k, v in self.r.hgetall(self.key).items()}
        return {DEFAULT: self.default_uri, **dict(sorted(stored.items()))}

    def uri(self, name: str) -> str:
        """The URI of a registered host; UnknownHost otherwise.  A name is checked before any Redis call."""
        name = validate.host_name(name)
        if name == DEFAULT:
            return self.default_uri
        raw = self.r.hget(self.key, name)
        if raw is None:
            raise UnknownHost(f"unknown host {name!r}; see 'domcapture host list'")
        return validate.libvirt_uri("URI", raw.decode())

    def name_of(self, uri: str) -> str | None:
        """The registered name whose URI is ``uri`` (exactly as stored), if any."""
        if uri == self.default_uri:
            return DEFAULT
        for name, known in self.all().items():
            if known == uri:
                return name
        return None

    def check(self, hosts: dict[str, str]) -> dict[str, str]:
        """Check names and URIs (allowlist) and that none conflicts with a registered host; no write."""
        out: dict[str, str] = {}
        for name, uri in hosts.items():
            name = validate.host_name(name)
            try:
                uri = validate.libvirt_uri("URI", uri)
            except InputError as exc:
                raise InputError(f"host {name}: {exc}") from None
            if name == DEFAULT:
                if uri != self.default_uri:
                    raise HostConflict(f"host name {DEFAULT!r} is the deployment's own URI "
                                       f"({self.default_uri or 'libvirt default'}); choose another name")
                continue
            known = self.r.hget(self.key, name)
            if known is not None and known.decode() != uri:
                raise HostConflict(f"host {name!r} is registered as {known.decode()!r}, not {uri!r}; "
                                   f"'domcapture host remove {name}' first")
            out[name] = uri
        return out

    def add(self, hosts: dict[str, str]) -> None:
        """Register hosts (all checked first, so a refusal writes nothing) and route their URIs."""
        checked = self.check(hosts)
        if not checked:
            return
        pipe = self.r.pipeline()
        for name, uri in checked.items():
            pipe.hset(self.key, name, uri)
            pipe.hsetnx(self.routes, uri, name)
        pipe.execute()

    def remove(self, name: str) -> str:
        """Unregister a host; returns the URI it had."""
        name = validate.host_name(name)
        if name == DEFAULT:
            raise InputError(f"host {DEFAULT!r} is the deployment's own URI (LIBVIRT_DEFAULT_URI); it cannot be "
                             "removed")
        raw = self.r.hget(self.key, name)
        if raw is None:
            raise UnknownHost(f"unknown host {name!r}; see 'domcapture host list'")
        uri = raw.decode()
        self.r.hdel(self.key, name)
        if (self.r.hget(self.routes, uri) or b"").decode() == name:
            self.r.hdel(self.routes, uri)
        return uri
