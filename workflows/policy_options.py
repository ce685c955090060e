"""A policy's strategy options, checked at ``policy apply`` the way ``submit`` checks them, with no host.

The strategy's own ``validate`` runs with a stand-in hypervisor that stops it
at its first libvirt call (``_NeedsHost``): every check it makes before that
(the parsers of ``workflows.validate`` and ``strategies.common``, and the
checks between options, such as ``--compress needs --mode pull``) runs as at
submit.  Each option is first checked alone from its declaration: a name the
strategy declares, a switch that is true or false, one of its choices, a
number of seconds, a bandwidth, text without control characters.  So what a
``validate`` reads only after asking libvirt is still checked.

The target folder stands in as the system's temporary folder: whether the
policy's own target exists and is safe is checked at each slot, by ``submit``
on the scheduler's host (at apply it may not be mounted yet).
"""

from __future__ import annotations

import re
import tempfile
from typing import TYPE_CHECKING, Any, cast

from . import validate
from .effects import Inspect
from .errors import DomcaptureError, InputError

if TYPE_CHECKING:
    from .definition import Definition

#: options a policy sets itself: ``target`` at the top, ``incremental`` through ``[full]``
POLICY_SET = ("target", "incremental")
_FLAG_RE = re.compile(r"--([a-z][a-z0-9-]*)")


class _NeedsHost(BaseException):
    """validate's first libvirt call: every check before it passed.  Not an Exception, so no handler in a
    validate mistakes it for a libvirt error."""


class _NoHost:
    """A hypervisor and checkpoint store that answer nothing."""

    def __getattr__(self, name: str) -> Any:
        raise _NeedsHost(name)


Problem = tuple[str, str | None, str]  # (table, key, why): "options", "mode", "must be one of ..."


def settable(defn: Definition) -> list[str]:
    """The options of ``defn`` a policy's ``[options]`` may set."""
    return sorted(o.name for o in defn.options if o.name not in POLICY_SET)


def _shape(value: Any) -> str | None:
    """Why an option's value cannot be one (None when its shape is fine)."""
    scalar = (str, int, float, bool)
    if isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return None
    return f"must be a string, a number, true/false, or a list of strings (got {type(value).__name__})"


def _alone(defn: Definition, key: str, value: Any) -> None:
    """The checks of one option by its declaration (InputError)."""
    opt = next(o for o in defn.options if o.name == key)
    if opt.flag:
        if not isinstance(value, bool):
            raise InputError(f"{validate.flag(key)} is a switch: true or false (got {value!r})")
    elif opt.choices:
        validate.choice(key, value, opt.choices)
    elif key.endswith(("_deadline", "_timeout")):
        validate.seconds(key, value)
    elif key == "bandwidth":
        validate.bandwidth(value)
    elif isinstance(value, list):
        for item in value:
            validate.text(key, item)
    elif isinstance(value, str):
        validate.text(key, value)


def _located(exc: Exception, names: list[str]) -> Problem:
    """The option an error of validate names (its first ``--flag`` that is one), and the message."""
    why = str(exc)
    for m in _FLAG_RE.finditer(why):
        name = m.group(1).replace("-", "_")
        if name == "target":
            return "", "target", why
        if name in names:
            rest = why[m.end():]
            # "--mode must be ..." -> "must be ..."; "--disks: 'x' is not ..." -> "'x' is not ..."
            said_of_it = m.start() == 0 and re.match(r"^(: | must | is | names )", rest)
            return "options", name, rest.lstrip(": ").strip() if said_of_it else why
    return "options", None, why


def problem(defn: Definition, options: dict[str, Any], target: str | None) -> Problem | None:
    """The first thing wrong with ``options`` (and a missing target) for ``defn``; None when submit-ready."""
    names = settable(defn)
    for key, value in options.items():
        if key not in names:
            return "options", key, (f"unknown option of {defn.name}; it takes "
                                    f"{', '.join(names) if names else 'no options'}")
        shape = _shape(value)
        if shape:
            return "options", key, shape
        try:
            _alone(defn, key, value)
        except InputError as exc:
            return _located(exc, [key])
    params = dict(options)
    if target is not None:
        params["target"] = tempfile.gettempdir()
    try:
        defn.validate(Inspect(cast(Any, _NoHost()), cast(Any, _NoHost())), "policy-check", params)
    except _NeedsHost:
        return None
    except (DomcaptureError, TypeError, ValueError) as exc:
        table, name, why = _located(exc, names)
        if name == "target" and target is None:
            return "", "target", f"is required by {defn.name} ({why})"
        return table, name, why
    return None
