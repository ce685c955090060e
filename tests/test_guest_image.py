"""The tiny real test guest (guest/): build it, boot it under libvirt and check
that the guest agent, the counter writer, fsfreeze/thaw and a clean agent
shutdown behave as the capture workflows expect."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "guest"
URI = "qemu:///system"  # replaced by the libvirt_uri fixture (tests/conftest.py)
NAME = "dctest-guestimg"
CACHE_DIR = Path(os.environ.get("DOMCAPTURE_GUEST_DIR", "/var/lib/domcapture/guest"))
LINE_RE = re.compile(r"^(\d+) (\d+\.\d+)$")


def run(cmd: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "LIBVIRT_DEFAULT_URI": URI}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} -> rc {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def virsh(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return run(["virsh", "-c", URI, *args], timeout=timeout, check=check)


def agent(cmd: str, **arguments: Any) -> Any:
    """The agent's answer: a JSON value whose shape depends on the command."""
    msg: dict[str, Any] = {"execute": cmd}
    if arguments:
        msg["arguments"] = arguments
    out = virsh("qemu-agent-command", NAME, json.dumps(msg), "--timeout", "10").stdout
    return json.loads(out)["return"]


def guest_sh(script: str, timeout: float = 30) -> str:
    """Run a shell command in the guest (guest-exec) and return its stdout."""
    pid = agent("guest-exec", path="/bin/sh", arg=["-c", script], **{"capture-output": True})["pid"]
    deadline = time.monotonic() + timeout
    while True:
        status = agent("guest-exec-status", pid=pid)
        if status["exited"]:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"guest command did not finish in {timeout} s: {script}")
        time.sleep(0.1)
    out = base64.b64decode(status.get("out-data", "")).decode()
    err = base64.b64decode(status.get("err-data", "")).decode()
    assert status.get("exitcode") == 0, f"{script!r} -> {status.get('exitcode')}: {err}"
    return out


def last_counter() -> int:
    line = guest_sh("tail -n 1 /mnt/vdb/counter.log").strip()
    m = LINE_RE.match(line)
    assert m, f"bad counter line {line!r}"
    return int(m.group(1))


def wait_for(pred, timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


@pytest.fixture(scope="module")
def guest_image(libvirt_uri: str) -> Path:
    # libvirt_uri skips the module when libvirtd is unreachable (fails under
    # DOMCAPTURE_REQUIRE_REAL=1)
    global URI
    URI = libvirt_uri
    t0 = time.monotonic()
    run([str(GUEST / "build-guest.sh"), str(CACHE_DIR)], timeout=900)
    print(f"build-guest.sh: {time.monotonic() - t0:.2f} s")
    assert (CACHE_DIR / "vmlinuz").stat().st_size > 1_000_000
    assert (CACHE_DIR / "initrd.gz").stat().st_size > 1_000_000
    return CACHE_DIR


@pytest.fixture(scope="module")
def guest(guest_image: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("guestimg")
    destroy = [str(GUEST / "destroy-guest.sh"), NAME]
    run(destroy, check=False)  # leftovers of an interrupted run
    try:
        t0 = time.monotonic()
        proc = run(
            [str(GUEST / "make-guest.sh"), NAME, str(workdir), "--guest-dir", str(guest_image), "--start"],
            timeout=200,
        )
        print(proc.stdout.strip(), f"({time.monotonic() - t0:.2f} s)")
        yield workdir
    finally:
        run([*destroy, str(workdir)], check=False)


def test_agent_answers(guest: Path) -> None:
    assert agent("guest-ping") == {}
    info = agent("guest-info")
    enabled = {c["name"] for c in info["supported_commands"] if c["enabled"]}
    assert {"guest-exec", "guest-fsfreeze-freeze", "guest-shutdown"} <= enabled
    mounts = guest_sh("cat /proc/mounts")
    assert "/dev/vda /mnt/vda ext4" in mounts
    assert "/dev/vdb /mnt/vdb ext4" in mounts


def test_counter_grows(guest: Path) -> None:
    n1 = last_counter()
    assert wait_for(lambda: last_counter() >= n1 + 5, timeout=10)
    # the host-side mirror of the writer's virtio channel follows too
    mirror = guest / f"{NAME}-writer.log"
    size = mirror.stat().st_size
    assert wait_for(lambda: mirror.stat().st_size > size, timeout=10)


def test_fsfreeze_stops_writer(guest: Path) -> None:
    mirror = guest / f"{NAME}-writer.log"
    n0 = last_counter()
    frozen_for = 2.5
    out = virsh("domfsfreeze", NAME).stdout
    try:
        assert "Froze 2 filesystem(s)" in out, out
        assert agent("guest-fsfreeze-status") == "frozen"
        time.sleep(0.5)  # a line already past its write may still be mirrored
        s1 = mirror.stat().st_size
        time.sleep(frozen_for - 0.5)
        s2 = mirror.stat().st_size
    finally:
        # never with --mountpoint: that fails and leaves the filesystems frozen
        thawed = virsh("domfsthaw", NAME, check=False)
    assert thawed.returncode == 0 and "Thawed 2 filesystem(s)" in thawed.stdout, thawed.stderr
    assert s1 == s2, "the writer kept writing while the filesystems were frozen"
    assert agent("guest-fsfreeze-status") == "thawed"
    assert wait_for(lambda: mirror.stat().st_size > s2, timeout=10)
    assert wait_for(lambda: last_counter() > n0 + 5, timeout=10)
    # The line the writer had stamped just before blocking was written after
    # the thaw: the uptimes in the log show the stall.
    gap = float(
        guest_sh("awk 'NR > 1 && $2 - p > m {m = $2 - p} {p = $2} END {print m + 0}' /mnt/vdb/counter.log")
    )
    assert gap >= frozen_for - 0.3, f"largest gap between lines {gap} s"


def test_agent_shutdown_leaves_clean_gapless_log(guest: Path, tmp_path: Path) -> None:
    n_before = last_counter()
    virsh("shutdown", NAME, "--mode", "agent")
    assert wait_for(lambda: virsh("domstate", NAME).stdout.strip() == "shut off", timeout=60), (
        "guest did not power off"
    )

    vdb = guest / f"{NAME}-vdb.qcow2"
    run(["qemu-img", "check", "-q", str(vdb)])
    raw = tmp_path / "vdb.raw"
    run(["qemu-img", "convert", "-O", "raw", str(vdb), str(raw)])
    console = (guest / f"{NAME}-console.log").read_text(errors="replace")[-2000:]
    fsck = run(["e2fsck", "-fn", str(raw)], check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr + console
    # unmounted at shutdown: no journal left to replay (else debugfs reads stale data)
    header = run(["dumpe2fs", "-h", str(raw)]).stdout
    assert re.search(r"^Filesystem state:\s+clean$", header, re.MULTILINE), header + console
    assert "needs_recovery" not in header, header + console

    text = run(["debugfs", "-R", "cat /counter.log", str(raw)]).stdout
    lines = text.splitlines()
    assert len(lines) >= n_before, f"{len(lines)} lines on disk, the guest had written {n_before}"
    numbers = []
    for line in lines:
        m = LINE_RE.match(line)
        assert m, f"bad line {line!r}"
        numbers.append(int(m.group(1)))
    assert numbers == list(range(1, len(numbers) + 1)), "counter.log is not a gapless 1..N sequence"

    # the channel mirror saw the same lines (it may lack the very last one)
    mirror = (guest / f"{NAME}-writer.log").read_text().splitlines()
    assert len(mirror) >= len(lines) - 1
    assert mirror == lines[: len(mirror)]
