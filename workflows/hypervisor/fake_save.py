"""The in-memory fake's side of the save operations (mixed into FakeHypervisor).

A fake domain's "memory" is a small dict ``{"boot": n, "ticks": t}``: a cold
boot starts a new ``boot`` with ``ticks`` at 0, ``guest_tick`` advances
``ticks`` while the domain runs (its uptime), and save / managed save /
restore carry it over, so tests can tell a restored guest (same boot, ticks
continuing) from a rebooted one.  Save images are real JSON files, with
libvirt's magic, the domain's name, UUID and disks, and the memory.  Errors
follow libvirt's (see tests/test_save_contract.py).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import HypervisorUnavailable, OperationFailed

SAVE_MAGIC = "LibvirtQemudSave"
MEMORY_BYTES = 128 * 1024 * 1024


@dataclass
class _SaveState:
    persistent: bool = True
    memory: dict[str, int] | None = field(default_factory=lambda: {"boot": 1, "ticks": 0})
    managed: dict[str, int] | None = None  # the memory a managed save image holds
    job: str | None = None  # a job libvirtd is still running (tests set it)


class FakeSaveOps:
    # -- test set-up -------------------------------------------------------------------
    def _save_state(self, name: str) -> _SaveState:
        dom = self._dom(name)  # type: ignore[attr-defined]
        states: dict[str, _SaveState] = self.__dict__.setdefault("_save_states", {})
        st = states.get(name)
        if st is None:
            st = states[name] = _SaveState(memory={"boot": 1, "ticks": 0} if dom.state != "shutoff" else None)
        return st

    def guest_tick(self, name: str, n: int = 1) -> None:
        """The guest runs a little: its uptime grows."""
        dom, st = self._dom(name), self._save_state(name)  # type: ignore[attr-defined]
        if dom.state == "running" and st.memory is not None:
            st.memory["ticks"] += n

    def memory_of(self, name: str) -> dict[str, int] | None:
        mem = self._save_state(name).memory
        return dict(mem) if mem is not None else None

    # -- read-only -----------------------------------------------------------------------
    def is_persistent(self, name: str) -> bool:
        return self._save_state(name).persistent

    def has_managed_save_image(self, name: str) -> bool:
        return self._save_state(name).managed is not None

    def get_uuid(self, name: str) -> str:
        self._dom(name)  # type: ignore[attr-defined]
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"fake-domain:{name}"))

    def get_memory_bytes(self, name: str) -> int:
        self._dom(name)  # type: ignore[attr-defined]
        return MEMORY_BYTES

    def get_active_job(self, name: str) -> str | None:
        dom, st = self._dom(name), self._save_state(name)  # type: ignore[attr-defined]
        return None if dom.state == "shutoff" else st.job

    def read_save_image(self, path: str) -> dict[str, Any] | None:
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("magic") != SAVE_MAGIC:
            return None
        return {"name": doc["name"], "uuid": doc["uuid"], "disks": dict(doc["disks"])}

    # -- effects -----------------------------------------------------------------------------
    def managed_save(self, name: str) -> None:
        dom, st = self._running(name), self._save_state(name)  # type: ignore[attr-defined]
        if not st.persistent:
            raise OperationFailed(f"managed save of {name}: Requested operation is not valid: "
                                  "cannot do managed save for transient domain")

        def save() -> None:
            st.managed, st.memory = st.memory, None
            dom.state = "shutoff"
        self._effect("managed_save", save)  # type: ignore[attr-defined]

    def start(self, name: str) -> None:
        dom, st = self._dom(name), self._save_state(name)  # type: ignore[attr-defined]
        if dom.state != "shutoff":
            raise OperationFailed(f"start of {name}: Requested operation is not valid: domain is already running")

        def start() -> None:
            if st.managed is not None:
                st.memory, st.managed = st.managed, None
            else:
                boots = self.__dict__.setdefault("_boots", {})
                boots[name] = boots.get(name, 1) + 1
                st.memory = {"boot": boots[name], "ticks": 0}
            dom.state = "running"
        self._effect("start", start)  # type: ignore[attr-defined]

    def save(self, name: str, path: str) -> None:
        dom, st = self._running(name), self._save_state(name)  # type: ignore[attr-defined]
        if not os.path.isdir(os.path.dirname(path) or "."):
            raise HypervisorUnavailable(f"save of {name} to {path}: Failed to create file '{path}': "
                                        "No such file or directory", retryable=True)

        def save() -> None:
            doc = {"magic": SAVE_MAGIC, "name": name, "uuid": self.get_uuid(name),
                   "disks": {t: d.overlay or d.base for t, d in dom.disks.items()}, "memory": st.memory,
                   "pages": os.urandom(64 * 1024).hex()}
            with open(path, "w") as f:
                json.dump(doc, f)
            st.memory = None
            dom.state = "shutoff"
        self._effect("save", save)  # type: ignore[attr-defined]

    def restore(self, path: str) -> None:
        if not os.path.exists(path):
            raise HypervisorUnavailable(f"restore from {path}: Failed to open file '{path}': "
                                        "No such file or directory", retryable=True)
        with open(path) as f:
            try:
                doc = json.load(f)
            except ValueError:
                doc = {}
        if doc.get("magic") != SAVE_MAGIC:
            raise OperationFailed(f"restore from {path}: operation failed: image magic is incorrect")
        name = doc["name"]
        dom, st = self._dom(name), self._save_state(name)  # type: ignore[attr-defined]
        if dom.state != "shutoff":
            raise OperationFailed(f"restore from {path}: Requested operation is not valid: "
                                  f"domain '{name}' is already active")

        def restore() -> None:
            for target, source in doc["disks"].items():
                dom.disks[target].base = source
            st.memory = dict(doc["memory"])
            dom.state = "running"
        self._effect("restore", restore)  # type: ignore[attr-defined]

    def destroy(self, name: str) -> None:
        dom, st = self._dom(name), self._save_state(name)  # type: ignore[attr-defined]
        if dom.state == "shutoff":
            raise OperationFailed(f"destroy of {name}: Requested operation is not valid: domain is not running")

        def destroy() -> None:
            st.memory, st.job = None, None
            dom.state = "shutoff"
        self._effect("destroy", destroy)  # type: ignore[attr-defined]

    def resume(self, name: str) -> None:
        dom = self._dom(name)  # type: ignore[attr-defined]
        if dom.state != "paused":
            raise OperationFailed(f"resume of {name}: Requested operation is not valid: domain is not paused")

        def resume() -> None:
            dom.state = "running"
        self._effect("resume", resume)  # type: ignore[attr-defined]
