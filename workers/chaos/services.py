"""The processes a chaos run starts, and the host services its faults hit.

The run's Redis is always its own redis-server (AOF, ``appendfsync always``)
on a free port in its work folder: killing or stopping it hurts no one else.
libvirtd is the host's: its faults (restart, stall) touch every client of
it, which docs/chaos.md says.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .domains import URI, run

LIBVIRTD_STOP_WITHIN = 30.0  # then SIGKILL, as a service manager's restart does after its stop timeout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Redis:
    """A redis-server of the run's own, so killing it hurts no one else."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with open(self.dir / "redis.log", "a") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                stdout=log, stderr=subprocess.STDOUT)
        for _ in range(100):
            if run("redis-cli", "-p", str(self.port), "ping", check=False).stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("the run's redis-server did not start")

    def signal(self, sig: int) -> bool:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            return True
        return False

    def kill(self) -> None:
        if self.signal(signal.SIGKILL) and self.proc:
            self.proc.wait()

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def libvirtd_pids() -> list[int]:
    out = run("pgrep", "-x", "libvirtd", check=False).stdout
    return [int(p) for p in out.split()]


def libvirtd_answers() -> bool:
    return run("virsh", "-c", URI, "version", check=False, timeout=30).returncode == 0


def restart_libvirtd() -> None:
    """SIGTERM libvirtd, wait until it is gone (SIGKILL after 30 s), start it again, wait until it answers.

    Starting the new one while the old one still holds its pid file fails, and
    libvirtd then stayed down until the next fault: a restart here really restarts.
    """
    for pid in libvirtd_pids():
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + LIBVIRTD_STOP_WITHIN
    while pids := libvirtd_pids():
        if time.time() > deadline:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    for _ in range(3):
        subprocess.run(["/usr/sbin/libvirtd", "-d"], check=False)
        for _ in range(100):
            if libvirtd_answers():
                return
            time.sleep(0.1)


def stall_libvirtd(seconds: float) -> None:
    """SIGSTOP of libvirtd for ``seconds``, then SIGCONT (always, even if the wait is interrupted)."""
    pids = libvirtd_pids()
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
    finally:
        continue_libvirtd(pids)


def continue_libvirtd(pids: list[int] | None = None) -> None:
    for pid in libvirtd_pids() if pids is None else pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


class Tmpfs:
    """A small tmpfs of the run's own: a backup target or an overlay folder that a fault fills."""

    def __init__(self, path: Path, size_mib: int) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        run("mount", "-t", "tmpfs", "-o", f"size={size_mib}M,mode=0700", "tmpfs", str(path))

    def fill(self, hold: float) -> None:
        """Fill it to the last byte, hold it full for ``hold`` seconds, then free the room."""
        filler = self.path / "chaos-filler"
        try:
            with open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * (1 << 20))
        except OSError:
            pass
        time.sleep(hold)
        filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        run("umount", "-l", str(self.path), check=False)


class Cluster:
    """``domcapture worker`` and ``domcapture recovery`` processes on the run's Redis, prefix and queue."""

    def __init__(self, redis_url: str, logdir: Path, lease_ttl: float) -> None:
        self.env = {**os.environ, "DOMCAPTURE_REDIS_URL": redis_url, "LIBVIRT_DEFAULT_URI": URI,
                    "DOMCAPTURE_PREFIX": "chaos", "DOMCAPTURE_QUEUE": "chaos-q",
                    "DOMCAPTURE_LEASE_TTL": str(lease_ttl), "DOMCAPTURE_RECOVERY_INTERVAL": "0.5"}
        self.env.pop("DOMCAPTURE_FAULT", None)
        self.logdir = logdir
        logdir.mkdir(parents=True, exist_ok=True)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.recovery: subprocess.Popen[bytes] | None = None
        self._n = 0

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "workers.cli", *args]

    def _spawn(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self._n += 1
        with open(self.logdir / f"{self._n:02d}-{args[0]}.log", "w") as log:
            return subprocess.Popen(self.command("--log-level", "INFO", *args), env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def start_worker(self, fault: str | None = None) -> subprocess.Popen[bytes]:
        env = dict(self.env, **({"DOMCAPTURE_FAULT": fault} if fault else {}))
        p = self._spawn(["worker"], env)
        self.workers.append(p)
        return p

    def start_recovery(self) -> subprocess.Popen[bytes]:
        self.recovery = self._spawn(["recovery"], self.env)
        return self.recovery

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), env=self.env, capture_output=True, text=True, timeout=timeout)

    @staticmethod
    def kill(p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def stop(self) -> None:
        for p in self.workers + ([self.recovery] if self.recovery else []):
            self.kill(p)
