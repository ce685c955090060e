"""Steps: execute / probe / revert, and the context they run in.

- ``probe(ctx)`` asks the hypervisor (never the record alone) whether the
  step's effect already happened; a re-run after a crash skips ``execute``.
- ``execute(ctx)`` records its intent (artifact names, deadlines) through
  ``ctx.save`` *before* calling the hypervisor, then performs the effect.
- ``revert(ctx)`` undoes the effect if present; it only touches artifacts the
  record names, and it is idempotent.
- ``next_trigger(ctx)`` names the transition to fire afterwards (``advance``
  unless the step decides otherwise).

Step results go into ``ctx.rec.data`` as JSON, since a revert may run in
another process.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from .errors import Cancelled

if TYPE_CHECKING:
    from .effects import Effects
    from .hypervisor.base import Hypervisor
    from .record import Record


#: seconds between two progress writes (a module value, so exhaustive crash tests can make every
#: persistence boundary deterministic by setting it to 0)
PROGRESS_INTERVAL = 1.0


class StepContext:
    """What a step sees: its record, the effects port (``fx``), persistence and the guards."""

    def __init__(self, rec: "Record", fx: "Effects", save: Callable[..., None],
                 guard: Callable[[], None], cancelled: Callable[[], str | None],
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 progress_interval: float | None = None) -> None:
        self.rec = rec
        self.fx = fx
        self._save = save
        self.guard = guard  # raises LeaseLost
        self._cancelled = cancelled
        self.clock = clock
        self.sleep = sleep
        self.progress_interval = PROGRESS_INTERVAL if progress_interval is None else progress_interval
        self._last_progress = 0.0
        self._rate_mark: tuple[float, int] | None = None

    @property
    def hv(self) -> "Hypervisor":
        """The fenced hypervisor of the effects port."""
        return self.fx.hv

    @property
    def domain(self) -> str:
        return self.rec.domain

    @property
    def params(self) -> dict[str, Any]:
        return self.rec.params

    @property
    def data(self) -> dict[str, Any]:
        return self.rec.data

    def save(self, event: str | None = None, **detail: Any) -> None:
        """Persist the record now (fenced).  Use before every effect."""
        self._save(event, **detail)
        self._last_progress = self.clock()  # the progress went with it: the next progress-only save can wait

    def effect_stands(self, reason: str) -> None:
        """Record, during a rollback, an effect that cannot be undone: the workflow then ends
        ``partially_rolled_back`` instead of ``rolled_back``, with this reason in its result."""
        standing = self.rec.data.setdefault("effects_standing", [])
        if reason not in standing:
            standing.append(reason)
        self.save("effect-stands", reason=reason)

    def check_cancel(self) -> None:
        reason = self._cancelled()
        if reason and self.rec.mode == "forward":
            raise Cancelled(reason)

    def progress(self, phase: str, done: int, total: int, *, force: bool = False, **extra: Any) -> None:
        """Record progress (bytes, percent, rate); persisted at most once per interval."""
        now = self.clock()
        if self._rate_mark is None or self._rate_mark[1] > done:
            self._rate_mark = (now, done)
        t0, d0 = self._rate_mark
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        self.rec.progress = {"phase": phase, "state": self.rec.state, "bytes_done": done, "bytes_total": total,
                             "percent": round(100.0 * done / total, 1) if total else 100.0,
                             "rate_bytes_per_s": round(rate), "updated_at": now, **extra}
        if force or now - self._last_progress >= self.progress_interval:
            self._last_progress = now
            self.save(None)


class Step:
    """A state's work.  Subclasses override what applies."""

    #: what a crash in this state leads to when not overridden by the definition
    description = ""

    def probe(self, ctx: StepContext) -> bool:
        return False

    def execute(self, ctx: StepContext) -> None:
        raise NotImplementedError

    def revert(self, ctx: StepContext) -> None:
        return None

    def redirect(self, ctx: StepContext) -> str | None:
        """A trigger to fire instead of running the step (e.g. go back and re-freeze)."""
        return None

    def next_trigger(self, ctx: StepContext) -> str:
        return "advance"
