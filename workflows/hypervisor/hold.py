"""The hold mark: a visible sign, in a domain's own ``<metadata>``, that a workflow of ours holds it.

libvirt has no lock, so this is only a notice: ``virsh metadata D
https://domcapture.org/xmlns/hold/1`` shows who holds the domain.  Both
adapters write and read it here, so they cannot disagree on its shape.

The element comes back from a domain's XML, which anyone with access to
libvirt may have written: it is parsed defensively (a size cap, no DTD, every
attribute checked against its shape) and a mark that does not pass is
reported as ``{"unreadable": why}``, never followed.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from typing import Any

NS = "https://domcapture.org/xmlns/hold/1"
KEY = "domcapture"  # the namespace prefix libvirt writes the element under
TAG = "hold"
MAX_XML = 4096

_ID = re.compile(r"^[0-9a-f]{16}$")
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_STRATEGY = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
_ISO = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{8,15}Z$")
_WORKER = re.compile(r"^[A-Za-z0-9_.:@/+-]{1,200}$")

#: attribute -> what it must look like (a mark with any other shape is unreadable)
_FIELDS: dict[str, re.Pattern[str]] = {"workflow": _ID, "strategy": _STRATEGY, "started": _ISO,
                                       "worker": _WORKER, "prefix": _PREFIX}


def mark_xml(mark: dict[str, Any]) -> str:
    """The element for ``mark`` ({workflow, strategy, started, started_epoch, worker, prefix}).

    Every value is checked first (a value of another shape is a bug here, not input), so what is
    written always reads back; ElementTree escapes the attributes."""
    for name, shape in _FIELDS.items():
        if not isinstance(mark.get(name), str) or not shape.match(mark[name]):
            raise ValueError(f"hold mark: {name}={mark.get(name)!r} does not have the shape of a {name}")
    epoch = float(mark["started_epoch"])
    el = ET.Element(TAG, {**{name: mark[name] for name in _FIELDS}, "started-epoch": f"{epoch:.3f}"})
    return ET.tostring(el, encoding="unicode")


def parse_mark(xml: str | None) -> dict[str, Any] | None:
    """The mark in ``xml`` (our namespace's element, as libvirt returns it), None for no mark, or
    ``{"unreadable": why}`` (why never quotes the untrusted text)."""
    if xml is None or not xml.strip():
        return None
    if len(xml) > MAX_XML:
        return {"unreadable": f"longer than {MAX_XML} characters"}
    if "<!" in xml:
        return {"unreadable": "holds a DTD, entity or comment"}
    try:
        el = ET.fromstring(xml)
    except ET.ParseError:
        return {"unreadable": "not well-formed XML"}
    if el.tag not in (TAG, f"{{{NS}}}{TAG}"):
        return {"unreadable": "its element is not <hold>"}
    out: dict[str, Any] = {}
    for name, shape in _FIELDS.items():
        value = el.get(name)
        if value is None or not shape.match(value):
            return {"unreadable": f"attribute {name} is missing or malformed"}
        out[name] = value
    try:
        epoch = float(el.get("started-epoch", ""))
    except ValueError:
        return {"unreadable": "attribute started-epoch is missing or malformed"}
    if not math.isfinite(epoch) or epoch <= 0:
        return {"unreadable": "attribute started-epoch is missing or malformed"}
    out["started_epoch"] = epoch
    return out
