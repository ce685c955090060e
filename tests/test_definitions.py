"""Pure tests of every strategy's graph: no services needed."""

from __future__ import annotations

import pytest

from workflows import strategies
from workflows.definition import (END_STATES, PARTIALLY_ROLLED_BACK, RESUME, ROLLBACK, ROLLED_BACK, ROLLING_BACK,
                                  SUCCEEDED)
from workflows.errors import StepFailed, UnknownStrategy

DEFS = list(strategies.DEFINITIONS.values())


WAY_BACK = {"rollback", "reverted", "reverted_partially"}


def forward_graph(defn) -> dict[str, dict[str, str]]:
    """state -> {trigger: destination}, from the machine itself: every trigger of every forward
    state is fired, so a destination the machine does not know fails here, not mid-workflow."""
    return {state: {t: defn.fire(state, t) for t in defn.triggers_from(state) if t not in WAY_BACK}
            for state in defn.states}


@pytest.mark.parametrize("defn", DEFS, ids=lambda d: d.name)
def test_every_forward_state_has_a_step_and_a_way_back(defn):
    for state in defn.states:
        assert state in defn.steps
        assert defn.fire(state, "rollback") == ROLLING_BACK
    # the way back ends in one of two honest statuses, and nothing leads forward from it
    assert defn.triggers_from(ROLLING_BACK) == ["reverted", "reverted_partially"]
    assert defn.fire(ROLLING_BACK, "reverted") == ROLLED_BACK
    assert defn.fire(ROLLING_BACK, "reverted_partially") == PARTIALLY_ROLLED_BACK
    for end in END_STATES:
        assert defn.triggers_from(end) == [], end
        with pytest.raises(StepFailed):
            defn.fire(end, "rollback")


@pytest.mark.parametrize("defn", DEFS, ids=lambda d: d.name)
def test_the_table_names_only_its_own_states(defn):
    known = set(defn.states) | {SUCCEEDED}
    for trigger, source, dest in defn.transitions:
        assert trigger not in WAY_BACK, f"{trigger!r} is the engine's own trigger"
        assert source in defn.states, f"{trigger}: unknown source {source!r}"
        assert dest in known, f"{trigger} from {source}: unknown destination {dest!r}"
    assert set(defn.on_crash) <= set(defn.states), set(defn.on_crash) - set(defn.states)
    assert set(defn.on_crash.values()) <= {RESUME, ROLLBACK}


@pytest.mark.parametrize("defn", DEFS, ids=lambda d: d.name)
def test_every_state_is_reachable_and_can_still_succeed(defn):
    graph = forward_graph(defn)
    for state, moves in graph.items():
        assert set(moves.values()) <= set(defn.states) | {SUCCEEDED}, (state, moves)
    reached, todo = {defn.initial}, [defn.initial]
    while todo:
        for dest in graph.get(todo.pop(), {}).values():
            if dest not in reached:
                reached.add(dest)
                todo.append(dest)
    assert reached == set(defn.states) | {SUCCEEDED}, set(defn.states) - reached
    # no forward dead end: from every state some path still leads to succeeded
    can_finish = {SUCCEEDED}
    changed = True
    while changed:
        changed = False
        for state, moves in graph.items():
            if state not in can_finish and can_finish & set(moves.values()):
                can_finish.add(state)
                changed = True
    assert can_finish >= set(defn.states), set(defn.states) - can_finish


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
