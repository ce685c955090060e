"""Wiring: the store, the RQ queue, the hypervisor factory, the library facade.

RQ jobs carry only a workflow id, serialised as JSON (never pickles).  The
job id is ``<workflow id>-<enqueue count>``, so a duplicate enqueue of the
same generation is a no-op.
"""

from __future__ import annotations

from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from workflows.hypervisor.libvirt_adapter import LibvirtHypervisor
from workflows.record import Record
from workflows.service import Captures
from workflows.store import Store

from .settings import Settings

JOB_FUNC = "workers.jobs.run_workflow"
JOB_TIMEOUT = 24 * 3600


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store.from_url(settings.redis_url, settings.prefix, lease_ttl=settings.lease_ttl)
        self.queue = Queue(settings.queue, connection=self.store.r, serializer=JSONSerializer)
        self.captures = Captures(self.store, self.hypervisor, self.enqueue, lease_ttl=settings.lease_ttl)

    def hypervisor(self, uri: str) -> LibvirtHypervisor:
        return LibvirtHypervisor(uri or self.settings.libvirt_uri)

    @staticmethod
    def job_id(rec: Record) -> str:
        return f"{rec.id}-{rec.enqueues}"

    def enqueue(self, rec: Record) -> None:
        job_id = self.job_id(rec)
        existing = Job.fetch(job_id, connection=self.store.r, serializer=JSONSerializer) \
            if self.store.r.exists(f"rq:job:{job_id}") else None
        if existing is not None and existing.get_status(refresh=True) in ("queued", "started", "deferred"):
            return
        self.queue.enqueue(JOB_FUNC, rec.id, job_id=job_id, job_timeout=JOB_TIMEOUT, result_ttl=3600,
                           failure_ttl=7 * 24 * 3600, description=f"{rec.strategy} {rec.domain} ({rec.id})")

    def job_waiting(self, rec: Record) -> bool:
        """Is the record's current job really waiting in the queue?

        A job's status alone is not enough: a worker that dequeued it and died
        before marking it started leaves it 'queued' but in no queue.
        """
        job_id = self.job_id(rec)
        return self.store.r.lpos(self.queue.key, job_id) is not None

    def job_status(self, rec: Record) -> str | None:
        job_id = self.job_id(rec)
        if not self.store.r.exists(f"rq:job:{job_id}"):
            return None
        job = Job.fetch(job_id, connection=self.store.r, serializer=JSONSerializer)
        status = job.get_status(refresh=True)
        return str(status.value if hasattr(status, "value") else status)
