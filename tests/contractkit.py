"""The two sides of every contract test: the in-memory fake and real libvirt + QEMU.

Each contract file's ``env`` fixture yields one of these, so the same test
body runs against both (see ``contract_env``).  Both hold two disks, vda and
vdb, whose content starts like DiskDomain's: a pattern, then pattern + 1 at
the middle.
"""

from __future__ import annotations

import json
import os
import subprocess

from workflows import nbdio
from workflows.hypervisor.fake import FakeHypervisor
from workflows.hypervisor.libvirt_adapter import LibvirtHypervisor

from .realenv import image_has_pattern

MIB = 1024 * 1024


class FakeEnv:
    kind = "fake"

    def __init__(self, tmp_path) -> None:
        self.dir = tmp_path
        self.hv = FakeHypervisor()
        self.name = "contract"
        self.disks = {}
        for i, t in enumerate(("vda", "vdb")):
            p = str(tmp_path / f"{t}.img")
            with open(p, "wb") as f:
                pattern = 0x11 * (i + 1)  # as DiskDomain: a pattern, then pattern + 1 at the middle
                f.write(bytes([pattern]) * 4 * MIB + bytes([pattern + 1]) * MIB + bytes(3 * MIB))
            self.disks[t] = p
        self.hv.add_domain(self.name, self.disks, agent=False)

    def write(self, target: str, pattern: int, off_mib: int, len_mib: int) -> None:
        self.hv.guest_write(self.name, target, off_mib * MIB, bytes([pattern]) * len_mib * MIB)

    def zero(self, target: str, off_mib: int, len_mib: int) -> None:
        self.hv.guest_write(self.name, target, off_mib * MIB, bytes(len_mib * MIB))

    def disk_bytes(self, target: str) -> bytes:
        with open(self.disks[target], "rb") as f:
            return f.read()

    def original_has(self, target: str, pattern: int, off_mib: int, len_mib: int) -> bool:
        with open(self.disks[target], "rb") as f:
            f.seek(off_mib * MIB)
            return f.read(len_mib * MIB) == bytes([pattern]) * len_mib * MIB

    def drop_bitmap(self, target: str, checkpoint: str) -> None:
        self.hv.drop_bitmap(self.name, target, checkpoint)


class RealEnv:
    kind = "libvirt"

    def __init__(self, dom) -> None:
        self.dom = dom
        self.hv = LibvirtHypervisor(dom.uri)
        self.name = dom.name
        self.dir = dom.workdir
        self.disks = {t: str(p) for t, p in dom.disks.items()}

    def write(self, target: str, pattern: int, off_mib: int, len_mib: int) -> None:
        self.dom.guest_write(target, pattern, off_mib, len_mib)

    def zero(self, target: str, off_mib: int, len_mib: int) -> None:
        """Write zeroes as a guest's discard-less zeroing does (qemu-io write -z)."""
        qdev = f"/machine/peripheral/{self.dom.alias(target)}/virtio-backend"
        for cmd in (f"write -z {off_mib}M {len_mib}M", "flush"):
            out = self.dom.virsh("qemu-monitor-command", self.name, "--hmp", f'qemu-io -d {qdev} "{cmd}"')
            assert "error" not in out.lower(), out

    def disk_bytes(self, target: str) -> bytes:
        out = str(self.dir / f"{target}.now.raw")
        nbdio.run_qemu_img("convert", "-U", "-f", "qcow2", "-O", "raw", self.disks[target], out)
        with open(out, "rb") as f:
            data = f.read()
        os.unlink(out)
        return data

    def original_has(self, target: str, pattern: int, off_mib: int, len_mib: int) -> bool:
        return image_has_pattern(self.disks[target], pattern, off_mib, len_mib)

    def drop_bitmap(self, target: str, checkpoint: str) -> None:
        def qmp(cmd: dict) -> dict:
            out = subprocess.run(["virsh", "-c", self.dom.uri, "qemu-monitor-command", self.name, json.dumps(cmd)],
                                 capture_output=True, text=True, check=True).stdout
            return json.loads(out)
        nodes = qmp({"execute": "query-named-block-nodes", "arguments": {"flat": True}})["return"]
        node = next(n["node-name"] for n in nodes if n["drv"] == "qcow2" and n["file"] == self.disks[target])
        qmp({"execute": "block-dirty-bitmap-remove", "arguments": {"node": node, "name": checkpoint}})


def contract_env(request, tmp_path, real_mib: int = 16):
    """Body of an ``env`` fixture parametrized with ["fake", "libvirt"]."""
    if request.param == "fake":
        yield FakeEnv(tmp_path)
        return
    dom = request.getfixturevalue("disk_domain")(sizes_mib={"vda": real_mib, "vdb": real_mib})
    env = RealEnv(dom)
    yield env
    env.hv.close()
