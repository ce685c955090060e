"""Commands around the freeze: ``--pre-freeze`` before it, ``--post-thaw`` after the thaw.

They run in the guest through the agent (``guest-exec`` of ``/bin/sh -c``),
or on the worker's host (``--hooks-on host``, with ``DOMCAPTURE_DOMAIN``,
``DOMCAPTURE_WORKFLOW`` and ``DOMCAPTURE_PHASE`` in the environment), each
cut off after ``--hook-timeout`` seconds.  A failing or hanging pre-freeze
hook follows ``--quiesce``: ``require`` rolls the capture back, ``try``
captures without a freeze.  Whatever happened, the thaw runs, and the
post-thaw hook runs whenever its pre-freeze hook was started (also in a
rollback, also after a crash).

The record says what is about to run before it runs (``data["hooks"]``), so
a crash in a hook is seen: a pre-freeze hook is run again (hooks must be
safe to repeat), a post-thaw hook is owed until it has run once.
"""

from __future__ import annotations

import time
from typing import Any

from .definition import Option
from .errors import DomcaptureError
from .steps import StepContext

DEFAULT_TIMEOUT = 30.0
WHERE = ("guest", "host")

OPT_PRE_FREEZE = Option("pre_freeze", "command run before the freeze (sh -c, in the guest by default)")
OPT_POST_THAW = Option("post_thaw", "command run after the thaw, always once the pre-freeze command started")
OPT_HOOKS_ON = Option("hooks_on", "where the hook commands run: guest (through the agent) | host", choices=WHERE)
OPT_HOOK_TIMEOUT = Option("hook_timeout", "seconds a hook may run before it is cut off (default 30)")
OPTIONS = (OPT_PRE_FREEZE, OPT_POST_THAW, OPT_HOOKS_ON, OPT_HOOK_TIMEOUT)


def _state(ctx: StepContext) -> dict[str, Any]:
    hooks: dict[str, Any] = ctx.data.setdefault("hooks", {})
    return hooks


def _run(ctx: StepContext, phase: str, command: str) -> dict[str, Any]:
    timeout = float(ctx.params.get("hook_timeout") or DEFAULT_TIMEOUT)
    where = ctx.params.get("hooks_on") or "guest"
    hooks = _state(ctx)
    hooks[phase] = {"command": command, "where": where, "started_at": time.time()}
    label = phase.replace("_", "-")  # the flag's name: pre-freeze, post-thaw
    ctx.save(f"{label}-intent", command=command, where=where)
    started = time.monotonic()
    try:
        if where == "host":
            outcome = ctx.fx.host.run(["/bin/sh", "-c", command], timeout=timeout,
                                      env={"DOMCAPTURE_DOMAIN": ctx.domain, "DOMCAPTURE_WORKFLOW": ctx.rec.id,
                                           "DOMCAPTURE_PHASE": label})
        else:
            outcome = ctx.hv.guest_exec(ctx.domain, ["/bin/sh", "-c", command], timeout)
    except DomcaptureError as exc:
        outcome = {"exitcode": None, "error": str(exc), "timed_out": False}
    outcome["seconds"] = round(time.monotonic() - started, 3)
    outcome["ok"] = outcome.get("exitcode") == 0 and not outcome.get("timed_out")
    hooks[phase].update(outcome)
    ctx.save(f"{label}-done", ok=outcome["ok"], exitcode=outcome.get("exitcode"),
             timed_out=bool(outcome.get("timed_out")))
    return outcome


def pre_freeze(ctx: StepContext) -> str | None:
    """Run the pre-freeze hook if one is set; returns why it failed, or None."""
    command = ctx.params.get("pre_freeze")
    if not command:
        return None
    out = _run(ctx, "pre_freeze", command)
    if out["ok"]:
        return None
    if out.get("timed_out"):
        return f"the pre-freeze hook was cut off after {out['seconds']:.0f} s"
    return f"the pre-freeze hook failed: {out.get('error') or 'exit code ' + str(out.get('exitcode'))}"


def post_thaw_owed(ctx: StepContext) -> bool:
    hooks = ctx.data.get("hooks") or {}
    return bool(ctx.params.get("post_thaw")) and bool(hooks.get("armed")) and "ok" not in hooks.get("post_thaw", {})


def arm(ctx: StepContext) -> None:
    """A freeze is about to be attempted: from now on the post-thaw hook is owed (recorded with the next save)."""
    if ctx.params.get("pre_freeze") or ctx.params.get("post_thaw"):
        _state(ctx)["armed"] = True


def post_thaw(ctx: StepContext) -> None:
    """Run the post-thaw hook once, if a freeze was attempted; its failure is recorded, not fatal."""
    if post_thaw_owed(ctx):
        _run(ctx, "post_thaw", ctx.params["post_thaw"])
