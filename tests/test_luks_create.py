"""An encrypted backup's image is created even when QEMU's LUKS key timing fails on a busy host.

QEMU times PBKDF2 on the thread's CPU clock while it writes a LUKS header
(crypto/pbkdf.c); on a loaded host a round can measure 0 ms and ``qemu-img
create`` fails with "Unable to get accurate CPU usage" (3 plain creates in 8
on this host).  ``nbdio.create_image``
tries that failure again, a bounded number of times, and nothing else.

The stand-in ``qemu-img`` put first on PATH is a real executable: it counts
its calls in a file, fails the first N of them with QEMU's message, then runs
the real qemu-img.  The image is read back with the real qemu-img.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from workflows import nbdio
from workflows.errors import OperationFailed

REAL = shutil.which("qemu-img") or "qemu-img"
pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """Make ``qemu-img`` fail its first ``n`` calls with ``message``; returns (set_up, calls)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    counter = tmp_path / "calls"

    def set_up(n: int, message: str = "Unable to get accurate CPU usage") -> None:
        script = folder / "qemu-img"
        script.write_text(f"""#!/bin/sh
echo "$*" >> {counter}
if [ "$(wc -l < {counter})" -le {n} ]; then
    echo "qemu-img: $(eval echo \\${{$#-1}}): {message}" >&2
    exit 1
fi
exec {REAL} "$@"
""")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")

    def calls() -> int:
        return len(counter.read_text().splitlines()) if counter.exists() else 0

    return set_up, calls


def info(path) -> dict:
    out = subprocess.run([REAL, "info", "--output=json", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_a_timing_failure_is_tried_again_and_the_image_is_luks(tmp_path, stand_in):
    set_up, calls = stand_in
    set_up(2)  # two busy-host failures, then the real qemu-img
    key = tmp_path / "key"
    key.write_text("a passphrase\n")
    image = tmp_path / "vda.qcow2"
    nbdio.create_image(str(image), 64 * 1024 * 1024, f"compat=1.1,encrypt.format=luks,encrypt.iter-time=10,"
                       f"encrypt.key-secret={nbdio.SECRET_ID}", str(key), pause=0.0)
    assert calls() >= 3  # the stand-in's two, then the real qemu-img's (which may itself fail the timing)
    got = info(image)
    assert (got["format"], got["virtual-size"], got["encrypted"]) == ("qcow2", 64 * 1024 * 1024, True)
    assert got["format-specific"]["data"]["encrypt"]["format"] == "luks"
    nbdio.check_key(str(image), str(key))  # the key unlocks it (raises otherwise)


def test_the_timing_failure_is_tried_a_bounded_number_of_times(tmp_path, stand_in):
    set_up, calls = stand_in
    set_up(100)
    key = tmp_path / "key"
    key.write_text("a passphrase\n")
    with pytest.raises(OperationFailed, match="Unable to get accurate CPU usage"):
        nbdio.create_image(str(tmp_path / "vda.qcow2"), 1 << 20,
                           f"encrypt.format=luks,encrypt.key-secret={nbdio.SECRET_ID}", str(key),
                           attempts=3, pause=0.0)
    assert calls() == 3


def test_any_other_failure_is_not_tried_again(tmp_path, stand_in):
    set_up, calls = stand_in
    set_up(1, "Could not open '/nonexistent': No such file or directory")
    with pytest.raises(OperationFailed, match="No such file"):
        nbdio.create_image(str(tmp_path / "vda.qcow2"), 1 << 20, "compat=1.1", pause=0.0)
    assert calls() == 1
    assert not (tmp_path / "vda.qcow2").exists()
