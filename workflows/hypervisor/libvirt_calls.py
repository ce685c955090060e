"""What the libvirt mixins (save, snapshot, backup calls) need from the adapter that combines them."""

from __future__ import annotations

from typing import Callable, TypeVar

import libvirt

T = TypeVar("T")


class LibvirtCalls:
    """Declares the adapter's two primitives; ``LibvirtHypervisor`` implements them."""

    def _call(self, what: str, fn: Callable[[libvirt.virConnect], T]) -> T:
        raise NotImplementedError

    def _dom(self, conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
        raise NotImplementedError
