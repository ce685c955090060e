"""Shared fixtures: a real Redis, a real libvirtd, disposable domains, worker processes.

Real-service tests skip when a service is unreachable, unless
DOMCAPTURE_REQUIRE_REAL=1 (set by .ci/run), where they fail instead: a CI
run must never pass by skipping them.
"""

from __future__ import annotations

import os
import uuid

import pytest
import redis

from workflows.store import Store

from .realenv import DiskDomain, GuestDomain, WorkerCluster, build_guest_image, libvirt_reachable

REDIS_URL = os.environ.get("DOMCAPTURE_REDIS_URL", "redis://127.0.0.1:6379/0")
LIBVIRT_URI = os.environ.get("DOMCAPTURE_TEST_URI", "qemu:///system")
REQUIRE_REAL = os.environ.get("DOMCAPTURE_REQUIRE_REAL") == "1"


def _unavailable(what: str) -> None:
    if REQUIRE_REAL:
        pytest.fail(f"{what} is not reachable and DOMCAPTURE_REQUIRE_REAL=1")
    pytest.skip(f"{what} is not reachable")


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        _unavailable(f"redis at {REDIS_URL}")
    return client


@pytest.fixture
def prefix(redis_client: redis.Redis):
    p = f"dct-{uuid.uuid4().hex[:8]}"
    yield p
    keys = list(redis_client.scan_iter(f"{p}:*", count=5000))
    for i in range(0, len(keys), 500):
        redis_client.delete(*keys[i:i + 500])


@pytest.fixture
def store(redis_client: redis.Redis, prefix: str) -> Store:
    return Store(redis_client, prefix)


@pytest.fixture(scope="session")
def libvirt_uri() -> str:
    if not libvirt_reachable(LIBVIRT_URI):
        _unavailable(f"libvirtd at {LIBVIRT_URI}")
    return LIBVIRT_URI


def _domain_factory(cls, uri: str, folder):
    """Yields ``make(**kw)`` creating domains of ``cls`` in numbered folders; destroys them afterwards."""
    made: list = []

    def make(**kw):
        dom = cls.create(uri, folder / str(len(made)), **kw)
        made.append(dom)
        return dom
    yield make
    for dom in made:
        dom.destroy()


@pytest.fixture
def disk_domain(libvirt_uri: str, tmp_path):
    """A factory of running no-OS QEMU domains with qcow2 disks of known content."""
    yield from _domain_factory(DiskDomain, libvirt_uri, tmp_path / "dom")


@pytest.fixture
def cluster(libvirt_uri: str, prefix: str, tmp_path):
    """Worker and recovery processes (the real CLI) on an isolated prefix and queue."""
    c = WorkerCluster(REDIS_URL, libvirt_uri, prefix, tmp_path / "logs")
    yield c
    c.stop()


@pytest.fixture(scope="session")
def guest_image(libvirt_uri: str):
    return build_guest_image()


@pytest.fixture
def guest_domain(libvirt_uri: str, guest_image, tmp_path):
    """A factory of running tiny Linux guests (agent + writer); destroyed after the test."""
    yield from _domain_factory(GuestDomain, libvirt_uri, tmp_path / "guest")


@pytest.fixture(autouse=True)
def _deterministic_boundaries(request, monkeypatch):
    """Exhaustive crash tests on the in-memory hypervisor enumerate every persistence boundary in a
    first run, then crash at each: progress writes and durable cursors must not depend on the clock."""
    if request.module.__name__.endswith("_fake"):
        from workflows import filecopy, nbdio, steps
        monkeypatch.setattr(steps, "PROGRESS_INTERVAL", 0.0)
        monkeypatch.setattr(filecopy, "DURABLE_INTERVAL", 0.0)
        monkeypatch.setattr(filecopy, "CHECK_INTERVAL", 0.0)
        monkeypatch.setattr(nbdio, "DURABLE_INTERVAL", 0.0)
        monkeypatch.setattr(nbdio, "CHECK_INTERVAL", 0.0)
