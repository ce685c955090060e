"""``domcapture web``: the console and ``/metrics`` on one HTTP server (uvicorn).

Authentication, one of:
- a shared token: ``--token-file PATH`` (or env ``DOMCAPTURE_WEB_TOKEN``);
- a user file: ``--users PATH`` (format and roles in ``workers.webauth``; add a user
  or change a password with ``domcapture web --users PATH --add-user NAME [--role ROLE]``,
  password on stdin; ``--remove-user NAME``; either ends that user's console sessions);
- ``--no-auth``, only together with a loopback ``--bind``.

The app itself is imported only when the command runs, so the other
commands do not pay for Starlette and Jinja.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from workflows.errors import InputError

from .runtime import Runtime
from .webauth import ROLES, Auth, AuthConfigError, Sessions, add_user, is_loopback, load_users, read_secret_file, \
    remove_user

DEFAULT_BIND = "127.0.0.1:8080"
METRICS_MODES = ("loopback", "open", "token")


def parse_bind(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--bind {text!r}: expected HOST:PORT, e.g. {DEFAULT_BIND}")
    return host, int(port)


def _env_path(value: str | None, env: str) -> Path | None:
    raw = value or os.environ.get(env)
    return Path(raw) if raw else None


def auth_from(args: argparse.Namespace, host: str) -> Auth:
    try:
        users_path = _env_path(args.users, "DOMCAPTURE_WEB_USERS")
        token_path = _env_path(args.token_file, "DOMCAPTURE_WEB_TOKEN_FILE")
        token = read_secret_file(token_path, "token") if token_path else os.environ.get("DOMCAPTURE_WEB_TOKEN")
        if token is not None and len(token) < 16:
            raise AuthConfigError("DOMCAPTURE_WEB_TOKEN: needs at least 16 characters")
        users = load_users(users_path) if users_path else {}
        if users_path and not users:
            raise AuthConfigError(f"user file {users_path}: no user in it")
        mpath = _env_path(args.metrics_token_file, "DOMCAPTURE_METRICS_TOKEN_FILE")
        metrics_token = read_secret_file(mpath, "metrics token") if mpath else None
    except AuthConfigError as exc:
        raise InputError(str(exc)) from None
    metrics = args.metrics or os.environ.get("DOMCAPTURE_METRICS_AUTH", "loopback")
    if metrics not in METRICS_MODES:
        raise InputError(f"--metrics {metrics!r}: choose one of {', '.join(METRICS_MODES)}")
    if metrics == "token" and not metrics_token:
        raise InputError("--metrics token needs --metrics-token-file")
    if args.no_auth:
        if users or token:
            raise InputError("--no-auth conflicts with --users / a token")
        if not is_loopback(host) and host != "localhost":
            raise InputError(f"--no-auth is allowed only on a loopback address, not {host}")
        return Auth(no_auth=True, metrics=metrics, metrics_token=metrics_token)
    if not users and token is None:
        raise InputError("no authentication configured: give --token-file, --users (or env DOMCAPTURE_WEB_TOKEN, "
                         "DOMCAPTURE_WEB_USERS), or --no-auth on a loopback address")
    return Auth(token=token, users=users, metrics=metrics, metrics_token=metrics_token, users_path=users_path)


def cmd_change_user(args: argparse.Namespace, rt: Runtime) -> int:
    """--add-user / --remove-user: change the user file, end that user's sessions, record it in the audit log."""
    from workflows.audit import AuditLog, cli_actor
    if not args.users:
        raise InputError(f"{'--add-user' if args.add_user else '--remove-user'} needs --users PATH")
    name = args.add_user or args.remove_user
    log = AuditLog(rt.store.r, rt.settings.prefix)
    try:
        if args.add_user and args.remove_user:
            raise AuthConfigError("--add-user and --remove-user: give one")
        if args.role is not None and args.role not in ROLES:
            raise AuthConfigError(f"--role {args.role!r}: choose one of {', '.join(ROLES)}")
        if args.add_user:
            password = getpass.getpass(f"password for {name}: ") if sys.stdin.isatty() \
                else sys.stdin.readline().rstrip("\n")
            if len(password) < 8:
                raise AuthConfigError("password: at least 8 characters")
            user = add_user(Path(args.users), name, password, args.role)
            action, what = "user-set", f"user {name} set ({user.role})"
        else:
            remove_user(Path(args.users), name)
            action, what = "user-remove", f"user {name} removed"
    except AuthConfigError as exc:
        raise InputError(str(exc)) from None
    ended = Sessions(rt.store.r, rt.settings.prefix).end_user(name)
    log.append(cli_actor(), action, name, "ok", role=args.role, sessions_ended=ended, file=str(args.users))
    print(f"{args.users}: {what}; {ended} console session(s) ended")
    return 0


def cmd_web(args: argparse.Namespace, rt: Runtime) -> int:
    if args.add_user or args.remove_user:
        return cmd_change_user(args, rt)
    if args.role is not None:
        raise InputError("--role goes with --add-user")
    host, port = parse_bind(args.bind or os.environ.get("DOMCAPTURE_WEB_BIND", DEFAULT_BIND))
    auth = auth_from(args, host)
    secret_path = _env_path(args.secret_file, "DOMCAPTURE_WEB_SECRET_FILE")
    try:
        # without a secret file, sessions last as long as this process
        secret = read_secret_file(secret_path, "session secret") if secret_path else secrets.token_urlsafe(32)
    except AuthConfigError as exc:
        raise InputError(str(exc)) from None
    read_only = args.read_only or os.environ.get("DOMCAPTURE_WEB_READ_ONLY") == "1"
    rt.store.ping()

    import uvicorn

    from .webapp import WebConfig, create_app
    app = create_app(rt, WebConfig(auth=auth, read_only=read_only, secret=secret,
                                   secure_cookie=args.secure_cookie))
    # proxy_headers off: a client's X-Forwarded-For is not its address (the audit log and the login limit
    # use the address the connection comes from)
    uvicorn.run(app, host=host, port=port, log_level=str(args.log_level or "info").lower(), access_log=False,
                proxy_headers=False)
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("web", help="the web console and /metrics (HTTP)")
    s.add_argument("--bind", help=f"HOST:PORT to listen on (default {DEFAULT_BIND}; env DOMCAPTURE_WEB_BIND)")
    s.add_argument("--token-file", help="file holding the login token (env DOMCAPTURE_WEB_TOKEN_FILE, "
                   "or the token itself in DOMCAPTURE_WEB_TOKEN)")
    s.add_argument("--users", help="user file: name:scrypt$... lines (env DOMCAPTURE_WEB_USERS)")
    s.add_argument("--add-user", metavar="NAME", help="add a user to --users or change one's password (on stdin), "
                   "end that user's console sessions, exit")
    s.add_argument("--role", help=f"with --add-user: {', '.join(ROLES)} (default: a new user operator, "
                   "an existing one keeps its role)")
    s.add_argument("--remove-user", metavar="NAME", help="remove a user from --users, end its sessions, exit")
    s.add_argument("--no-auth", action="store_true", help="no login (only with a loopback --bind)")
    s.add_argument("--read-only", action="store_true", help="everyone acts as a viewer: show everything, refuse "
                   "every action (env DOMCAPTURE_WEB_READ_ONLY=1)")
    s.add_argument("--secret-file", help="session signing key (env DOMCAPTURE_WEB_SECRET_FILE; default: random "
                   "per process, so a restart logs everyone out)")
    s.add_argument("--secure-cookie", action="store_true", help="send the session cookie over HTTPS only")
    s.add_argument("--metrics", choices=METRICS_MODES, help="who may GET /metrics: loopback clients (default), "
                   "anyone, or holders of the metrics token (env DOMCAPTURE_METRICS_AUTH)")
    s.add_argument("--metrics-token-file", help="bearer token for /metrics (env DOMCAPTURE_METRICS_TOKEN_FILE)")
    s.add_argument("--json", action="store_true", help="log as JSON lines")
    s.set_defaults(func=cmd_web, daemon=True)
