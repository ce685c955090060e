"""The in-memory fake's side of the backup operations (mixed into FakeHypervisor)."""

from __future__ import annotations


class FakeBackupOps:
    pass
