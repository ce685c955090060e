"""Pure tests of every strategy's graph: no services needed."""

from __future__ import annotations

import pytest

from workflows import strategies
from workflows.definition import ROLLED_BACK, ROLLING_BACK, SUCCEEDED
from workflows.errors import StepFailed, UnknownStrategy

DEFS = list(strategies.DEFINITIONS.values())


@pytest.mark.parametrize("defn", DEFS, ids=lambda d: d.name)
def test_every_forward_state_has_a_step_and_a_way_back(defn):
    for state in defn.states:
        assert state in defn.steps
        assert "rollback" in defn.triggers_from(state), state
        assert defn.fire(state, "rollback") == ROLLING_BACK
    assert defn.fire(ROLLING_BACK, "reverted") == ROLLED_BACK


@pytest.mark.parametrize("defn", DEFS, ids=lambda d: d.name)
def test_advancing_from_the_first_state_reaches_succeeded_through_every_state(defn):
    state, seen = defn.initial, []
    while state != SUCCEEDED:
        seen.append(state)
        state = defn.fire(state, "advance")
        assert len(seen) <= len(defn.states)
    assert seen == defn.states


@pytest.mark.parametrize("defn", DEFS, ids=lambda d: d.name)
def test_the_table_refuses_what_it_does_not_list(defn):
    with pytest.raises(StepFailed):
        defn.fire(SUCCEEDED, "rollback")
    with pytest.raises(StepFailed):
        defn.fire(defn.initial, "no-such-trigger")


def test_snapshot_backup_reads_like_the_guide():
    d = strategies.get("snapshot-backup")
    assert d.states == ["preflight", "freezing", "snapshotting", "thawing", "copying", "committing",
                        "waiting_ready", "pivoting", "cleaning", "finalizing"]
    assert d.fire("snapshotting", "refreeze") == "freezing"
    assert d.fire("waiting_ready", "recommit") == "committing"
    assert d.states_through("copying") == d.states[:5]


def test_unknown_strategy_names_the_choices():
    with pytest.raises(UnknownStrategy, match="snapshot-backup"):
        strategies.get("nope")
