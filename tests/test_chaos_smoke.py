"""A bounded run of the installed ``domcapture chaos`` on every CI run: the six infrastructure fault kinds,
a fixed seed, its report checked against its table.

The long run is ``domcapture chaos --duration 600 --seed N`` (docs/chaos.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from .realenv import DOMCAPTURE

# it restarts the shared libvirtd: run alone, after the parallel part of the suite (scripts/test.sh)
pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.exclusive]

ROW = re.compile(r"^  (\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$")
FAULT_ROW = re.compile(r"^  ([a-z-]+)\s+(\d+)$")


def table_counts(out: str) -> tuple[dict[str, list[int]], dict[str, int], int]:
    """What the printed table says: per strategy [total, succeeded, rolled back, partial, needs attention,
    other], per fault kind, and the total of workflows."""
    section, per, faults = "", {}, {}
    for line in out.splitlines():
        if line in ("workflows per strategy", "faults injected", "invariants"):
            section = line
        elif section == "workflows per strategy" and (m := ROW.match(line)):
            per[m.group(1)] = [int(x) for x in m.groups()[1:]]
        elif section == "faults injected" and (m := FAULT_ROW.match(line)):
            faults[m.group(1)] = int(m.group(2))
    m = re.search(r"^(\d+) workflows, (\d+) faults, (\d+) violations", out, re.M)
    assert m, out
    return per, faults, int(m.group(1))


def test_bounded_chaos_run_has_no_violations_and_its_report_matches(libvirt_uri, redis_client, guest_image,
                                                                     tmp_path):
    # it restarts libvirtd and mounts a tmpfs: not being root is a failure here, never a skip
    assert os.geteuid() == 0, "the chaos run needs root (it restarts libvirtd and mounts a tmpfs)"
    seed = os.environ.get("DOMCAPTURE_CHAOS_SEED", "20261126")
    duration = os.environ.get("DOMCAPTURE_CHAOS_SECONDS", "75")
    rep = tmp_path / "report"
    out = subprocess.run([DOMCAPTURE, "chaos", "--seed", seed, "--duration", duration, "--workers", "3",
                          "--disk-domains", "2", "--guests", "1", "--fault-interval", "1", "3",
                          "--guest-dir", str(guest_image), "--report", str(rep)],
                         capture_output=True, text=True, timeout=float(duration) + 600)
    text = out.stdout + out.stderr
    print(text)
    doc = json.loads((rep / "report.json").read_text())
    per, faults, total = table_counts(out.stdout)
    # the JSON says what the table says
    assert total == doc["counts"]["workflows"] == len(doc["workflows"]), text
    assert {k: [v["total"], v["succeeded"], v["rolled_back"], v["partially_rolled_back"], v["needs_attention"],
                v["other"]] for k, v in doc["counts"]["per_strategy"].items()} == per, text
    assert {k: v for k, v in faults.items() if v} == doc["counts"]["per_fault"], text
    assert len(doc["faults"]) == sum(faults.values())
    assert all(f["at"] <= f["end"] for f in doc["faults"])
    assert all(w["states"] and w["submitted_at"] <= w["states"][-1]["until"] for w in doc["workflows"])
    # one self-contained page: the timeline, a row per strategy, nothing fetched from elsewhere
    page = (rep / "report.html").read_text()
    assert "<svg" in page and 'id="timeline"' in page
    assert page.count("<tr class='strategy'>") == len(per)
    for strategy in per:
        assert f"<tr class='strategy'><td>{strategy}</td>" in page
    assert not re.search(r"<(script|link|img)[^>]*(src|href)=", page)
    assert sum(faults.values()) >= 10, text
    assert total >= 5, text
    assert doc["counts"]["violations"] == 0 and out.returncode == 0, text

    # the difference of two reports: none with itself; a changed count is named
    same = subprocess.run([DOMCAPTURE, "chaos", "--compare", str(rep / "report.json"), str(rep / "report.json")],
                          capture_output=True, text=True, timeout=30)
    assert same.returncode == 0 and same.stdout.strip() == "the two reports have the same counts"
    doc["counts"]["faults"] += 3
    other = tmp_path / "b.json"
    other.write_text(json.dumps(doc))
    diff = subprocess.run([DOMCAPTURE, "chaos", "--compare", str(rep / "report.json"), str(other), "--json"],
                          capture_output=True, text=True, timeout=30)
    assert diff.returncode == 0
    assert json.loads(diff.stdout) == [{"what": "faults", "a": sum(faults.values()), "b": sum(faults.values()) + 3}]
