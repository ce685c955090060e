"""The in-memory fake's side of the snapshot operations (mixed into FakeHypervisor).

Snapshots keep libvirt-style metadata (name, description, parent, current).
An internal snapshot keeps a copy of each disk's bytes and, for a running
domain, the guest's "memory": a small uptime counter that ``guest_runs``
advances, so tests can tell a reverted guest (uptime back at the snapshot's)
from one that ran on.  An external snapshot puts each disk on a JSON overlay
file the way ``snapshot_disk_only`` does; deleting it merges the overlay into
the image below, as libvirt 9.0 does, and refuses where libvirt 9.0 refuses
(an internal parent, children, a block job).  Errors follow libvirt's (see
tests/test_snapshot_contract.py).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field

from ..errors import HypervisorError, OperationFailed
from .snapshot_info import SnapshotInfo


@dataclass
class _Snap:
    info: SnapshotInfo
    contents: dict[str, bytes] = field(default_factory=dict)  # internal: target -> bytes of the image
    uptime: int | None = None  # internal with memory: the guest's uptime when taken


@dataclass
class _SnapState:
    snaps: dict[str, _Snap] = field(default_factory=dict)
    current: str | None = None
    uptime: int = 0
    busy_polls: int = 0  # a job libvirtd is still running: is_domain_busy answers True this many times


class FakeSnapshotOps:
    # -- test set-up ------------------------------------------------------------------
    def _snap_state(self, name: str) -> _SnapState:
        self._dom(name)  # type: ignore[attr-defined]
        states: dict[str, _SnapState] = self.__dict__.setdefault("_snap_states", {})
        return states.setdefault(name, _SnapState())

    def guest_runs(self, name: str, ticks: int = 1) -> None:
        """The guest runs a little: its uptime grows (only while running)."""
        if self._dom(name).state == "running":  # type: ignore[attr-defined]
            self._snap_state(name).uptime += ticks

    def guest_uptime(self, name: str) -> int | None:
        return self._snap_state(name).uptime if self._dom(name).state == "running" else None  # type: ignore[attr-defined]

    def set_domain_busy(self, name: str, polls: int) -> None:
        self._snap_state(name).busy_polls = polls

    def _snap(self, name: str, snap: str) -> _Snap:
        found = self._snap_state(name).snaps.get(snap)
        if found is None:
            raise HypervisorError(f"snapshot {snap} of {name}: Domain snapshot not found: "
                                  f"no domain snapshot with matching name '{snap}'")
        return found

    # -- read-only ------------------------------------------------------------------------
    def is_domain_busy(self, name: str) -> bool:
        st = self._snap_state(name)
        if st.busy_polls > 0:
            st.busy_polls -= 1
            return True
        return False

    def lookup_snapshot(self, name: str, snap: str) -> SnapshotInfo | None:
        st = self._snap_state(name)
        if snap not in st.snaps:
            return None
        info = copy.deepcopy(st.snaps[snap].info)
        info.current = st.current == snap
        info.children = sum(1 for s in st.snaps.values() if s.info.parent == snap)
        return info

    def list_snapshot_names(self, name: str) -> list[str]:
        return sorted(self._snap_state(name).snaps)

    def get_current_snapshot(self, name: str) -> str | None:
        return self._snap_state(name).current

    def get_library_version(self) -> int:
        return 9_000_000

    # -- effects ------------------------------------------------------------------------------
    def create_snapshot(self, name: str, snap: str, *, description: str, memory: bool,
                        overlays: dict[str, str] | None = None, memory_file: str | None = None) -> None:
        dom, st = self._dom(name), self._snap_state(name)  # type: ignore[attr-defined]
        what = f"snapshot {snap} of {name}"
        if snap in st.snaps:
            raise OperationFailed(f"{what}: operation failed: domain moment {snap} already exists")
        running = dom.state == "running"
        if (memory or memory_file) and not running:
            raise OperationFailed(f"{what}: unsupported configuration: memory state cannot be saved "
                                  "with offline or disk-only snapshot")
        if overlays is None:
            for t, d in dom.disks.items():
                if running and not memory:
                    raise OperationFailed(f"{what}: Operation not supported: internal snapshot of a running VM "
                                          "must include the memory state")
                if d.fmt != "qcow2":
                    raise OperationFailed(f"{what}: unsupported configuration: internal snapshot for disk {t} "
                                          f"unsupported for storage type {d.fmt}")
        else:
            for t, path in overlays.items():
                if t not in dom.disks:
                    raise OperationFailed(f"{what}: no disk named '{t}'")
                if os.path.exists(path):
                    raise OperationFailed(f"{what}: unsupported configuration: external snapshot file for disk "
                                          f"{t} already exists and is not a block device: {path}")
        state = ("running" if memory or memory_file else "disk-snapshot") if running else "shutoff"
        info = SnapshotInfo(name=snap, description=description, state=state,
                            memory="no" if not (memory or memory_file) else ("internal" if overlays is None
                                                                            else "external"),
                            memory_file=memory_file, base={t: d.overlay or d.base for t, d in dom.disks.items()},
                            parent=st.current)

        def create() -> None:
            record = _Snap(info)
            if overlays is None:
                for t, d in dom.disks.items():
                    info.disks[t] = "internal"
                    with open(d.overlay or d.base, "rb") as f:
                        record.contents[t] = f.read()
                record.uptime = st.uptime if memory else None
            else:
                if memory_file:
                    with open(memory_file, "w") as f:
                        json.dump({"uptime": st.uptime}, f)
                for t in dom.disks:
                    info.disks[t] = overlays.get(t, "no")
                for t, path in overlays.items():
                    with open(path, "w") as f:
                        json.dump({"backing": dom.disks[t].overlay or dom.disks[t].base, "writes": []}, f)
                for t, path in overlays.items():
                    dom.disks[t].overlay = path
            st.snaps[snap] = record
            st.current = snap
        self._effect("create_snapshot", create)  # type: ignore[attr-defined]

    def revert_to_snapshot(self, name: str, snap: str) -> None:
        dom, st = self._dom(name), self._snap_state(name)  # type: ignore[attr-defined]
        record = self._snap(name, snap)
        what = f"revert of {name} to snapshot {snap}"
        if record.info.external:
            raise OperationFailed(f"{what}: unsupported configuration: revert to external snapshot not supported yet")
        for t, d in dom.disks.items():
            if d.overlay:
                raise OperationFailed(f"{what}: Operation not supported: disk image '{t}' for internal snapshot "
                                      f"'{snap}' is not the same as disk image currently used by VM")

        def revert() -> None:
            for t, data in record.contents.items():
                with open(dom.disks[t].base, "wb") as f:
                    f.write(data)
            if record.info.state == "running":
                dom.state = "running"
                st.uptime = record.uptime or 0
            else:
                dom.state = "shutoff"
            st.current = snap
        self._effect("revert_to_snapshot", revert)  # type: ignore[attr-defined]

    def delete_snapshot(self, name: str, snap: str, *, metadata_only: bool = False) -> None:
        dom, st = self._dom(name), self._snap_state(name)  # type: ignore[attr-defined]
        record = self._snap(name, snap)
        info = record.info
        what = f"delete of snapshot {snap} of {name}"
        children = [s for s in st.snaps.values() if s.info.parent == snap]
        if not metadata_only and info.external:
            parent = st.snaps.get(info.parent) if info.parent else None
            if parent is not None and not parent.info.external:
                raise OperationFailed(f"{what}: Operation not supported: deleting external snapshot that has "
                                      "internal snapshot as parent not supported")
            if children:
                raise OperationFailed(f"{what}: Operation not supported: deletion of external disk snapshot "
                                      "with children not supported")
            for t, path in info.overlays.items():
                d = dom.disks[t]
                if d.job_polls is not None:
                    raise OperationFailed(f"{what}: Operation not supported: cannot delete external snapshots "
                                          "when there is another active block job")
                if d.overlay != path:
                    raise OperationFailed(f"{what}: operation failed: snapshot disk '{path}' was target of "
                                          "not completed snapshot delete")
        if not metadata_only and not info.external:
            for t, d in dom.disks.items():
                if d.overlay:
                    raise OperationFailed(f"{what}: Operation not supported: disk image '{t}' for internal "
                                          f"snapshot '{snap}' is not the same as disk image currently used by VM")

        def delete() -> None:
            if not metadata_only and info.external:
                for t, path in info.overlays.items():  # merge into the image below, as blockcommit does
                    d = dom.disks[t]
                    with open(path) as f:
                        for offset, hexdata in json.load(f)["writes"]:
                            fd = os.open(d.base, os.O_WRONLY)
                            try:
                                os.pwrite(fd, bytes.fromhex(hexdata), offset)
                            finally:
                                os.close(fd)
                    d.overlay = None
                    os.unlink(path)
            for child in children:
                child.info.parent = info.parent
            del st.snaps[snap]
            if st.current == snap:
                st.current = info.parent
        self._effect("delete_snapshot", delete)  # type: ignore[attr-defined]
