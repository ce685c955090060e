"""A strategy's submit options, checked for shape the same way wherever they come from.

The CLI (``domcapture submit STRATEGY --opt ...``) and the HTTP API (``POST
/api/v1/workflows``) both call :func:`submit_options`; the strategy's own
``validate`` then normalises the result inside ``Captures.submit``.  A value
option is text (as on a command line), a flag is ``True`` or absent.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from . import validate
from .definition import Definition
from .errors import InputError

# Options whose shape is checked before any Redis or libvirt call (the strategy's
# validate normalises them again, with the same parsers).
SHAPES: dict[str, Callable[[str, Any], Any]] = {
    "freeze_deadline": validate.seconds, "commit_timeout": validate.seconds,
    "backup_timeout": validate.seconds, "bandwidth": lambda name, value: validate.bandwidth(value, name),
    "encrypt_key_file": validate.key_file,
}


def submit_options(defn: Definition, values: Mapping[str, Any], *, strict: bool = False) -> dict[str, Any]:
    """The options of ``defn`` given in ``values`` (``None``/``False``: not given), checked for shape.

    With ``strict`` (a JSON caller), a name that is not one of the strategy's options is refused,
    a flag must be a boolean and a value must be text."""
    known = {opt.name: opt for opt in defn.options}
    if strict:
        for name in values:
            if name not in known:
                raise InputError(f"{str(name)[:60]}: not an option of {defn.name}; it takes "
                                 f"{', '.join(sorted(known)) or 'none'}")
    params: dict[str, Any] = {}
    for opt in defn.options:
        value = values.get(opt.name)
        if value is None or value is False:
            continue
        if opt.flag:
            if strict and value is not True:
                raise InputError(f"{opt.name}: a flag: true, false or absent")
            value = True
        else:
            if strict and not isinstance(value, str):
                raise InputError(f"{opt.name}: give text, as on the command line")
            value = validate.workflow_id(value, opt.name) if opt.name == "from" else validate.text(opt.name, value)
            if opt.choices:
                validate.choice(opt.name, value, opt.choices)
            if opt.name in SHAPES:
                SHAPES[opt.name](opt.name, value)
        params[opt.name] = value
    return params
