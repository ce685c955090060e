"""The console's overview page: backup freshness per domain and UTC day, breaches first (real
``domcapture web``, real Redis records)."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from workers.overview import day_labels, freshness
from workflows.record import Record, new_id
from workflows.store import Store

from .test_web_http import env_for, login
from .webenv import WebServer

pytestmark = pytest.mark.real


def backup(store: Store, domain: str, status: str, age_s: float, files: bool = True) -> Record:
    now = time.time()
    rec = Record(id=new_id(), strategy="snapshot-backup", definition_version=1, domain=domain,
                 uri="qemu:///system", params={}, state="done" if status == "succeeded" else "copying",
                 status=status, result={"files": {"vda": {"path": "/b/vda.qcow2"}}} if files else {},
                 created_at=now - age_s, updated_at=now - age_s)
    store.create(rec)
    store.r.delete(store.domain_key(rec.uri, rec.domain))  # a finished record holds no domain
    return rec


def test_overview_breaches_first_and_a_cell_per_day(prefix, store, tmp_path) -> None:
    backup(store, "dctest-ov-fresh", "succeeded", 600)
    backup(store, "dctest-ov-fresh", "succeeded", 86400 * 2)
    old = backup(store, "dctest-ov-stale", "succeeded", 86400 * 3)
    backup(store, "dctest-ov-never", "failed", 60)
    backup(store, "dctest-ov-nofiles", "succeeded", 60, files=False)  # a restore: no backup kept

    now = time.time()
    rows = freshness(store.indexes.iter_all(), now)
    order = [r.domain for r in rows]
    assert order[:2] in (["dctest-ov-never", "dctest-ov-nofiles"], ["dctest-ov-nofiles", "dctest-ov-never"])
    assert order[2:] == ["dctest-ov-stale", "dctest-ov-fresh"]
    by = {r.domain: r for r in rows}
    assert [r.breach(now) for r in rows] == [True, True, True, False]
    assert by["dctest-ov-stale"].last_ok is not None and by["dctest-ov-stale"].last_ok.id == old.id
    assert sum(by["dctest-ov-fresh"].cells) == 2 and by["dctest-ov-fresh"].cells[-1] == 1
    assert by["dctest-ov-stale"].cells[-4] == 1 and sum(by["dctest-ov-stale"].cells) == 1
    assert len(day_labels(now)) == len(by["dctest-ov-never"].cells) == 14

    web = WebServer(env_for(prefix), tmp_path / "web")
    try:
        with httpx.Client(base_url=web.url, timeout=20) as c:
            assert c.get("/overview").status_code == 303  # not logged in
            assert login(c, secret=web.token).status_code == 303
            page = c.get("/overview")
            assert page.status_code == 200
            shown = re.findall(r'<tr class="(breach|fresh)"><td>([^<]+)</td>', page.text)
            assert [d for _, d in shown] == order
            assert [k for k, _ in shown] == ["breach", "breach", "breach", "fresh"]
    finally:
        web.stop()
