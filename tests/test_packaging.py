"""The deployment files: docker-compose.yml parses and runs commands that exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import yaml

from workers.cli import build_parser

REPO = Path(__file__).resolve().parent.parent


def subcommands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return set(cast(dict[str, Any], sub.choices))  # a subparsers action: name -> its parser


def test_compose_services_run_existing_commands():
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"redis", "worker", "recovery"} <= set(services)
    cmds = subcommands()
    for name in ("worker", "recovery"):
        svc = services[name]
        assert svc["command"][0] in cmds, svc["command"]
        assert svc["environment"]["DOMCAPTURE_REDIS_URL"].startswith("redis://redis:")
        assert "/run/libvirt/libvirt-sock:/run/libvirt/libvirt-sock" in svc["volumes"]
        assert (REPO / svc["build"] / "Dockerfile").exists()
    redis_cmd = services["redis"]["command"]
    assert "--appendonly" in redis_cmd and redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert redis_cmd[redis_cmd.index("--appendfsync") + 1] == "always"


def test_dockerfile_installs_the_entry_point():
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["domcapture"]' in text
    assert "pip install" in text and "libvirt-dev" in text


def test_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'domcapture = "workers.cli:main"' in text


def test_the_wheel_carries_every_package_and_the_chaos_command(tmp_path):
    """What ``pip install .`` installs: every package folder of the source tree (workers.chaos included)."""
    import subprocess
    import sys
    import zipfile
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    names = set(zipfile.ZipFile(next(tmp_path.glob("domcapture-*.whl"))).namelist())
    for pkg in ("workflows", "workers"):
        for init in (REPO / pkg).rglob("__init__.py"):
            folder = init.parent.relative_to(REPO)
            assert {str(folder / p.name) for p in init.parent.glob("*.py")} <= names, folder
    assert {"workers/chaos/command.py", "workers/chaos/runner.py", "workers/chaos/report.py"} <= names
