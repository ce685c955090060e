"""Parsers for every value a caller hands in: flags, environment variables, submit options.

Each parser takes the raw value (a string from argv or the environment, or a
typed value from a library caller), returns the typed value, and raises
``InputError`` with one line naming the flag and what is wrong.  They do no
I/O, so a refusal never has a side effect.

The ranges are the documented ones (README, "Command line" and
"Configuration"): numbers are finite; durations are positive; a bandwidth is
0 (unlimited) or at least one byte per second; names and paths are non-empty
and free of control characters; workflow ids match the id format before any
Redis call.  A libvirt URI passes ``libvirt_uri``'s allowlist (below) before
libvirt or the store sees it.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .errors import InputError

ID_RE = re.compile(r"^[0-9a-f]{16}$")
# libvirt accepts almost any domain name; these are the ones a shell, a path
# and a log line can carry without quoting surprises.
DOMAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+:-]{0,199}$")
# Redis key prefixes and queue names: part of every key of a deployment.
KEY_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# a disk's target as libvirt names it (vda, sdb, hdc, xvda, nvme0n1...)
DISK_TARGET_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
REDIS_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_TLS_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
                        r"(?::(?P<port>[0-9]{1,5}))?$")
MAX_SECONDS = 366 * 24 * 3600.0
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def flag(name: str) -> str:
    """``freeze_deadline`` -> ``--freeze-deadline``; environment names stay as they are."""
    return name if name.isupper() else f"--{name.replace('_', '-')}"


def has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def text(name: str, value: Any) -> str:
    """A non-empty string without control characters (newline, tab, NUL, escape...)."""
    if not isinstance(value, str):
        raise InputError(f"{flag(name)} must be a string (got {type(value).__name__})")
    if value == "" or value.strip() == "":
        raise InputError(f"{flag(name)} must not be empty")
    if has_control(value):
        raise InputError(f"{flag(name)} must not contain control characters (got {value!r})")
    return value


def path(name: str, value: Any) -> str:
    """A file system path: non-empty, no control characters."""
    return text(name, value)


def domain_name(value: object, name: str = "domain") -> str:
    out = text(name, value)
    if not DOMAIN_RE.match(out):
        raise InputError(f"{flag(name)} {out!r} is not a valid domain name (letters, digits and . _ + : -, "
                         "starting with a letter or digit, at most 200)")
    return out


def workflow_id(value: Any, name: str = "id") -> str:
    """A workflow id as ``new_id`` makes them: 16 lowercase hex digits."""
    if not isinstance(value, str) or not ID_RE.match(value):
        shown = value if isinstance(value, str) else type(value).__name__
        what = "" if name == "id" else f"{flag(name)}: "
        raise InputError(f"{what}{shown!r} is not a workflow id (16 lowercase hex digits, as 'list' shows)")
    return value


def key_part(name: str, value: object) -> str:
    """A Redis key prefix or queue name."""
    out = text(name, value)
    if not KEY_PART_RE.match(out):
        raise InputError(f"{flag(name)} {out!r} must be letters, digits and . _ - (at most 64, starting "
                         "with a letter or digit)")
    return out


def choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{flag(name)} must be one of {', '.join(choices)} (got {value!r})")
    return value


def disk_targets(name: str, value: Any) -> list[str] | None:
    """``--disks vda,vdb`` / ``--exclude vdc``: disk targets, comma separated (or a list); None when absent."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = text(name, value).split(",")
    out: list[str] = []
    for item in items:
        t = item.strip() if isinstance(item, str) else item
        if not isinstance(t, str) or not DISK_TARGET_RE.match(t):
            raise InputError(f"{flag(name)}: {t!r} is not a disk target (like vda or sdb)")
        if t in out:
            raise InputError(f"{flag(name)} names {t} twice")
        out.append(t)
    if not out:
        raise InputError(f"{flag(name)} must name at least one disk")
    return out


def log_level(value: Any, name: str = "log_level") -> str:
    return choice(name, value.upper() if isinstance(value, str) else value, LOG_LEVELS)


def number(name: str, value: Any, *, minimum: float = 0.0, maximum: float = MAX_SECONDS,
           allow_minimum: bool = False, unit: str = "") -> float:
    """A finite number in (minimum, maximum] (or [minimum, maximum] with ``allow_minimum``)."""
    if isinstance(value, bool):
        raise InputError(f"{flag(name)} must be a number{unit} (got {value!r})")
    try:
        out = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise InputError(f"{flag(name)} must be a number{unit} (got {value!r})") from None
    if not math.isfinite(out):
        raise InputError(f"{flag(name)} must be a finite number{unit} (got {value!r})")
    if out < minimum or (out == minimum and not allow_minimum):
        bound = f"at least {minimum:g}" if allow_minimum else ("positive" if minimum == 0 else
                                                               f"more than {minimum:g}")
        raise InputError(f"{flag(name)} must be {bound} (got {value!r})")
    if out > maximum:
        raise InputError(f"{flag(name)} must be at most {maximum:g}{unit} (got {value!r})")
    return out


def seconds(name: str, value: Any, default: float | None = None, *, maximum: float = MAX_SECONDS) -> float:
    """A positive, finite duration in seconds; ``default`` when the value is absent."""
    if value is None and default is not None:
        return default
    return number(name, value, maximum=maximum, unit=" of seconds")


MAX_KEY_FILE = 64 * 1024


def key_file(name: str, value: Any) -> str:
    """A file holding an encryption passphrase: readable, regular, non-empty; returned absolute.

    Only its path travels (into records and QEMU's ``secret,file=`` objects);
    its bytes are never read here.
    """
    where = os.path.abspath(path(name, value))
    try:
        st = os.stat(where)
    except OSError as exc:
        raise InputError(f"{flag(name)} {value}: {exc.strerror.lower() if exc.strerror else exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{flag(name)} {value} is not a regular file")
    if st.st_size == 0 or st.st_size > MAX_KEY_FILE:
        raise InputError(f"{flag(name)} {value} must hold 1 to {MAX_KEY_FILE} bytes (it holds {st.st_size})")
    if not os.access(where, os.R_OK):
        raise InputError(f"{flag(name)} {value} is not readable")
    return where


def bandwidth(value: Any, name: str = "bandwidth") -> int:
    """Bytes per second: ``50M``, ``512K``, ``1G``, ``1048576``; 0 means unlimited.

    Anything between 0 and one byte per second is refused: it would round to
    0, which means unlimited, the opposite of what was asked.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        raise InputError(f"{flag(name)} must look like 50M, 512K or a number of bytes/s (got {value!r})")
    if isinstance(value, (int, float)):
        raw = float(value)
        shown = value
    else:
        shown = value
        t = str(value).strip().upper().removesuffix("/S").removesuffix("IB").removesuffix("B")
        unit = t[-1:] if t[-1:] in "KMGT" else ""
        digits = t[:-1] if unit else t
        if not re.fullmatch(r"\d+(\.\d+)?|\.\d+", digits.strip()):
            raise InputError(f"{flag(name)} must look like 50M, 512K or a number of bytes/s (got {value!r})")
        raw = float(digits) * _UNITS[unit]
    if not math.isfinite(raw):
        raise InputError(f"{flag(name)} must be finite (got {shown!r})")
    if raw < 0:
        raise InputError(f"{flag(name)} must not be negative (got {shown!r})")
    if 0 < raw < 1:
        raise InputError(f"{flag(name)} must be 0 (unlimited) or at least 1 byte/s (got {shown!r})")
    if raw > 1024 ** 5:
        raise InputError(f"{flag(name)} must be at most 1P bytes/s (got {shown!r})")
    return int(raw)


@dataclass(frozen=True)
class SentinelURL:
    """``redis+sentinel://[user:pass@]host:port[,host:port...]/service[/db][?ssl_ca_certs=...]``, parsed.

    The user and password are those of the Redis servers (as in a ``redis://`` URL); ``rediss+sentinel``
    speaks TLS to the sentinels and to the servers alike.
    """

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool
    tls_params: tuple[tuple[str, str], ...]


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0] in SENTINEL_SCHEMES


def sentinel_url(value: object, name: str = "DOMCAPTURE_REDIS_URL") -> SentinelURL:
    """A Sentinel URL, or InputError naming what is wrong (one line, the password never shown)."""
    url = text(name, value)
    shown = _redact(url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SENTINEL_SCHEMES:
        raise InputError(f"{flag(name)} must start with redis+sentinel:// or rediss+sentinel:// (got {shown!r})")
    rest, _, query = rest.partition("?")
    netloc, _, path_part = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username, password = (user or None), (pw if colon else None)
    sentinels = []
    for item in hosts.split(","):
        m = _HOST_PORT.match(item)
        if not m:
            raise InputError(f"{flag(name)}: {item!r} is not a sentinel host[:port] (in {shown!r})")
        port = int(m["port"]) if m["port"] else 26379
        if not 0 < port < 65536:
            raise InputError(f"{flag(name)}: port {port} is out of range 1-65535")
        host = m["host"].strip("[]")
        if (host, port) in sentinels:
            raise InputError(f"{flag(name)} names sentinel {item} twice")
        sentinels.append((host, port))
    segments = path_part.split("/") if path_part else []
    if not segments or not segments[0]:
        raise InputError(f"{flag(name)} names no service: redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] "
                         f"(got {shown!r})")
    service = segments[0]
    if not KEY_PART_RE.match(service):
        raise InputError(f"{flag(name)}: service {service!r} must be letters, digits and . _ - (as in the "
                         "sentinels' 'sentinel monitor' line)")
    if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise InputError(f"{flag(name)}: database index {'/'.join(segments[1:])!r} must be a number")
    db = int(segments[1]) if len(segments) == 2 else 0
    tls_params = []
    for item in query.split("&") if query else []:
        key, eq, val = item.partition("=")
        if key not in SENTINEL_TLS_PARAMS or not eq or not val:
            raise InputError(f"{flag(name)}: parameter {key!r} is not accepted (accepted: "
                             f"{', '.join(SENTINEL_TLS_PARAMS)}=PATH)")
        if scheme != "rediss+sentinel":
            raise InputError(f"{flag(name)}: {key}= needs rediss+sentinel:// (TLS)")
        tls_params.append((key, path(key, val)))
    return SentinelURL(tuple(sentinels), service, db, username, password, scheme == "rediss+sentinel",
                       tuple(tls_params))


def redis_url(value: object, name: str = "DOMCAPTURE_REDIS_URL") -> str:
    """A Redis URL redis-py will accept: scheme, port and database index checked here."""
    url = text(name, value)
    if is_sentinel_url(url):
        sentinel_url(url, name)
        return url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InputError(f"{flag(name)}: {exc} in {_redact(url)!r}") from None
    if parts.scheme not in REDIS_SCHEMES:
        raise InputError(f"{flag(name)} must start with redis://, rediss://, unix:// or redis+sentinel:// "
                         f"(got {_redact(url)!r})")
    if parts.scheme != "unix" and not parts.hostname:
        raise InputError(f"{flag(name)} names no host (got {_redact(url)!r})")
    if port is not None and not 0 < port < 65536:
        raise InputError(f"{flag(name)}: port {port} is out of range 1-65535")
    db = parts.path.lstrip("/") if parts.scheme != "unix" else ""
    for q in parts.query.split("&"):
        if q.startswith("db="):
            db = q[3:]
    if db:
        if not db.isdigit():
            raise InputError(f"{flag(name)}: database index {db!r} must be a number (0 to the server's "
                             "'databases' setting minus 1)")
    return url


def url_has_password(value: str) -> bool:
    try:
        return urlsplit(value).password is not None
    except ValueError:
        return False


def _redact(url: str) -> str:
    """The URL with its password (if any) replaced, for error lines and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


redact = _redact


# -- libvirt URIs ---------------------------------------------------------------------------
# A libvirt URI is an address libvirt acts on: ``qemu+ext:///system?command=PATH`` runs PATH
# (as root, in a worker or the console), ``test:///PATH`` reads a file, ``socket=`` connects
# anywhere.  So every URI that enters (``--uri``, LIBVIRT_DEFAULT_URI, a policy's [hosts], the
# host registry, a record about to be opened) must be one of these shapes, spelled plainly.
URI_SCHEMES = ("qemu", "qemu+unix", "qemu+ssh", "qemu+tls", "qemu+tcp")
URI_PATHS = ("/system", "/session")
MAX_URI = 512
#: where a path-valued parameter may point (string prefixes; ``..`` and ``//`` refused)
URI_PATH_PARAMS: dict[str, tuple[str, ...]] = {
    "socket": ("/run/libvirt/", "/var/run/libvirt/"),
    "keyfile": ("/etc/domcapture/", "/root/.ssh/"),
    "known_hosts": ("/etc/domcapture/", "/root/.ssh/"),
    "pkipath": ("/etc/domcapture/", "/etc/pki/"),
}
URI_CHOICE_PARAMS: dict[str, tuple[str, ...]] = {
    "mode": ("auto", "legacy", "direct"), "proxy": ("auto", "netcat", "native"),
    "no_verify": ("0", "1"), "no_tty": ("0", "1"), "known_hosts_verify": ("normal", "auto", "ignore"),
}
# printable ASCII without '%' (libvirt unescapes parameters: %63ommand is command), ';' (a second
# parameter separator to libvirt), '#', quotes, spaces, backslashes and shell characters
_URI_CHARS = re.compile(r"^[A-Za-z0-9._~:/?&=@,+\[\]-]+$")
_URI_RE = re.compile(r"^(?P<scheme>[^:/?]+)://(?P<auth>[^/?]*)(?P<path>/[^?]*)?(?:\?(?P<query>.*))?$")
_URI_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
_URI_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])$")


def libvirt_uri(name: str, value: Any) -> str:
    """A libvirt URI from the allowlist (docs/security.md, "Hosts and URIs"), or InputError.

    Accepted: ``qemu``, ``qemu+unix``, ``qemu+ssh``, ``qemu+tls``, ``qemu+tcp`` (lowercase), a path
    of ``/system`` or ``/session``, an optional ``[user@]host[:port]`` (none for ``qemu+unix``),
    and only the parameters in URI_PATH_PARAMS (under their folders) and URI_CHOICE_PARAMS.
    No ``ext`` transport, no ``command=``/``netcat=``/``name=``, no percent-escapes.
    """
    uri = text(name, value)
    shown = repr(uri if len(uri) <= 80 else uri[:77] + "...")
    what = f"{flag(name)} {shown}"
    if len(uri) > MAX_URI:
        raise InputError(f"{flag(name)} is {len(uri)} characters long; a libvirt URI here is at most {MAX_URI}")
    if "ext" in uri.split(":", 1)[0].lower().split("+")[1:]:
        raise InputError(f"{what}: the 'ext' transport runs a local program; it is never accepted")
    if not _URI_CHARS.match(uri):
        bad = next(c for c in uri if not _URI_CHARS.match(c))
        raise InputError(f"{what}: character {bad!r} is not accepted in a libvirt URI (no percent-escapes, "
                         "spaces, quotes or ';')")
    m = _URI_RE.match(uri)
    if not m:
        raise InputError(f"{what} is not a libvirt URI like qemu:///system or qemu+ssh://user@host/system")
    scheme, auth, upath, query = m["scheme"], m["auth"], m["path"] or "", m["query"]
    if scheme not in URI_SCHEMES:
        raise InputError(f"{what}: scheme {scheme!r} is not accepted; use one of {', '.join(URI_SCHEMES)}")
    if upath not in URI_PATHS:
        raise InputError(f"{what}: the path must be /system or /session (got {upath or 'none'!r})")
    if auth:
        if scheme == "qemu+unix":
            raise InputError(f"{what}: qemu+unix names no host")
        user, _, hostport = auth.rpartition("@")
        host, port = hostport, ""
        if not hostport.endswith("]") and ":" in hostport:
            host, _, port = hostport.rpartition(":")
        if user and not _URI_USER.match(user):
            raise InputError(f"{what}: user {user!r} must be letters, digits and . _ - (not starting with '-')")
        if not _URI_HOST.match(host):
            raise InputError(f"{what}: host {host!r} is not a host name or address (not starting with '-')")
        if port and (not port.isdigit() or not 0 < int(port) < 65536):
            raise InputError(f"{what}: port {port!r} must be 1 to 65535")
    seen: set[str] = set()
    for item in (query.split("&") if query is not None else []):
        key, eq, val = item.partition("=")
        if key in seen:
            raise InputError(f"{what}: parameter {key!r} is given twice")
        seen.add(key)
        if key in URI_CHOICE_PARAMS:
            if val not in URI_CHOICE_PARAMS[key]:
                raise InputError(f"{what}: {key}= must be one of {', '.join(URI_CHOICE_PARAMS[key])}")
        elif key in URI_PATH_PARAMS:
            roots = URI_PATH_PARAMS[key]
            if not eq or os.path.normpath(val) != val or not any(val.startswith(r) and len(val) > len(r)
                                                                  for r in roots):
                raise InputError(f"{what}: {key}= must be a plain path under {' or '.join(roots)}")
        else:
            accepted = sorted((*URI_PATH_PARAMS, *URI_CHOICE_PARAMS))
            raise InputError(f"{what}: parameter {key!r} is not accepted (accepted: {', '.join(accepted)})")
    return uri


def host_name(value: Any, name: str = "host") -> str:
    """A registered host's name: letters, digits and . _ - (at most 64), the per-host queue's suffix."""
    return key_part(name, value)
