"""At submit: is another actor holding the domain right now?  One check for every strategy that acts on
an existing domain (``Definition.holds_domain``), called by ``Captures.submit`` before the strategy's own
validation.

Refused, with one line naming the holder:

- a live hold mark (``workflows/holds.py``): another deployment's workflow, or one of this deployment
  that is not final; an unreadable mark too (someone wrote in our namespace; we cannot tell who holds);
- a block job in flight on any disk (libvirt's job, or a ``<mirror>`` in the live XML): another tool
  is streaming, copying or committing, and our own jobs would collide with it.

A stale mark (its workflow is final, or unknown to this deployment's store) does not refuse.  A domain
that does not exist passes here; the strategy's validation says so.
"""

from __future__ import annotations

from ..errors import DomainHeld, DomainNotFound, OperationFailed
from ..holds import StatusOf, judge
from ..hypervisor.base import Hypervisor
from ..hypervisor.hold import NS


def refuse_held(hv: Hypervisor, domain: str, prefix: str, status_of: StatusOf) -> None:
    """DomainHeld (exit 2) when another actor holds ``domain``; ``hv`` may be a read-only view."""
    try:
        state = hv.domain_state(domain)
        found = judge(hv.hold_mark(domain), prefix, status_of)
        disks = hv.disks(domain)
    except DomainNotFound:
        return
    if found.kind == "live":
        raise DomainHeld(f"domain {domain} is held by {found.text}; wait for it to end, or see "
                         f"'virsh metadata {domain} {NS}'")
    if found.kind == "unreadable":
        raise DomainHeld(f"domain {domain} carries {found.text}; read it with 'virsh metadata {domain} {NS}' "
                         "and, if no one holds the domain, remove it with '--remove'")
    for disk in disks:
        job = disk.mirror_job
        if job is None and state in ("running", "paused"):
            try:
                info = hv.block_job(domain, disk.target)
            except OperationFailed:
                info = None  # a device libvirt cannot run a job on (e.g. an empty cdrom) has none
            job = info.type if info is not None else None
        if job is not None:
            raise DomainHeld(f"disk {disk.target} of {domain} has a block job ({job}) of another tool in flight; "
                             "wait for it to end")
