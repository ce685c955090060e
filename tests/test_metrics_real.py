"""``GET /metrics`` scraped over HTTP during and after a real capture, parsed with prometheus_client's parser.

A quiesced snapshot-backup of the tiny real guest, slowed by ``--bandwidth``;
its worker is SIGKILLed mid-copy and a new one finishes it.  The scrapes must
show what the store holds: the running workflow and its progress, then the
success, the freeze window, the lease loss and recovery's decision.
"""

from __future__ import annotations

import signal
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .webenv import WebServer, artifact_dir

pytestmark = pytest.mark.real


def scrape(url: str) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for fam in text_string_to_metric_families(r.text):
        assert fam.name.startswith("domcapture_"), fam.name
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return r.text, samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_scrape_during_and_after_a_real_capture(cluster, guest_domain, tmp_path):
    out_dir = artifact_dir("metrics")
    guest = guest_domain()
    guest.wait_agent()
    guest.sh("dd if=/dev/urandom of=/mnt/vdb/fill bs=1M count=12 && sync", timeout=120)  # something to copy
    target = tmp_path / "backups"
    target.mkdir()
    web = WebServer(cluster.env, out_dir)
    try:
        doomed = cluster.start_worker()
        cluster.start_recovery()
        wf = cluster.cli("submit", "snapshot-backup", "--domain", guest.name, "--target", str(target),
                         "--quiesce", "require", "--bandwidth", "1M").stdout.strip()
        cluster.wait(wf, lambda d: d["state"] == "copying", timeout=120)

        # progress is per disk (a new disk starts at 0 % and rate 0): scrape until one shows both moving
        labels = {"workflow": wf, "strategy": "snapshot-backup", "domain": guest.name}
        for _ in range(40):
            text, during = scrape(web.url)
            ratio = during.get(("domcapture_workflow_progress_ratio",
                                tuple(sorted({**labels, "state": "copying"}.items()))), 0.0)
            rate = during.get(("domcapture_copy_rate_bytes_per_second", tuple(sorted(labels.items()))), 0.0)
            if ratio > 0 and rate > 0:
                break
            time.sleep(0.25)
        (out_dir / "scrape-during.txt").write_text(text)
        strategy, queue = "snapshot-backup", cluster.env["DOMCAPTURE_QUEUE"]
        assert value(during, "domcapture_store_up") == 1
        assert value(during, "domcapture_workflows", strategy=strategy, status="running", host="localhost") == 1
        assert value(during, "domcapture_workflows", strategy=strategy, status="succeeded", host="localhost") == 0
        assert 0 < ratio <= 1  # the copy may be complete while its step still finishes
        assert rate > 0  # progress bytes/s: holes skipped by SEEK_DATA count too, so it may pass --bandwidth
        assert value(during, "domcapture_workers", queue=queue) == 1
        assert value(during, "domcapture_queue_depth", queue=queue) == 0  # its one job is running
        # the freeze is over before the copy starts: one window, as long as the record says
        doc = cluster.show(wf)
        frozen = doc["data"]["last_thaw"]["frozen_seconds"]
        assert value(during, "domcapture_guest_freeze_seconds_count", strategy=strategy) == 1
        assert value(during, "domcapture_guest_freeze_seconds_sum", strategy=strategy) == pytest.approx(frozen)

        cluster.kill(doomed, signal.SIGKILL)
        cluster.wait(wf, lambda d: any(e["event"] == "recovered" for e in d["history"]), timeout=30)
        cluster.start_worker()
        doc = cluster.wait_final(wf, timeout=180)
        assert doc["status"] == "succeeded", doc["error"]

        text, after = scrape(web.url)
        (out_dir / "scrape-after.txt").write_text(text)
        assert value(after, "domcapture_workflows", strategy=strategy, status="running", host="localhost") == 0
        assert value(after, "domcapture_workflows", strategy=strategy, status="succeeded", host="localhost") == 1
        assert value(after, "domcapture_last_success_timestamp_seconds", domain=guest.name, uri=doc["uri"],
                     strategy=strategy) == pytest.approx(doc["updated_at"])
        assert value(after, "domcapture_bytes_copied_total", strategy=strategy) == doc["progress"]["bytes_done"] > 0
        assert value(after, "domcapture_lease_losses_total", strategy=strategy) == 1
        assert value(after, "domcapture_recovery_actions_total", decision="resume") == 1
        assert value(after, "domcapture_guest_downtime_seconds_count", strategy=strategy) == 1
        assert value(after, "domcapture_guest_downtime_seconds_sum", strategy=strategy) == pytest.approx(
            doc["result"]["downtime_s"])
        # every forward state ran to completion once (copying twice started, once done)
        for state in ("preflight", "freezing", "snapshotting", "copying", "committing", "pivoting", "finalizing"):
            assert value(after, "domcapture_state_duration_seconds_count", strategy=strategy, state=state) == 1
        started = [e for e in doc["history"] if e["event"] == "step-started" and e["step"] == "copying"]
        assert len(started) == 2
        assert ("domcapture_workflow_progress_ratio", tuple(sorted({**labels, "state": "copying"}.items()))) \
            not in after
    finally:
        web.stop()
