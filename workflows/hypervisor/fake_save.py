"""The in-memory fake's side of the save operations (mixed into FakeHypervisor)."""

from __future__ import annotations


class FakeSaveOps:
    pass
