"""What a libvirt domain snapshot holds, as a plain value (shared by libvirt and the fake)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SnapshotInfo:
    name: str
    description: str
    state: str  # the domain's state when taken: running | paused | shutoff | disk-snapshot
    memory: str  # internal | external | no
    memory_file: str | None
    disks: dict[str, str] = field(default_factory=dict)  # target -> "internal" | "no" | overlay path
    base: dict[str, str] = field(default_factory=dict)  # target -> the image the snapshot was taken of
    current: bool = False
    parent: str | None = None
    children: int = 0

    @property
    def external(self) -> bool:
        return self.memory == "external" or any(v not in ("internal", "no") for v in self.disks.values())

    @property
    def overlays(self) -> dict[str, str]:
        """target -> overlay file, for the disks captured externally."""
        return {t: v for t, v in self.disks.items() if v not in ("internal", "no")}

    @property
    def has_memory(self) -> bool:
        return self.memory != "no"
