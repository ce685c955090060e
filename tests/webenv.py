"""A real ``domcapture web`` process for tests, on the cluster's prefix and queue, on a free port."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from .realenv import DOMCAPTURE

ARTIFACTS = Path(os.environ.get("DOMCAPTURE_TEST_ARTIFACTS", "/tmp/domcapture-test-artifacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 20, proc: subprocess.Popen | None = None) -> httpx.Response:
    deadline = time.time() + timeout
    while True:
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{url}: the server exited with {proc.returncode}") from None
            if time.time() > deadline:
                raise
            time.sleep(0.1)


class WebServer:
    def __init__(self, env: dict[str, str], logdir: Path, *extra: str, host: str = "127.0.0.1") -> None:
        self.token = secrets.token_urlsafe(24)
        logdir.mkdir(parents=True, exist_ok=True)
        self.token_file = logdir / "web-token"
        self.token_file.write_text(self.token + "\n")
        self.port = free_port()
        self.host = host
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '127.0.0.1') else host}:{self.port}"
        self.log = open(logdir / f"web-{self.port}.log", "w")
        self.proc = subprocess.Popen([DOMCAPTURE, "web", "--bind", f"{host}:{self.port}",
                                      "--token-file", str(self.token_file), *extra],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.url}/healthz", proc=self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


def artifact_dir(name: str) -> Path:
    d = ARTIFACTS / name
    d.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots and logs of {name}: {d}")
    return d
