"""A chaos run's report: the table it prints, its JSON, one self-contained HTML page, and the difference of two.

The JSON (``report.json``, schema ``REPORT_VERSION``) holds every workflow
(its states with their times), every fault, every guest downtime and every
invariant with its violations.  The HTML page (``report.html``) is built
from the same document with nothing outside it: inline CSS and an inline SVG
timeline.
"""

from __future__ import annotations

import collections
import html
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import Chaos

REPORT_VERSION = 1
OUTCOMES = ("succeeded", "rolled_back", "partially_rolled_back", "needs_attention")
WF_ID = re.compile(r"\b([0-9a-f]{8,})\b")


def state_spans(history: list[dict[str, Any]], end: float) -> list[dict[str, Any]]:
    """The states a workflow went through, each with when it was entered and left."""
    spans: list[dict[str, Any]] = []
    for ev in history:
        state, ts = ev.get("state"), ev.get("ts")
        if not state or not isinstance(ts, (int, float)):
            continue
        if spans and spans[-1]["state"] == state:
            continue
        if spans:
            spans[-1]["until"] = ts
        spans.append({"state": state, "status": ev.get("status"), "from": ts, "until": None})
    if spans:
        spans[-1]["until"] = spans[-1]["until"] or max(spans[-1]["from"], min(end, history[-1].get("ts") or end))
    return spans


def build(chaos: Chaos) -> dict[str, Any]:
    """The run as one JSON document."""
    o = chaos.opts
    workflows = []
    for wf, meta in chaos.workflows.items():
        d = chaos.docs.get(wf)
        history = (d or {}).get("history") or []
        workflows.append({
            "id": wf, "strategy": meta["strategy"], "label": meta["label"], "domain": meta["subject"].dom.name,
            "submitted_at": meta["submitted_at"], "status": d["status"] if d else "LOST",
            "state": d.get("state") if d else None, "ended_at": history[-1]["ts"] if history else None,
            "verify": chaos.verify_outcome.get(wf), "attention": (d or {}).get("attention"),
            "operator": chaos.operator.get(wf), "states": state_spans(history, chaos.ended_at),
            "history": history,
        })
    invariants = [{"name": name, "checked": checked, "violations": bad,
                   "workflows": sorted({m for b in bad for m in WF_ID.findall(b) if m in chaos.workflows})}
                  for name, checked, bad in chaos.rows]
    return {
        "version": REPORT_VERSION, "seed": o.seed, "duration": o.duration, "workers": o.workers,
        "tagged": o.tagged, "faults_enabled": o.faults, "strategies": o.strategies,
        "started_at": chaos.started_at, "ended_at": chaos.ended_at,
        "domains": [{"name": s.dom.name, "kind": s.kind} for s in chaos.subjects],
        "workflows": workflows, "faults": chaos.faults, "downtimes": chaos.downtimes,
        "invariants": invariants, "counts": counts(workflows, chaos.faults, invariants),
    }


def counts(workflows: list[dict[str, Any]], faults: list[dict[str, Any]],
           invariants: list[dict[str, Any]]) -> dict[str, Any]:
    per: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for w in workflows:
        per[w["strategy"]][w["status"] if w["status"] in OUTCOMES else "other"] += 1
    return {"workflows": len(workflows), "faults": len(faults),
            "violations": sum(len(i["violations"]) for i in invariants),
            "per_strategy": {k: {"total": sum(c.values()), **{x: c[x] for x in (*OUTCOMES, "other")}}
                             for k, c in sorted(per.items())},
            "per_fault": dict(sorted(collections.Counter(f["kind"] for f in faults).items()))}


def table(doc: dict[str, Any], workdir: Path | None = None) -> str:
    """The run's table, as printed at its end."""
    c = doc["counts"]
    lines = [f"chaos run: seed {doc['seed']}, {doc['duration']:.0f} s, {doc['workers']} workers, "
             f"{len(doc['domains'])} domains" + (f"; logs in {workdir}" if workdir else ""),
             "", "workflows per strategy",
             f"  {'strategy':<20} {'total':>5} {'succeeded':>9} {'rolled_back':>11} {'partial':>7} "
             f"{'needs_att':>9} {'other':>5}"]
    for strat, n in c["per_strategy"].items():
        lines.append(f"  {strat:<20} {n['total']:>5} {n['succeeded']:>9} {n['rolled_back']:>11} "
                     f"{n['partially_rolled_back']:>7} {n['needs_attention']:>9} {n['other']:>5}")
    lines += ["", "faults injected"]
    for kind in doc["faults_enabled"]:
        lines.append(f"  {kind:<20} {c['per_fault'].get(kind, 0):>5}")
    lines += ["", "invariants"]
    for inv in doc["invariants"]:
        bad = inv["violations"]
        lines.append(f"  {'OK  ' if not bad else 'FAIL'} {inv['name']:<70} checked {inv['checked']:>4}  "
                     f"violations {len(bad)}")
        lines += [f"       - {b}" for b in bad[:10]]
    lines.append(f"\n{c['workflows']} workflows, {c['faults']} faults, {c['violations']} violations "
                 f"(seed {doc['seed']})")
    return "\n".join(lines)


def write(doc: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(doc, indent=1, sort_keys=True, default=str))
    (folder / "report.html").write_text(page(doc))


# -- HTML -------------------------------------------------------------------------------------------
COLOURS = {"succeeded": "#3a9d5d", "rolled_back": "#d9a521", "partially_rolled_back": "#e07b39",
           "needs_attention": "#c23b3b", "running": "#4a7fc1", "queued": "#9aa7b5", "rolling_back": "#b07cc6"}
CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
.ok{color:#3a9d5d}.fail{color:#c23b3b;font-weight:bold}svg text{font:10px monospace}
details{margin:.3em 0}pre{background:#f4f4f4;padding:.5em;overflow:auto;font-size:12px}"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def timeline(doc: dict[str, Any]) -> str:
    """An inline SVG: a row of fault marks, then one row per workflow with its states."""
    t0, t1 = doc["started_at"], max(doc["ended_at"], doc["started_at"] + 1)
    left, width, row = 150, 1000, 12
    x = lambda t: left + (t - t0) / (t1 - t0) * width  # noqa: E731
    wfs = sorted(doc["workflows"], key=lambda w: w["submitted_at"])
    height = 40 + row * (len(wfs) + 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" height="{height}" '
           f'id="timeline"><text x="4" y="14">faults</text>']
    for f in doc["faults"]:
        out.append(f'<rect x="{x(f["at"]):.1f}" y="4" width="{max(2.0, x(f["end"]) - x(f["at"])):.1f}" '
                   f'height="14" fill="#c23b3b" opacity=".7"><title>{_e(f["kind"])} {_e(f["detail"])}</title></rect>')
    for i, w in enumerate(wfs):
        y = 28 + i * row
        out.append(f'<a href="#wf-{_e(w["id"])}"><text x="4" y="{y + 9}">{_e(w["strategy"][:14])} '
                   f'{_e(w["id"][:6])}</text></a>')
        for sp in w["states"]:
            colour = COLOURS.get(sp["status"] or "", "#777")
            out.append(f'<rect x="{x(sp["from"]):.1f}" y="{y}" width="{max(1.0, x(sp["until"]) - x(sp["from"])):.1f}"'
                       f' height="{row - 2}" fill="{colour}"><title>{_e(w["id"])} {_e(sp["state"])} '
                       f'({_e(sp["status"])})</title></rect>')
    out.append("</svg>")
    return "".join(out)


def page(doc: dict[str, Any]) -> str:
    c = doc["counts"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>chaos run, seed {_e(doc['seed'])}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>chaos run: seed {_e(doc['seed'])}</h1><p>{doc['duration']:.0f} s, {doc['workers']} workers, "
             f"{len(doc['domains'])} domains ({_e(', '.join(d['name'] for d in doc['domains']))}); "
             f"{c['workflows']} workflows, {c['faults']} faults, "
             f"<span class='{'fail' if c['violations'] else 'ok'}'>{c['violations']} violations</span></p>",
             "<h2>Timeline</h2>", timeline(doc),
             "<h2>Workflows per strategy</h2><table id='per-strategy'><tr><th>strategy</th><th>total</th>"
             + "".join(f"<th>{o}</th>" for o in (*OUTCOMES, "other")) + "</tr>"]
    for strat, n in c["per_strategy"].items():
        parts.append(f"<tr class='strategy'><td>{_e(strat)}</td><td>{n['total']}</td>"
                     + "".join(f"<td>{n[o]}</td>" for o in (*OUTCOMES, "other")) + "</tr>")
    parts.append("</table><h2>Faults</h2><table id='per-fault'><tr><th>fault</th><th>injected</th></tr>")
    for kind in doc["faults_enabled"]:
        parts.append(f"<tr class='fault'><td>{_e(kind)}</td><td>{c['per_fault'].get(kind, 0)}</td></tr>")
    parts.append("</table><h2>Invariants</h2><table id='invariants'><tr><th>invariant</th><th>checked</th>"
                 "<th>violations</th></tr>")
    for inv in doc["invariants"]:
        bad = inv["violations"]
        items = "".join("<li>" + WF_ID.sub(lambda m: f"<a href='#wf-{m.group(1)}'>{m.group(1)}</a>"
                                           if m.group(1) in {w["id"] for w in doc["workflows"]} else m.group(1),
                                           _e(b)) + "</li>" for b in bad)
        parts.append(f"<tr><td>{_e(inv['name'])}{'<ul>' + items + '</ul>' if bad else ''}</td>"
                     f"<td>{inv['checked']}</td><td class='{'fail' if bad else 'ok'}'>{len(bad)}</td></tr>")
    parts.append("</table><h2>Workflows</h2>")
    for w in sorted(doc["workflows"], key=lambda w: w["submitted_at"]):
        hist = "\n".join(json.dumps(ev, sort_keys=True) for ev in w["history"])
        parts.append(f"<details id='wf-{_e(w['id'])}'><summary>{_e(w['id'])} {_e(w['label'])} on "
                     f"{_e(w['domain'])}: {_e(w['status'])} ({_e(w['state'])}), verify {_e(w['verify'])}"
                     f"</summary><pre>{_e(hist)}</pre></details>")
    parts.append("</body></html>")
    return "".join(parts)


# -- compare -----------------------------------------------------------------------------------------
def load(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or doc.get("version") != REPORT_VERSION or "counts" not in doc:
        raise ValueError(f"{path} is not a chaos report (version {REPORT_VERSION})")
    return doc


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, int, int]]:
    """What differs between two reports: counts per strategy and outcome, per fault, per invariant."""
    ca, cb = a["counts"], b["counts"]
    rows: list[tuple[str, int, int]] = [("seed", a["seed"], b["seed"])]
    rows += [(k, ca[k], cb[k]) for k in ("workflows", "faults", "violations")]
    for strat in sorted(set(ca["per_strategy"]) | set(cb["per_strategy"])):
        for o in ("total", *OUTCOMES, "other"):
            rows.append((f"{strat} {o}", ca["per_strategy"].get(strat, {}).get(o, 0),
                         cb["per_strategy"].get(strat, {}).get(o, 0)))
    for kind in sorted(set(ca["per_fault"]) | set(cb["per_fault"])):
        rows.append((f"fault {kind}", ca["per_fault"].get(kind, 0), cb["per_fault"].get(kind, 0)))
    inv_a = {i["name"]: len(i["violations"]) for i in a["invariants"]}
    inv_b = {i["name"]: len(i["violations"]) for i in b["invariants"]}
    rows += [(f"violations: {name}", inv_a.get(name, 0), inv_b.get(name, 0))
             for name in sorted(set(inv_a) | set(inv_b))]
    return [r for r in rows if r[1] != r[2]]


def compare_text(rows: list[tuple[str, int, int]], name_a: str, name_b: str) -> str:
    if not rows:
        return "the two reports have the same counts"
    width = max(len(label) for label, _, _ in rows)
    lines = [f"{'':<{width}} {name_a[-16:]:>16} {name_b[-16:]:>16} {'change':>7}"]
    lines += [f"{label:<{width}} {x:>16} {y:>16} {y - x:>+7}" for label, x, y in rows]
    return "\n".join(lines)
