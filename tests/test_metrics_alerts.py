"""docs/alerts.yml: valid for Prometheus (``promtool check rules``) and firing when it should
(``promtool test rules tests/alerts_test.yml``, series shaped like our /metrics)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("promtool"), "promtool is missing (Debian package prometheus)"
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=HERE)


def test_alert_rules_are_valid():
    out = promtool("check", "rules", str(HERE.parent / "docs" / "alerts.yml"))
    assert out.returncode == 0 and "SUCCESS: 6 rules found" in out.stdout, out.stdout + out.stderr


def test_alert_rules_fire_on_stale_backups_and_stuck_workflows():
    out = promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
