"""``domcapture web``: the console and ``/metrics`` on one HTTP server (uvicorn).

Authentication, one of:
- a shared token: ``--token-file PATH`` (or env ``DOMCAPTURE_WEB_TOKEN``);
- a user file: ``--users PATH`` (format in ``workers.webauth``; add a user with
  ``domcapture web --users PATH --add-user NAME``, password on stdin);
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
from .webauth import Auth, AuthConfigError, add_user, is_loopback, load_users, read_secret_file

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
    return Auth(token=token, users=users, metrics=metrics, metrics_token=metrics_token)


def cmd_add_user(args: argparse.Namespace) -> int:
    if not args.users:
        raise InputError("--add-user needs --users PATH")
    password = getpass.getpass(f"password for {args.add_user}: ") if sys.stdin.isatty() \
        else sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        raise InputError("password: at least 8 characters")
    try:
        add_user(Path(args.users), args.add_user, password)
    except AuthConfigError as exc:
        raise InputError(str(exc)) from None
    print(f"{args.users}: user {args.add_user} set")
    return 0


def cmd_web(args: argparse.Namespace, rt: Runtime) -> int:
    if args.add_user:
        return cmd_add_user(args)
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
    uvicorn.run(app, host=host, port=port, log_level=str(args.log_level or "info").lower(), access_log=False)
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("web", help="the web console and /metrics (HTTP)")
    s.add_argument("--bind", help=f"HOST:PORT to listen on (default {DEFAULT_BIND}; env DOMCAPTURE_WEB_BIND)")
    s.add_argument("--token-file", help="file holding the login token (env DOMCAPTURE_WEB_TOKEN_FILE, "
                   "or the token itself in DOMCAPTURE_WEB_TOKEN)")
    s.add_argument("--users", help="user file: name:scrypt$... lines (env DOMCAPTURE_WEB_USERS)")
    s.add_argument("--add-user", metavar="NAME", help="add or replace a user in --users (password on stdin), exit")
    s.add_argument("--no-auth", action="store_true", help="no login (only with a loopback --bind)")
    s.add_argument("--read-only", action="store_true", help="show everything, refuse every action "
                   "(env DOMCAPTURE_WEB_READ_ONLY=1)")
    s.add_argument("--secret-file", help="session signing key (env DOMCAPTURE_WEB_SECRET_FILE; default: random "
                   "per process, so a restart logs everyone out)")
    s.add_argument("--secure-cookie", action="store_true", help="send the session cookie over HTTPS only")
    s.add_argument("--metrics", choices=METRICS_MODES, help="who may GET /metrics: loopback clients (default), "
                   "anyone, or holders of the metrics token (env DOMCAPTURE_METRICS_AUTH)")
    s.add_argument("--metrics-token-file", help="bearer token for /metrics (env DOMCAPTURE_METRICS_TOKEN_FILE)")
    s.add_argument("--json", action="store_true", help="log as JSON lines")
    s.set_defaults(func=cmd_web, daemon=True)
