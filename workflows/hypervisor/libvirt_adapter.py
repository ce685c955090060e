"""The one module that talks to libvirt.

Every ``libvirtError`` is turned into the project's own exception here, by
one table of error codes; nothing else in the project imports ``libvirt``.
"""

from __future__ import annotations

import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable, Collection, TypeVar

import libvirt

from ..errors import (AgentUnavailable, CheckpointInconsistent, CheckpointNotFound, DomainNotFound, DomcaptureError,
                      HypervisorError, HypervisorUnavailable, NotReady, OperationFailed)
from . import chains, hold
from .base import BlockJob, Disk, Firmware, parse_firmware
from .libvirt_backup import LibvirtBackupOps
from .libvirt_save import LibvirtSaveOps
from .libvirt_snapshot import LibvirtSnapshotOps

T = TypeVar("T")

# libvirt prints every error to stderr by default; ours are raised, not printed.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

# libvirt error code -> (our exception class, retryable)
_ERROR_TABLE: dict[int, tuple[type[DomcaptureError], bool]] = {
    libvirt.VIR_ERR_NO_DOMAIN: (DomainNotFound, False),
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE: (AgentUnavailable, False),
    libvirt.VIR_ERR_AGENT_UNSYNCED: (AgentUnavailable, False),
    libvirt.VIR_ERR_BLOCK_COPY_ACTIVE: (NotReady, True),
    libvirt.VIR_ERR_OPERATION_TIMEOUT: (OperationFailed, True),  # e.g. state change lock held
    libvirt.VIR_ERR_NO_CONNECT: (HypervisorUnavailable, True),
    libvirt.VIR_ERR_RPC: (HypervisorUnavailable, True),
    libvirt.VIR_ERR_SYSTEM_ERROR: (HypervisorUnavailable, True),
    libvirt.VIR_ERR_AUTH_FAILED: (HypervisorUnavailable, False),
    libvirt.VIR_ERR_OPERATION_INVALID: (OperationFailed, False),
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED: (OperationFailed, False),
    libvirt.VIR_ERR_NO_SUPPORT: (OperationFailed, False),
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED: (OperationFailed, False),
    libvirt.VIR_ERR_INVALID_ARG: (OperationFailed, False),
    libvirt.VIR_ERR_OPERATION_FAILED: (OperationFailed, False),
    libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT: (CheckpointNotFound, False),
    libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT: (CheckpointInconsistent, False),
}

_JOB_TYPES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active-commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP: "backup",
}

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


def translate(exc: libvirt.libvirtError, what: str) -> DomcaptureError:
    code = exc.get_error_code()
    cls, retryable = _ERROR_TABLE.get(code, (HypervisorError, False))
    msg = exc.get_error_message() or str(exc)
    if exc.get_error_domain() == libvirt.VIR_FROM_RPC and cls is HypervisorError:
        cls, retryable = HypervisorUnavailable, True
    if "guest agent" in msg.lower() and ("not connected" in msg.lower() or "not configured" in msg.lower()):
        cls, retryable = AgentUnavailable, False
    err = cls(f"{what}: {msg}", retryable=retryable)
    err.libvirt_code = code  # type: ignore[attr-defined]
    return err


def network_url(src: ET.Element) -> str | None:
    """A network disk's ``<source protocol=...>`` as a URL qemu-img opens (None: a protocol not handled)."""
    protocol, name = src.get("protocol"), src.get("name") or ""
    host = src.find("host")
    hostname = host.get("name") if host is not None else None
    port = host.get("port") if host is not None else None
    if protocol == "nbd":
        if host is not None and host.get("transport") == "unix":
            return f"nbd+unix:///{name}?socket={host.get('socket')}"
        return f"nbd://{hostname or 'localhost'}:{port or 10809}/{name}"
    if protocol == "iscsi" and hostname:
        return f"iscsi://{hostname}:{port or 3260}/{name}"
    if protocol == "rbd" and name:
        return f"rbd:{name}"
    return None


def chain_layers(xml: str, how: str) -> list[tuple[set[str], str]]:
    """Every disk's layers (a mirror's destination included; a defined domain's chain followed down the
    qcow2 headers), with a label naming the disk: [({paths}, "vda, running"), ...]."""
    out = []
    for d in parse_disks(xml):
        layers = [p for p in (d.source, *d.backing, d.mirror_source) if p]
        if how == "defined" and d.type == "file" and d.source:
            layers += chains.follow(d.backing[-1] if d.backing else d.source)[1:]
        out.append((set(layers), f"{d.target}, {how}"))
    return out


def chain_refs(xml: str, target: str) -> dict[str, str]:
    """Each layer of ``target``'s chain in a live XML: path -> libvirt's name for exactly that image
    (``vda[3]``: an index names one image for as long as the domain runs, wherever it moves in the chain)."""
    refs: dict[str, str] = {}
    for d in ET.fromstring(xml).findall("./devices/disk"):
        t = d.find("target")
        if t is None or t.get("dev") != target:
            continue
        src = d.find("source")
        if src is not None:
            path = src.get("file") or src.get("dev") or src.get("name")
            if path:
                refs[path] = f"{target}[{src.get('index')}]" if src.get("index") else path
        bs = d.find("backingStore")
        while bs is not None and (bsrc := bs.find("source")) is not None:
            path = bsrc.get("file") or bsrc.get("dev") or bsrc.get("name")
            if path:
                refs[path] = f"{target}[{bs.get('index')}]" if bs.get("index") else path
            bs = bs.find("backingStore")
    return refs


def parse_disks(xml: str) -> list[Disk]:
    root = ET.fromstring(xml)
    disks = []
    for d in root.findall("./devices/disk"):
        target = d.find("target")
        if target is None:
            continue
        src = d.find("source")
        path = None
        if src is not None:
            path = src.get("file") or src.get("dev") or src.get("name")
        drv = d.find("driver")
        chain = []
        bs = d.find("backingStore")
        while bs is not None and (bsrc := bs.find("source")) is not None:
            chain.append(bsrc.get("file") or bsrc.get("dev") or bsrc.get("name") or "")
            bs = bs.find("backingStore")
        mirror = d.find("mirror")
        msrc = mirror.find("source") if mirror is not None else None
        mirror_source = (msrc.get("file") or msrc.get("dev") or msrc.get("name")) if msrc is not None else None
        if mirror is not None and mirror_source is None:
            mirror_source = mirror.get("file")  # the older form: <mirror file=...>
        url = network_url(src) if d.get("type") == "network" and src is not None else None
        disks.append(Disk(
            target=target.get("dev", ""), source=path,
            format=drv.get("type") if drv is not None else None,
            type=d.get("type", "file"), device=d.get("device", "disk"), backing=chain,
            mirror_job=mirror.get("job") if mirror is not None else None,
            mirror_ready=(mirror is not None and mirror.get("ready") == "yes"), mirror_source=mirror_source,
            readonly=d.find("readonly") is not None, shareable=d.find("shareable") is not None, url=url,
        ))
    return disks


class LibvirtHypervisor(LibvirtSaveOps, LibvirtSnapshotOps, LibvirtBackupOps):
    """A libvirt connection that reconnects after libvirtd restarts.

    The core (inspection, quiescing, disk-only snapshots, block jobs) is here;
    each group of strategies adds its calls through a mixin module beside it.
    """

    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri or ""
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()

    # -- connection ---------------------------------------------------------
    def _connection(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._conn = None
            try:
                self._conn = libvirt.open(self.uri or None)
            except libvirt.libvirtError as exc:
                raise HypervisorUnavailable(f"cannot connect to libvirt at {self.uri or '(default URI)'}: "
                                            f"{exc.get_error_message()}") from exc
            return self._conn

    def _call(self, what: str, fn: Callable[[libvirt.virConnect], T]) -> T:
        try:
            return fn(self._connection())
        except libvirt.libvirtError as exc:
            raise translate(exc, what) from exc

    def _dom(self, conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
        return conn.lookupByName(name)

    def canonical_uri(self) -> str:
        uri: str = self._call("getURI", lambda c: c.getURI())
        return uri

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None

    # -- inspection -----------------------------------------------------------
    def host_name(self) -> str:
        """The hypervisor host's name (virConnectGetHostname)."""
        name: str = self._call("getHostname", lambda c: c.getHostname())
        return name

    def list_domains(self) -> list[str]:
        names: list[str] = self._call("list of domains", lambda c: sorted(d.name() for d in c.listAllDomains()))
        return names

    def domain_state(self, name: str) -> str:
        state = self._call(f"state of domain {name}", lambda c: self._dom(c, name).state()[0])
        return _STATES.get(state, "other")

    def domain_xml(self, name: str) -> str:
        xml: str = self._call(f"XML of domain {name}", lambda c: self._dom(c, name).XMLDesc(0))
        return xml

    def disks(self, name: str) -> list[Disk]:
        return parse_disks(self.domain_xml(name))

    def firmware(self, name: str) -> Firmware:
        return parse_firmware(self.domain_xml(name))

    def chain_users(self, paths: Collection[str]) -> dict[str, list[str]]:
        """Which domain on this connection may open each of ``paths``: every domain, running (its live
        chain, mirrors included) or only defined (its definition's chain, followed down the image headers)."""
        def scan(c: libvirt.virConnect) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {p: [] for p in paths}
            for dom in c.listAllDomains():
                try:
                    xmls = [("running", dom.XMLDesc(0))] if dom.isActive() else []
                    if dom.isPersistent():
                        xmls.append(("defined", dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
                    name = dom.name()
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue  # gone while we looked: it opens nothing
                    raise
                for how, xml in xmls:
                    for users, label in chain_layers(xml, how):
                        for p in paths:
                            if p in users:
                                out[p].append(f"{name} ({label})")
            return out
        users: dict[str, list[str]] = self._call("chains of every domain", scan)
        return users

    def block_job(self, name: str, target: str) -> BlockJob | None:
        info = self._call(f"block job on {name}/{target}",
                          lambda c: self._dom(c, name).blockJobInfo(target, 0))
        if not info:
            return None
        return BlockJob(target=target, type=_JOB_TYPES.get(info.get("type"), "unknown"),
                        cur=int(info.get("cur", 0)), end=int(info.get("end", 0)))

    # -- quiescing --------------------------------------------------------------
    def fs_freeze(self, name: str) -> int:
        frozen: int = self._call(f"fsfreeze of {name}", lambda c: self._dom(c, name).fsFreeze(None, 0))
        return frozen

    def fs_thaw(self, name: str) -> int:
        # Never with mountpoints: libvirt refuses those and the guest stays frozen.
        thawed: int = self._call(f"fsthaw of {name}", lambda c: self._dom(c, name).fsThaw(None, 0))
        return thawed

    def fs_frozen(self, name: str) -> bool:
        import libvirt_qemu  # part of libvirt-python; only for the agent's freeze status

        def status(c: libvirt.virConnect) -> bool:
            out = libvirt_qemu.qemuAgentCommand(self._dom(c, name), '{"execute":"guest-fsfreeze-status"}', 5, 0)
            return '"frozen"' in out
        return self._call(f"fsfreeze status of {name}", status)

    def guest_exec(self, name: str, argv: list[str], timeout: float) -> dict[str, Any]:
        import base64
        import json

        import libvirt_qemu

        def agent(cmd: dict[str, Any]) -> Any:
            def call(c: libvirt.virConnect) -> Any:
                out = libvirt_qemu.qemuAgentCommand(self._dom(c, name), json.dumps(cmd), 10, 0)
                return json.loads(out)["return"]
            return self._call(f"guest-exec in {name}", call)

        pid = agent({"execute": "guest-exec", "arguments": {"path": argv[0], "arg": argv[1:],
                                                            "capture-output": True}})["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = agent({"execute": "guest-exec-status", "arguments": {"pid": pid}})
            if status.get("exited"):
                return {"exitcode": status.get("exitcode"), "timed_out": False,
                        "out": base64.b64decode(status.get("out-data", "")).decode(errors="replace")[-2000:],
                        "err": base64.b64decode(status.get("err-data", "")).decode(errors="replace")[-2000:]}
            if time.monotonic() > deadline:
                agent({"execute": "guest-exec", "arguments": {"path": "/bin/kill", "arg": ["-9", str(pid)]}})
                return {"exitcode": None, "timed_out": True, "out": "", "err": "", "killed_pid": pid}
            time.sleep(0.1)

    # -- snapshots and block jobs ---------------------------------------------------
    def snapshot_disk_only(self, name: str, overlays: dict[str, str], quiesce: bool = False) -> None:
        """External disk-only snapshot of every disk at once, with no libvirt metadata.

        ``overlays`` maps every disk target to its overlay path; disks not in
        it are excluded from the snapshot.
        """
        def create(c: libvirt.virConnect) -> None:
            dom = self._dom(c, name)
            parts = []
            for d in parse_disks(dom.XMLDesc(0)):
                if d.target in overlays:
                    parts.append(f"<disk name='{d.target}' snapshot='external'>"
                                 f"<driver type='qcow2'/><source file='{_xml_attr(overlays[d.target])}'/></disk>")
                else:
                    parts.append(f"<disk name='{d.target}' snapshot='no'/>")
            xml = f"<domainsnapshot><disks>{''.join(parts)}</disks></domainsnapshot>"
            flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                     | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
            if quiesce:
                flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
            dom.snapshotCreateXML(xml, flags)
        self._call(f"disk-only snapshot of {name}", create)

    def block_commit_active(self, name: str, target: str, top: str | None = None, base: str | None = None) -> None:
        """Active commit.  With ``top`` and ``base`` (paths in the disk's chain) exactly those layers, by
        their libvirt index: libvirt refuses it when ``top`` is no longer the active layer (someone put a
        layer above it), so a commit can never take another tool's layer down with ours."""
        if top is None or base is None:
            # shallow: the overlay goes into its immediate backing file (the disk's own image), never further
            # down a chain the disk was created over (a template's shared base)
            flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
            self._call(f"active blockcommit of {name}/{target}",
                       lambda c: self._dom(c, name).blockCommit(target, None, None, 0, flags))
            return
        self._commit_layers(name, target, top, base, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)

    def block_commit_intermediate(self, name: str, target: str, top: str, base: str) -> None:
        self._commit_layers(name, target, top, base, 0)

    def _commit_layers(self, name: str, target: str, top: str, base: str, flags: int) -> None:
        what = f"{'active ' if flags else ''}blockcommit of {top} into {base} on {name}/{target}"

        def commit(c: libvirt.virConnect) -> None:
            dom = self._dom(c, name)
            refs = chain_refs(dom.XMLDesc(0), target)
            missing = [p for p in (top, base) if p not in refs]
            if missing:
                raise OperationFailed(f"{what}: {', '.join(missing)} not in the chain of {target}")
            dom.blockCommit(target, refs[base], refs[top], 0, flags)
        self._call(what, commit)

    def block_pivot(self, name: str, target: str) -> None:
        flags = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
        self._call(f"pivot of {name}/{target}", lambda c: self._dom(c, name).blockJobAbort(target, flags))

    def block_pull(self, name: str, target: str) -> None:
        self._call(f"block pull of {name}/{target}", lambda c: self._dom(c, name).blockPull(target, 0, 0))

    def commit_offline(self, name: str, overlay: str, base: str) -> None:
        state = self.domain_state(name)
        if state in ("running", "paused"):
            raise OperationFailed(f"offline commit of {overlay}: domain {name} is {state}; commit it online")
        out = subprocess.run(["qemu-img", "commit", "-q", "-f", "qcow2", "-b", base, overlay],
                             capture_output=True, text=True, timeout=24 * 3600)
        if out.returncode != 0:
            raise OperationFailed(f"qemu-img commit of {overlay} into {base} failed: "
                                  f"{(out.stderr or out.stdout).strip()}")

    def commit_image(self, overlay: str, base: str) -> None:
        out = subprocess.run(["qemu-img", "commit", "-q", "-f", "qcow2", "-b", base, overlay],
                             capture_output=True, text=True, timeout=24 * 3600)
        if out.returncode != 0:
            raise OperationFailed(f"qemu-img commit of {overlay} into {base} failed: "
                                  f"{(out.stderr or out.stdout).strip()}")

    def define_disk_sources(self, name: str, sources: dict[str, dict[str, str]], running_ok: bool = False) -> None:
        def define(c: libvirt.virConnect) -> None:
            dom = self._dom(c, name)
            if dom.isActive() and not running_ok:
                raise OperationFailed(f"redefinition of {name}'s disks: the domain is running")
            if not dom.isPersistent():
                return
            root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
            for disk in root.findall("./devices/disk"):
                target = disk.find("target")
                want = sources.get(target.get("dev", "") if target is not None else "")
                if want is None:
                    continue
                source = disk.find("source")
                if source is None:
                    source = ET.SubElement(disk, "source")
                source.attrib.clear()
                kind = want.get("type") or "file"
                disk.set("type", kind)
                source.set("dev" if kind == "block" else "file", want["path"])
                for backing in disk.findall("backingStore"):
                    disk.remove(backing)
                driver = disk.find("driver")
                if driver is not None and want.get("format"):
                    driver.set("type", want["format"])
            c.defineXML(ET.tostring(root, encoding="unicode"))
        self._call(f"redefinition of {name}'s disks", define)

    def block_job_abort(self, name: str, target: str) -> None:
        self._call(f"abort of block job {name}/{target}",
                   lambda c: self._dom(c, name).blockJobAbort(target, 0))

    # -- the hold mark (workflows/hypervisor/hold.py) -----------------------------------
    def set_hold_mark(self, name: str, mark: dict[str, Any] | None) -> None:
        """Write our ``<hold>`` element into the domain's metadata (None: remove it), in the running
        domain and, when it is persistent, in its definition too."""
        xml = hold.mark_xml(mark) if mark is not None else None

        def write(c: libvirt.virConnect) -> None:
            dom = self._dom(c, name)
            flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0
            if dom.isPersistent():
                flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, hold.KEY if xml else None, hold.NS, flags)
        self._call(f"hold mark of {name}", write)

    def hold_mark(self, name: str) -> dict[str, Any] | None:
        """The domain's hold mark (the running domain's, else the definition's), None, or {"unreadable": why}."""
        def read(c: libvirt.virConnect) -> str | None:
            try:
                out: str = self._dom(c, name).metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, hold.NS, 0)
                return out
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    return None
                raise
        return hold.parse_mark(self._call(f"hold mark of {name}", read))


def _xml_attr(value: str) -> str:
    return (value.replace("&", "&amp;").replace("'", "&apos;").replace("<", "&lt;").replace(">", "&gt;"))
