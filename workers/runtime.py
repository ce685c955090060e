"""Wiring: the store, the RQ queue, the hypervisor factory, the library facade.

RQ jobs carry only a workflow id, serialised as JSON (never pickles).  The
job id is ``<workflow id>-<enqueue count>``, so a duplicate enqueue of the
same generation is a no-op.

Every key of a deployment derives from its prefix, RQ's included: RQ reads
its key namespace from ``RQ_KEY_PREFIX`` when it is first imported, so it is
set to ``<prefix>:rq`` here before ``rq`` is imported (``rq_module``), and a
process that imported RQ with another namespace is refused.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from workflows import naming, redisconn, validate
from workflows.errors import ConfigError, StoreError, StoreUnavailable
from workflows.hosts import HostRegistry
from workflows.hypervisor.libvirt_adapter import LibvirtHypervisor
from workflows.record import Record
from workflows.service import Captures
from workflows.store import Store

from .settings import Settings

JOB_FUNC = "workers.jobs.run_workflow"
JOB_TIMEOUT = 24 * 3600


def rq_module(settings: Settings) -> ModuleType:
    """``rq``, imported with the deployment's key namespace."""
    if "rq" not in sys.modules:
        os.environ["RQ_KEY_PREFIX"] = settings.rq_prefix
    rq = importlib.import_module("rq")
    actual = importlib.import_module("rq.defaults").RQ_KEY_PREFIX
    if actual != settings.rq_prefix:
        raise ConfigError(f"RQ was loaded with key prefix {actual!r}, this deployment needs {settings.rq_prefix!r}; "
                          "unset RQ_KEY_PREFIX (DOMCAPTURE_PREFIX sets it)")
    return rq


def check_protection(settings: Settings, store: Store) -> None:
    """A password for a server that asks for none is refused: the operator would believe Redis protected.

    Judged by reading the deployment's index without credentials.
    """
    url = settings.redis_url
    parts = urlsplit(url)
    given = settings.redis_password is not None or parts.password is not None
    if not given:
        return
    if validate.is_sentinel_url(url):
        # the primary the sentinels name, asked without credentials
        try:
            address = redisconn.primary_address(store.r)
        except redis.RedisError:
            return  # no primary now: the authenticated connection reports it
        if address is None:
            return
        spec = validate.sentinel_url(url)
        tls: dict[str, Any] = {"ssl": True, **dict(spec.tls_params)} if spec.tls else {}
        probe = redis.Redis(host=address[0], port=address[1], db=spec.db, socket_connect_timeout=3,
                            socket_timeout=3, **tls)
    else:
        bare = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
        probe = redis.Redis.from_url(bare, socket_connect_timeout=3, socket_timeout=3)
    try:
        probe.exists(f"{settings.prefix}:index")
    except (redis.AuthenticationError, redis.ResponseError):
        return  # NOAUTH / NOPERM: the server does protect the keys
    except redis.RedisError:
        return  # unreachable: the authenticated connection reports it
    finally:
        probe.close()
    raise ConfigError("a Redis password is configured, but the server lets anyone read the deployment's keys "
                      "without one; set requirepass (README, 'Redis') or drop the password")


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        rq = self.rq = rq_module(settings)
        from rq.serializers import JSONSerializer
        self.job_class: Any = rq.job.Job
        self.serializer = JSONSerializer
        self.store = Store.from_url(settings.redis_url, settings.prefix, password=settings.redis_password,
                                    username=settings.redis_username, lease_ttl=settings.lease_ttl,
                                    sentinel_password=settings.sentinel_password,
                                    replica_acks=settings.replica_acks, ack_timeout=settings.ack_timeout,
                                    failover_wait=settings.failover_wait)
        try:
            self.store.ping()
        except StoreUnavailable:
            raise
        except StoreError as exc:  # e.g. a database index the server does not have
            raise ConfigError(f"redis at {validate.redact(settings.redis_url)}: {exc}") from None
        check_protection(settings, self.store)
        self.queue = rq.Queue(settings.queue, connection=self.store.r, serializer=JSONSerializer)
        self.captures = Captures(self.store, self.hypervisor, self.enqueue, lease_ttl=settings.lease_ttl,
                                 enqueue_new=self.enqueue_new)

    def hypervisor(self, uri: str) -> LibvirtHypervisor:
        """A connection to ``uri`` (the deployment's default when empty), refused unless it passes
        the URI allowlist: every libvirt connection of the runtime opens here, so a URI read back
        from Redis (a record, a policy, the host registry) is checked again right before use."""
        uri = uri or self.settings.libvirt_uri
        return LibvirtHypervisor(validate.libvirt_uri("URI", uri) if uri else "")

    def hosts(self) -> HostRegistry:
        """The host registry: names the console and the fleet use instead of URIs."""
        return HostRegistry(self.store.r, self.settings.prefix, self.settings.libvirt_uri)

    @staticmethod
    def job_id(rec: Record) -> str:
        return f"{rec.id}-{rec.enqueues}"

    def _job(self, job_id: str) -> Any:
        if not self.store.r.exists(self.job_class.key_for(job_id)):
            return None
        return self.job_class.fetch(job_id, connection=self.store.r, serializer=self.serializer)

    # -- hosts ------------------------------------------------------------------------
    # ``P:hosts`` maps a libvirt URI to the host that runs it (written by policies and
    # by ``worker --host``); ``P:host-workers:<host>`` holds the live workers of a host,
    # scored by the end of their announcement (renewed while they run).
    def host_queue(self, host: str) -> Any:
        return self.rq.Queue(naming.host_queue(self.settings.queue, host), connection=self.store.r,
                             serializer=self.serializer)

    def host_of(self, rec: Record) -> str | None:
        host = rec.data.get("host")
        if isinstance(host, str) and host:
            return host
        raw = self.store.r.hget(f"{self.settings.prefix}:hosts", rec.uri)
        return raw.decode() if raw else None

    def queue_of(self, rec: Record) -> Any:
        host = self.host_of(rec)
        return self.host_queue(host) if host else self.queue

    def map_host(self, uri: str, host: str) -> None:
        self.store.r.hset(f"{self.settings.prefix}:hosts", uri, host)

    def announce(self, host: str, worker: str, ttl: float) -> None:
        key = f"{self.settings.prefix}:host-workers:{host}"
        pipe = self.store.r.pipeline()
        pipe.zadd(key, {worker: time.time() + ttl})
        pipe.zremrangebyscore(key, "-inf", time.time())
        pipe.expire(key, int(ttl * 2) + 1)
        pipe.execute()

    def withdraw(self, host: str, worker: str) -> None:
        self.store.r.zrem(f"{self.settings.prefix}:host-workers:{host}", worker)

    def live_workers(self, host: str) -> list[str]:
        key = f"{self.settings.prefix}:host-workers:{host}"
        return [m.decode() for m in self.store.r.zrangebyscore(key, time.time(), "+inf")]

    def waiting(self, rec: Record) -> str | None:
        """Why a queued workflow is not running yet, when something other than a busy worker holds it."""
        if rec.status != "queued":
            return None
        host = self.host_of(rec)
        if host and not self.live_workers(host):
            return f"waiting for host {host}: no live worker serves it (domcapture worker --host {host})"
        note = self.store.r.get(f"{self.settings.prefix}:wf:{rec.id}:waiting")
        return note.decode() if note else None

    def enqueue(self, rec: Record) -> None:
        job_id = self.job_id(rec)
        existing = self._job(job_id)
        if existing is not None and existing.get_status(refresh=True) in ("queued", "started", "deferred"):
            return
        self.queue_of(rec).enqueue(JOB_FUNC, rec.id, job_id=job_id, job_timeout=JOB_TIMEOUT, result_ttl=3600,
                           failure_ttl=7 * 24 * 3600, description=f"{rec.strategy} {rec.domain} ({rec.id})")

    def enqueue_new(self, recs: list[Record]) -> None:
        """The first jobs of records just created (a scheduler's batch): one pipeline per queue.

        No job of theirs can exist yet (job id ``<id>-1``), so the check ``enqueue`` makes is skipped."""
        by_queue: dict[str, tuple[Any, list[Record]]] = {}
        for rec in recs:
            queue = self.queue_of(rec)
            by_queue.setdefault(queue.key, (queue, []))[1].append(rec)
        for queue, group in by_queue.values():
            pipe = self.store.r.pipeline()
            queue.enqueue_many([queue.prepare_data(JOB_FUNC, (rec.id,), job_id=self.job_id(rec), timeout=JOB_TIMEOUT,
                                                   result_ttl=3600, failure_ttl=7 * 24 * 3600,
                                                   description=f"{rec.strategy} {rec.domain} ({rec.id})")
                                for rec in group], pipeline=pipe)
            pipe.execute()

    def job_waiting(self, rec: Record) -> bool:
        """Is the record's current job really waiting in the queue?

        A job's status alone is not enough: a worker that dequeued it and died
        before marking it started leaves it 'queued' but in no queue.
        """
        job_id = self.job_id(rec)
        return self.store.r.lpos(self.queue_of(rec).key, job_id) is not None

    def job_status(self, rec: Record) -> str | None:
        job = self._job(self.job_id(rec))
        if job is None:
            return None
        status = job.get_status(refresh=True)
        return str(status.value if hasattr(status, "value") else status)
