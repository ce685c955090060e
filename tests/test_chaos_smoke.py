"""A bounded chaos run (tests/chaos.py) on every CI run: the six infrastructure fault kinds, fixed seed.

The long run is `python -m tests.chaos --duration 600 --seed N` (README).
"""

from __future__ import annotations

import os

import pytest

from .chaos import Chaos, parse_args

# it restarts the shared libvirtd: run alone, after the parallel part of the suite (scripts/test.sh)
pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.exclusive]


def test_bounded_chaos_run_has_no_violations(libvirt_uri, redis_client, guest_image, capsys):
    # it restarts libvirtd and mounts a tmpfs: not being root is a failure here, never a skip
    assert os.geteuid() == 0, "the chaos run needs root (it restarts libvirtd and mounts a tmpfs)"
    seed = int(os.environ.get("DOMCAPTURE_CHAOS_SEED", "20261126"))
    duration = float(os.environ.get("DOMCAPTURE_CHAOS_SECONDS", "75"))
    chaos = Chaos(parse_args(["--seed", str(seed), "--duration", str(duration), "--workers", "3",
                              "--disk-domains", "2", "--guests", "1", "--fault-interval", "1", "3"]))
    violations = chaos.run()
    report = capsys.readouterr().out
    print(report)
    assert sum(chaos.faults.values()) >= 10, report
    assert len(chaos.workflows) >= 5, report
    assert violations == 0, report
