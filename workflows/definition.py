"""A strategy's definition: its states, its transitions table, its steps.

One static ``transitions`` machine is built per definition.  A record is
attached to it in its saved state (``add_model(initial=record.state)``, which
runs no entry callback), one trigger is fired, and the record is detached.
Callbacks only record and validate; all I/O happens in the steps.

Every definition gets the same way back, added here so no strategy can forget
it: ``rollback`` from any forward state to ``rolling_back``, ``reverted`` from
there to ``rolled_back`` (nothing of the workflow remains), or
``reverted_partially`` to ``partially_rolled_back`` (an effect that cannot be
undone stands, and the record names it).  A workflow that nothing automatic can move keeps
its state (where in the sequence it stopped) and gets the *status*
``needs_attention`` with the reason and the command to run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from transitions import Machine, MachineError

from .errors import StepFailed

if TYPE_CHECKING:
    from .effects import Inspect
    from .record import Record
    from .steps import Step

SUCCEEDED = "succeeded"
ROLLING_BACK = "rolling_back"
ROLLED_BACK = "rolled_back"
PARTIALLY_ROLLED_BACK = "partially_rolled_back"
END_STATES = (SUCCEEDED, ROLLED_BACK, PARTIALLY_ROLLED_BACK)

RESUME = "resume"
ROLLBACK = "rollback"


@dataclass(frozen=True)
class Option:
    """A submit parameter of a strategy; the CLI turns it into ``--name-with-dashes``."""

    name: str
    help: str
    flag: bool = False  # a switch (store_true) rather than a value
    choices: tuple[str, ...] | None = None


class _Model:
    """What a record looks like to the machine: just its state."""

    def __init__(self, state: str) -> None:
        self.state = state


@dataclass
class Definition:
    name: str
    version: int
    states: list[str]  # forward states, in order
    transitions: list[list[str]]  # [trigger, source, dest]
    steps: dict[str, "Step"]
    on_crash: dict[str, str]  # state -> resume | rollback
    validate: Callable[["Inspect", str, dict[str, Any]], dict[str, Any]]  # (look, domain, params) -> params
    options: tuple[Option, ...] = ()
    # (record, hypervisor) -> checks [{"item", "ok", ...}]; None: the files in result["files"]
    verify: Callable[["Record", "Inspect"], list[dict[str, Any]]] | None = None
    max_attempts: int = 3
    summary: str = ""
    # (load_record, params) -> params: turns a reference to another workflow (``--from ID``) into what
    # validate needs, before validate runs; load_record raises RecordNotFound
    resolve: Callable[..., dict[str, Any]] | None = None
    # whether it acts on the existing domain it names (and marks it held while it runs, refusing another
    # actor's hold at submit); False: it only reads backups, or defines a new domain (restores, mounts)
    holds_domain: bool = True
    # a group (group-backup): the domains its validated params name; each is refused at submit, as a single
    # capture's domain is, when another workflow has it or another actor holds it
    members: Callable[[dict[str, Any]], list[str]] | None = None
    _machine: Machine = field(init=False, repr=False)

    def __post_init__(self) -> None:
        missing = [s for s in self.states if s not in self.steps]
        if missing:
            raise ValueError(f"definition {self.name}: states without a step: {missing}")
        table: list[list[Any]] = [list(t) for t in self.transitions]
        table.append(["rollback", self.states, ROLLING_BACK])
        table.append(["reverted", ROLLING_BACK, ROLLED_BACK])
        table.append(["reverted_partially", ROLLING_BACK, PARTIALLY_ROLLED_BACK])
        self._machine = Machine(model=None, states=self.states + list(END_STATES) + [ROLLING_BACK],
                                transitions=[{"trigger": t, "source": s, "dest": d} for t, s, d in table],
                                initial=self.states[0], auto_transitions=False, ignore_invalid_triggers=False)

    @property
    def initial(self) -> str:
        return self.states[0]

    def fire(self, state: str, trigger: str) -> str:
        """The state that ``trigger`` leads to from ``state``; refuses what the table does not allow."""
        model = _Model(state)
        self._machine.add_model(model, initial=state)
        try:
            model.trigger(trigger)  # type: ignore[attr-defined]
        except (MachineError, AttributeError) as exc:
            raise StepFailed(f"{self.name}: no transition {trigger!r} from state {state!r}") from exc
        finally:
            self._machine.remove_model(model)
        return model.state

    def triggers_from(self, state: str) -> list[str]:
        return sorted(self._machine.get_triggers(state))

    def states_through(self, state: str) -> list[str]:
        """Forward states up to and including ``state``: what may have effects to revert."""
        if state not in self.states:
            return list(self.states)
        return self.states[: self.states.index(state) + 1]

    def crash_policy(self, state: str) -> str:
        return self.on_crash.get(state, RESUME)
