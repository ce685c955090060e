"""The project's one exception tree.

Whether an error is worth retrying is a property of the error (``retryable``);
only the engine decides what to do with it.  libvirt error codes are mapped to
these classes in one table, in ``workflows.hypervisor.libvirt_adapter``.
"""

from __future__ import annotations

from typing import Any


class DomcaptureError(Exception):
    """Root of every error this project raises on purpose."""

    retryable = False
    exit_code = 1

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "message": str(self), "retryable": self.retryable}


# --- input: refused before anything is written --------------------------------
class InputError(DomcaptureError):
    """Bad input from a caller: nothing was recorded, nothing was created."""

    exit_code = 2


class UnknownStrategy(InputError):
    pass


class InvalidTarget(InputError):
    pass


class UnsupportedDisk(InputError):
    pass


class DomainHeld(InputError):
    """Someone else holds the domain at submit: another deployment's (or an unfinished) workflow's hold
    mark, or another tool's block job in flight."""


class DomainBusy(DomcaptureError):
    """Another capture workflow holds the domain."""

    exit_code = 3


# --- store -------------------------------------------------------------------
class StoreError(DomcaptureError):
    pass


class SlotTaken(StoreError):
    """A scheduled slot was submitted (or recorded) already: by another scheduler, or before a crash."""

    exit_code = 3


class StoreUnavailable(StoreError):
    retryable = True
    exit_code = 4


class NotDurable(StoreError):
    """The primary took a write that no replica acknowledged in time: a failover now could lose it,
    so the effect it announces waits (``Store.replica_acks``)."""

    retryable = True
    exit_code = 4


class RecordNotFound(StoreError):
    exit_code = 2


class ConflictError(StoreError):
    """A compare-and-set lost: someone else wrote the record first."""

    retryable = True


class RecordUnreadable(StoreError):
    """A stored record this build cannot read (damaged JSON, unknown schema): it is quarantined."""

    exit_code = 3


class ConfigError(InputError):
    """A setting (flag, environment variable, Redis credentials) that cannot work."""


class LeaseLost(StoreError):
    """The writer's fencing epoch is stale: another process owns the workflow now."""


class InvalidOperation(DomcaptureError):
    """An operator command that the workflow's status does not allow."""

    exit_code = 3


# --- hypervisor --------------------------------------------------------------
class HypervisorError(DomcaptureError):
    pass


class HypervisorUnavailable(HypervisorError):
    retryable = True
    exit_code = 4


class DomainNotFound(HypervisorError, InputError):
    exit_code = 2


class DomainNotRunning(HypervisorError, InputError):
    exit_code = 2


class AgentUnavailable(HypervisorError):
    """The guest agent is not connected or refused (quiescing impossible)."""


class BlockJobError(HypervisorError):
    pass


class NotReady(BlockJobError):
    """A block job cannot pivot yet."""

    retryable = True


class OperationFailed(HypervisorError):
    pass


# --- engine --------------------------------------------------------------------
class StepFailed(DomcaptureError):
    pass


class DeadlineExceeded(StepFailed):
    pass


class NeedsAttention(StepFailed):
    """Nothing automatic may move the workflow on: someone else's change stands in its way.

    The engine neither retries nor rolls back: it thaws a frozen guest, keeps the state, and stops the
    workflow ``needs_attention`` with this reason and ``command`` (what to run once the cause is gone).
    """

    def __init__(self, message: str, *, command: str = "resume", hint: str | None = None) -> None:
        super().__init__(message)
        self.command = command  # "resume" or "rollback": the engine writes the full command line
        self.hint = hint


class Cancelled(DomcaptureError):
    """An operator asked the workflow to stop."""


# --- checkpoints (direct backups) ------------------------------------------------
class CheckpointNotFound(HypervisorError):
    """libvirt has no checkpoint of that name on the domain."""


class CheckpointInconsistent(HypervisorError):
    """A checkpoint's bitmap is missing or broken in a disk image: its chain cannot be used."""
