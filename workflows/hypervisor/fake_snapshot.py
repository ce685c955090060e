"""The in-memory fake's side of the snapshot operations (mixed into FakeHypervisor)."""

from __future__ import annotations


class FakeSnapshotOps:
    pass
