"""The web console in a real browser (Debian's chromium, driven by pytest-playwright).

One real snapshot-backup, slowed down by ``--bandwidth``, on a real QEMU
domain with real worker and recovery processes: the operator logs in (after
a failed try), finds the workflow in the list, opens it, watches the copy
advance without reloading, has an action without its CSRF token refused,
aborts it and sees it end ``rolled_back`` while the domain is back on its
own disks.  Screenshots go to the folder the test prints.
"""

from __future__ import annotations

import time

import json
import re

import httpx
import pytest
from playwright.sync_api import Page, expect

from .realenv import WorkerCluster
from .webenv import WebServer, artifact_dir

pytestmark = pytest.mark.real

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    # Debian's chromium, never a downloaded browser; root needs --no-sandbox
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": ["--no-sandbox"]}


@pytest.fixture
def web(cluster: WorkerCluster, tmp_path):
    server = WebServer(cluster.env, artifact_dir("web-browser"))
    yield server
    server.stop()


def percent(page: Page) -> float:
    return float(page.inner_text("#percent").rstrip("%"))


def test_list_open_watch_progress_abort_rolled_back(cluster, disk_domain, web, page: Page, tmp_path):
    shots = artifact_dir("web-browser")
    dom = disk_domain(sizes_mib={"vda": 64, "vdb": 32}, random_mib=24)
    target = tmp_path / "backups"
    target.mkdir()
    cluster.start_worker()
    cluster.start_recovery()
    out = cluster.cli("submit", "snapshot-backup", "--domain", dom.name, "--target", str(target),
                      "--quiesce", "off", "--bandwidth", "2M", "--json")
    wf = json.loads(out.stdout)["id"]

    # a wrong token: refused, still on the login page, no session
    page.goto(web.url + "/")
    expect(page).to_have_url(re.compile(r"/login"))
    page.fill("input[name=secret]", "not-the-token-at-all")
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("login failed")
    page.screenshot(path=str(shots / "login-failed.png"))
    page.goto(web.url + "/")
    expect(page).to_have_url(re.compile(r"/login"))

    page.fill("input[name=secret]", web.token)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Workflows")

    # the list, filtered by strategy and domain, holds the workflow; open it from there
    page.select_option("select[name=strategy]", "snapshot-backup")
    page.fill("input[name=domain]", dom.name)
    page.click("form.filters button")
    row = page.locator(f"#workflows tr[data-id='{wf}']")
    expect(row).to_contain_text(dom.name)
    page.screenshot(path=str(shots / "list.png"), full_page=True)
    row.locator("a", has_text=wf).click()
    expect(page).to_have_url(web.url + f"/wf/{wf}")

    # the copy advances on the page without a reload (the live fragment polls)
    page.evaluate("window.__notReloaded = true")
    expect(page.locator("#state")).to_have_text("copying", timeout=60_000)
    expect(page.locator("#percent")).to_be_visible(timeout=30_000)
    first = percent(page)
    # polled from here: the page's CSP (script-src 'self') refuses the eval a string predicate would need
    deadline = time.monotonic() + 30
    while (second := percent(page)) <= first:
        assert time.monotonic() < deadline, f"the copy stayed at {first} % on the page"
        page.wait_for_timeout(200)
    assert second > first
    assert page.evaluate("window.__notReloaded") is True
    expect(page.locator("#states tr.current")).to_have_attribute("data-state", "copying")
    page.screenshot(path=str(shots / "workflow-copying.png"), full_page=True)

    # an action without its CSRF token is refused, and changes nothing
    page.on("dialog", lambda d: d.accept())
    with page.expect_response(lambda r: r.url.endswith("/action/abort")) as refused:
        # removed and submitted in one script: the live fragment re-renders the form (a fresh token)
        # every poll, so a removal followed by a separate click could submit a restored form
        page.evaluate("""() => {
            const form = document.querySelector('form[action$="/action/abort"]');
            form.querySelectorAll('input[name=csrf]').forEach(e => e.remove());
            form.requestSubmit(document.querySelector('#action-abort'));
        }""")
    assert refused.value.status == 403
    expect(page.locator("body")).to_contain_text("CSRF token is missing or wrong")
    # the same refusal with a wrong token, from the same logged-in browser session
    wrong = page.request.post(f"{web.url}/wf/{wf}/action/abort", form={"csrf": "forged"})
    assert wrong.status == 403
    doc = cluster.show(wf)
    assert doc["status"] == "running" and doc["state"] == "copying"
    assert not any(e["event"] == "rollback-requested" for e in doc["history"])
    assert cluster.cli("show", wf).returncode == 0
    r = httpx.get(f"{web.url}/wf/{wf}")
    assert r.status_code == 303 and "/login" in r.headers["location"]  # no session: no page either

    # abort from the page: the worker sees the flag and rolls back; the page follows live
    page.goto(f"{web.url}/wf/{wf}")
    page.evaluate("window.__notReloaded = true")
    page.click("#action-abort")
    expect(page.locator("#flash")).to_contain_text(f"{wf}: cancel requested")
    page.evaluate("window.__notReloaded = true")
    expect(page.locator("#status")).to_have_text("rolled_back", timeout=90_000)
    assert page.evaluate("window.__notReloaded") is True
    expect(page.locator("#states tr.current")).to_have_attribute("data-state", "rolled_back")
    expect(page.locator("#wf-error")).to_contain_text("aborted by operator")
    expect(page.locator("#history")).to_contain_text("rolled-back")
    page.screenshot(path=str(shots / "workflow-rolled-back.png"), full_page=True)

    doc = cluster.show(wf)
    assert doc["status"] == "rolled_back" and doc["error"]["message"] == "aborted by operator"
    assert dom.on_original_disks(), dom.blklist()
    assert dom.block_jobs() == {} and dom.leftover_overlays() == []
    assert [p for p in target.rglob("*") if p.is_file()] == []

    # the domain page shows the aborted capture as its last one
    page.click(f"a:has-text('{dom.name}')")
    expect(page.locator("h1")).to_have_text(dom.name)
    expect(page.locator("body")).to_contain_text("rolled_back")
    page.screenshot(path=str(shots / "domain.png"), full_page=True)
