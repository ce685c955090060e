"""The Sentinel deployment files: the systemd units verify, the compose override is one coherent set
(three nodes, three sentinels watching the first primary with a quorum of 2, every domcapture service
on a redis+sentinel URL that names them and that domcapture accepts), and the example configs agree."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from workers.chaos.command import options
from workers.cli import build_parser
from workers.settings import Settings
from workflows import validate
from workflows.errors import InputError

REPO = Path(__file__).resolve().parent.parent
HA = REPO / "deploy" / "redis-ha"


def test_sentinel_units_verify():
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing (Debian package systemd)"
    units = sorted(p.name for p in HA.glob("*.service"))
    assert units == ["domcapture-redis.service", "domcapture-sentinel.service"]
    for unit in units:
        text = (HA / unit).read_text()
        binary = re.search(r"^ExecStart=(\S+)", text, re.M)
        assert binary and shutil.which(Path(binary.group(1)).name), f"{unit}: {binary}"
        out = subprocess.run(["systemd-analyze", "verify", str(HA / unit)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and out.stdout + out.stderr == "", f"{unit}: {out.stdout}{out.stderr}"


def test_example_configs_name_one_set():
    sentinel = (HA / "sentinel.conf.example").read_text()
    node = (HA / "redis.conf.example").read_text()
    monitor = re.search(r"^sentinel monitor (\S+) (\S+) (\d+) (\d+)$", sentinel, re.M)
    assert monitor and monitor.group(1) == "dcha" and monitor.group(4) == "2"
    assert re.search(rf"^replica-announce-ip {re.escape(monitor.group(2))}$", node, re.M)
    assert "appendfsync always" in node and "masterauth" in node


def test_compose_override_is_one_set_every_service_reaches_through_sentinels():
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    over = yaml.safe_load((REPO / "docker-compose.sentinel.yml").read_text())["services"]
    sentinels = sorted(n for n in over if n.startswith("sentinel-"))
    nodes = ["redis", "redis-2", "redis-3"]
    assert sentinels == ["sentinel-1", "sentinel-2", "sentinel-3"] and set(nodes) <= set(over)
    for n in ("redis-2", "redis-3"):
        assert over[n]["command"][-3:] == ["--replicaof", "redis", "6379"]
        assert "--appendfsync" in over[n]["command"] and over[n]["volumes"]
    for s in sentinels:
        script = over[s]["command"][2]
        assert "sentinel monitor dcha redis 6379 2" in script and "auth-pass dcha" in script
        assert over[s]["environment"]["NODE"] == s
    services = [n for n, svc in base.items() if "build" in svc]
    assert set(services) == {"worker", "recovery", "scheduler", "web", "notifier"}
    for name in services:
        url = over[name]["environment"]["DOMCAPTURE_REDIS_URL"]
        spec = validate.sentinel_url(url)
        assert [h for h, _ in spec.sentinels] == sentinels and spec.service == "dcha"
        settings = Settings.from_env({"DOMCAPTURE_REDIS_URL": url})
        assert settings.replica_acks == 1  # intents wait for a replica behind Sentinel
        assert set(over[name]["depends_on"]) == set(sentinels)


def chaos_options(*argv: str):
    return options(build_parser().parse_args(["chaos", *argv]))


def test_chaos_redis_faults_match_the_redis_of_the_run():
    assert "redis-failover" in chaos_options("--redis", "sentinel", "--guests", "0").faults
    assert "redis-kill" not in chaos_options("--redis", "sentinel", "--guests", "0").faults
    assert "redis-failover" not in chaos_options("--guests", "0").faults
    with pytest.raises(InputError, match="redis-failover: needs --redis sentinel"):
        chaos_options("--faults", "redis-failover", "--guests", "0")
    with pytest.raises(InputError, match="redis-kill,redis-stall: hits the single redis-server"):
        chaos_options("--redis", "sentinel", "--faults", "redis-kill,redis-stall", "--guests", "0")
