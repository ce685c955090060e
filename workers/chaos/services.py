"""The processes a chaos run starts, and the host services its faults hit.

The run's Redis is always its own redis-server (AOF, ``appendfsync always``)
on a free port in its work folder: killing or stopping it hurts no one else.
libvirtd is the host's: its faults (restart, stall) touch every client of
it, which docs/chaos.md says.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

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


class SentinelSet:
    """Three redis-servers (a primary, two replicas) and three sentinels on loopback ports, of the run's own.

    ``kill_primary`` is a dead machine: SIGKILL of the primary's redis-server and its data folder removed;
    the sentinels promote a replica.  ``restart`` brings a dead node back, empty, as a replica of the
    current primary (as an operator replacing the machine would).
    """

    SERVICE = "dcha"

    def __init__(self, workdir: Path, down_after_ms: int = 1000) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.down_after_ms = down_after_ms
        self.ports = [free_port() for _ in range(3)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.nodes: list[subprocess.Popen[bytes] | None] = [None, None, None]
        self.sentinels: list[subprocess.Popen[bytes] | None] = [None, None, None]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.SERVICE}/0"

    def cli(self, port: int, *args: str) -> str:
        return run("redis-cli", "-p", str(port), *args, check=False, timeout=10).stdout.strip()

    def start_node(self, i: int, replica_of: int | None) -> None:
        data = self.dir / f"node{i}"
        data.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.ports[i]), "--bind", "127.0.0.1", "--dir", str(data),
                "--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        with open(self.dir / f"node{i}.log", "a") as log:
            self.nodes[i] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self.wait_for(lambda: self.cli(self.ports[i], "ping") == "PONG", f"redis-server node{i}")

    def start(self) -> None:
        self.start_node(0, None)
        for i in (1, 2):
            self.start_node(i, self.ports[0])
        for i, port in enumerate(self.sentinel_ports):
            conf = self.dir / f"sentinel{i}.conf"  # the sentinel rewrites it: its own file, writable
            conf.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", f"dir {self.dir}",
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.ports[0]} 2",
                f"sentinel down-after-milliseconds {self.SERVICE} {self.down_after_ms}",
                f"sentinel failover-timeout {self.SERVICE} 10000",
                f"sentinel parallel-syncs {self.SERVICE} 2"]) + "\n")
            with open(self.dir / f"sentinel{i}.log", "a") as log:
                self.sentinels[i] = subprocess.Popen(["redis-sentinel", str(conf)], stdout=log,
                                                     stderr=subprocess.STDOUT)
        self.wait_for(self.settled, "the sentinels (3) to see the primary's 2 replicas")

    def wait_for(self, ok: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def info(self, port: int) -> dict[str, str]:
        out = {}
        for line in self.cli(port, "info", "replication").splitlines():
            key, _, val = line.partition(":")
            out[key] = val.strip()
        return out

    def primary_port(self) -> int | None:
        """The primary the sentinels agree on (a majority), or None."""
        votes: dict[str, int] = {}
        for port in self.sentinel_ports:
            lines = self.cli(port, "sentinel", "get-master-addr-by-name", self.SERVICE).splitlines()
            if len(lines) == 2:
                votes[lines[1]] = votes.get(lines[1], 0) + 1
        best = max(votes.items(), key=lambda kv: kv[1], default=None)
        return int(best[0]) if best and best[1] >= 2 else None

    def primary(self) -> int:
        port = self.primary_port()
        if port is None or port not in self.ports:
            raise RuntimeError("the sentinels name no primary")
        return self.ports.index(port)

    def settled(self) -> bool:
        """The sentinels agree on a live primary that has both replicas online, and know each other."""
        port = self.primary_port()
        info = self.info(port) if port is not None else {}
        if info.get("role") != "master" or info.get("connected_slaves") != "2" or \
                any("state=online" not in info.get(f"slave{i}", "") for i in range(2)):
            return False  # a replica still in its first sync acknowledges nothing
        for sport in self.sentinel_ports:
            fields = self.cli(sport, "sentinel", "master", self.SERVICE).splitlines()
            state = dict(zip(fields[::2], fields[1::2], strict=False))
            if state.get("num-slaves") != "2" or state.get("num-other-sentinels") != "2" or \
                    state.get("flags") != "master":
                return False
        return True

    def kill_primary(self) -> int:
        """SIGKILL the primary's redis-server and remove its data folder (a dead machine); its index."""
        i = self.primary()
        proc = self.nodes[i]
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()
        self.nodes[i] = None
        shutil.rmtree(self.dir / f"node{i}", ignore_errors=True)
        return i

    def wait_promoted(self, old: int, timeout: float = 60.0) -> float:
        """Seconds until the sentinels name a new primary that answers as one."""
        t0 = time.monotonic()

        def promoted() -> bool:
            port = self.primary_port()
            return port is not None and port != self.ports[old] and self.info(port).get("role") == "master"
        self.wait_for(promoted, "a replica to be promoted", timeout)
        return time.monotonic() - t0

    def restart(self, i: int) -> None:
        """Bring a dead node back, empty, as a replica of the current primary."""
        self.start_node(i, self.ports[self.primary()])

    def signal(self, sig: int) -> bool:
        """``sig`` to every live node (the runner's teardown continues them all)."""
        sent = False
        for proc in self.nodes:
            if proc and proc.poll() is None:
                proc.send_signal(sig)
                sent = True
        return sent

    def signal_node(self, i: int, sig: int) -> None:
        proc = self.nodes[i]
        if proc and proc.poll() is None:
            proc.send_signal(sig)

    def replicas(self) -> list[int]:
        primary = self.primary()
        return [i for i in range(3) if i != primary and self.nodes[i] is not None]

    def stop(self) -> None:
        for proc in self.nodes + self.sentinels:
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


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
