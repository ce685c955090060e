"""``instant-restore``: a new domain running at once on the backup, its data streamed in while it runs.

``--from ID --define NAME --target DIR``: each disk gets a qcow2 overlay in a
new restore folder, backed (read-only) by the disk's backup chain, spelled out
in the domain XML (``<backingStore>``), so the image headers of the backups
are never relied on.  The new domain (the backed-up XML with a new name, no
UUID, new MACs, its own log files) is defined and started on those overlays
at once; then ``virDomainBlockPull`` streams the chain into each overlay while
the guest runs, one disk at a time.  When every pull has ended the overlays stand alone: no
backing, no reference to the backup.

Crash: every state resumes.  The probes ask libvirt: is the domain defined
(our marker in its description), running, and does each disk still have a
backing chain or a pull job (a pull runs on inside QEMU while no worker
watches; a resumed worker waits for it, or starts it again if it ended
without finishing; a domain found shut off mid-pull is started again, since
its guest's writes are in the overlays).  Rollback: abort the pulls, destroy and undefine the
domain, delete the overlays, the domain's log files and the folder.  The
backups are only ever read.
"""

from __future__ import annotations

import os
import stat
import xml.etree.ElementTree as ET
from typing import Any, Callable

from .. import backupfolder as bf
from .. import naming, nbdio
from ..definition import RESUME, Definition
from ..effects import Inspect
from ..errors import InputError, StepFailed
from ..record import Artifact, Record
from ..steps import Step, StepContext
from . import backup_common as bc
from . import chain as chain_mod
from . import common, restore

NAME = "instant-restore"
VERSION = 1
POLL = 0.2

STATES = ["preflight", "overlaying", "defining", "starting", "pulling", "finalizing"]
TRANSITIONS = [
    # trigger    source        dest
    ["advance", "preflight",  "overlaying"],  # the chain's files are intact; the overlays are named
    ["advance", "overlaying", "defining"],    # one empty overlay per disk
    ["advance", "defining",   "starting"],    # the new domain, on the overlays over the chain
    ["advance", "starting",   "pulling"],     # it runs
    ["advance", "pulling",    "finalizing"],  # every disk's chain streamed into its overlay
    ["advance", "finalizing", "succeeded"],   # instant-restore.json; standalone images checked
]


def resolve(load: Callable[[str], Record], params: dict[str, Any]) -> dict[str, Any]:
    params["chain"] = chain_mod.backup_chain(load, params.get("from"))
    return params


def validate(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    if params.get("define") is None:
        raise InputError("--define is required: the name of the new domain")
    chain = params.get("chain") or []
    chain_mod.check_chain(chain, params.get("from"), domain)
    with chain_mod.open_chain(chain, deep=False, define=True) as opened:  # nothing followed, nothing blocks
        chain_mod.refuse_encrypted(chain, "instant-restore", opened)
    out = restore.validate_params(look, domain, {**params, "disk": None, "to": None, "encrypt_key_file": None})
    out.pop("disk"), out.pop("to")
    # the overlays grow to the disks' allocated size; the chain is never copied twice
    return out


def marker(wf_id: str) -> str:
    return f"restored by domcapture workflow {wf_id}"


def with_backing_chains(xml: str, chains: dict[str, list[str]]) -> str:
    """Each disk's backing chain (top first) spelled out in the XML, ending with an empty backingStore."""
    root = ET.fromstring(xml)
    for d in root.findall("./devices/disk"):
        target = d.find("target")
        files = chains.get(target.get("dev", "") if target is not None else "")
        if not files:
            continue
        for bs in d.findall("backingStore"):
            d.remove(bs)
        parent = d
        for path in files:
            bs = ET.SubElement(parent, "backingStore", {"type": "file"})
            ET.SubElement(bs, "format", {"type": "qcow2"})
            ET.SubElement(bs, "source", {"file": path})
            parent = bs
        ET.SubElement(parent, "backingStore")
    return ET.tostring(root, encoding="unicode")


def _domain_xml(ctx: StepContext, opened: bf.Opened) -> str:
    """The new domain's XML from the checked ``domain.xml``; each disk on its overlay over our pins of
    the chain's checked files (never a name in the backup's folder)."""
    last = ctx.params["chain"][-1]
    source = opened.read(os.path.join(os.path.dirname(last["manifest"]), "domain.xml")).decode()
    disks = {a["disk"]: a["path"] for a in ctx.rec.artifacts_of("restored-image")}
    folder = naming.restore_dir(ctx.params["target"], ctx.domain, ctx.rec.id)
    xml = restore.restored_domain_xml(source, ctx.params["define"], disks, ctx.rec.id,
                                      f"instant restore of backup {last['id']} of {ctx.domain}", folder)
    pins = {a["source"]: a["path"] for a in ctx.rec.artifacts_of("backing-pin")}
    chains = {disk: [pins.get(p, p) for p in reversed(chain_mod.files_of(ctx.params["chain"], disk))]
              for disk in disks}
    return with_backing_chains(xml, chains)


def _pin_path(folder: str, link_id: str, disk: str) -> str:
    return os.path.join(folder, f"backing.{link_id}.{disk}.qcow2")


def _ours(ctx: StepContext) -> bool:
    """Whether the domain ``--define`` names exists and is ours (refuses one someone else defined)."""
    name = ctx.params["define"]
    desc = ctx.hv.lookup_domain_description(name)
    if desc is not None and marker(ctx.rec.id) not in desc:
        raise StepFailed(f"a domain named {name} appeared that this restore did not define")
    return desc is not None


def _log_files(xml: str, folder: str) -> list[str]:
    """Files the new domain writes into the restore folder besides its disks (console logs, file channels)."""
    root = ET.fromstring(xml)
    out = [el.get("file", "") for el in root.iter("log")]
    out += [src.get("path", "") for el in root.iter() if el.tag in ("serial", "console", "channel", "parallel")
            and el.get("type") == "file" for src in el.findall("source")]
    return sorted({p for p in out if p and os.path.dirname(p) == folder})


class Preflight(Step):
    description = "check every file of the chain against its checksum; name the overlays"

    def execute(self, ctx: StepContext) -> None:
        ctx.data.pop("checked", None)  # the folders may have changed since submit: every byte is read again
        with restore.open_checked(ctx, define=True) as opened:
            self._plan(ctx, opened)

    def _plan(self, ctx: StepContext, opened: bf.Opened) -> None:
        target, wf = ctx.params["target"], ctx.rec.id
        folder = naming.restore_dir(target, ctx.domain, wf)
        common.plan_capture_folder(ctx, folder)
        for disk in sorted(ctx.params["chain"][-1]["files"]):
            ctx.rec.plan_artifact(Artifact(f"restored:{disk}", "restored-image",
                                           naming.instant_overlay(target, ctx.domain, wf, disk), disk))
        for link in ctx.params["chain"]:  # each file of the chain, pinned in our folder: what libvirt opens
            for disk, info in sorted(link["files"].items()):
                if info["path"] in chain_mod.files_of(ctx.params["chain"], disk):
                    art = ctx.rec.plan_artifact(Artifact(f"pin:{link['id']}:{disk}", "backing-pin",
                                                         _pin_path(folder, link["id"], disk), disk))
                    art["source"] = info["path"]
        for i, path in enumerate(_log_files(_domain_xml(ctx, opened), folder)):
            ctx.rec.plan_artifact(Artifact(f"domain-file:{i}", "domain-file", path))
        ctx.rec.plan_artifact(Artifact("manifest", "manifest", os.path.join(folder, "instant-restore.json")))
        ctx.rec.plan_artifact(Artifact("domain", "domain", ctx.params["define"]))

    def revert(self, ctx: StepContext) -> None:
        if "folder" in ctx.rec.artifacts:
            common.remove_capture_folder(ctx)


class Overlay(Step):
    description = "one empty qcow2 overlay per disk (its backing is given in the domain XML)"

    def probe(self, ctx: StepContext) -> bool:
        return all(a["status"] == "present" and os.path.exists(a["path"])
                   for a in ctx.rec.artifacts_of("restored-image"))

    def execute(self, ctx: StepContext) -> None:
        common.make_capture_folder(ctx)
        with restore.open_checked(ctx, define=True) as opened:
            self._overlays(ctx, opened)

    def _overlays(self, ctx: StepContext, opened: bf.Opened) -> None:
        for art in ctx.rec.artifacts_of("backing-pin"):
            ctx.guard()
            digest = ctx.fx.files.pin(opened.fd(art["source"]), art["path"])
            want = opened.known().get(art["source"], [""] * 6)[5]
            if digest and digest != want:
                raise StepFailed(f"{art['source']}: the copy pinned for this restore differs from the file checked")
            ctx.rec.set_artifact(art["name"], status="present")
        for art in ctx.rec.artifacts_of("restored-image"):
            files = chain_mod.files_of(ctx.params["chain"], art["disk"])
            size = int(nbdio.image_info(opened.proc(files[-1]))["virtual-size"])
            ctx.save("overlay-intent", disk=art["disk"], path=art["path"])
            ctx.fx.files.prepare_for_writer(art["path"])
            ctx.guard()
            nbdio.run_qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=1.1", art["path"], str(size))
            ctx.fx.files.fsync(art["path"])
            ctx.rec.set_artifact(f"restored:{art['disk']}", status="present")

    def revert(self, ctx: StepContext) -> None:
        kinds = ("restored-image", "domain-file", "backing-pin")
        names = [a["path"] for a in ctx.rec.artifacts.values() if a["kind"] in kinds]
        bc.remove_ours(ctx, names + [naming.partial_of(p) for p in names])
        for art in ctx.rec.artifacts.values():
            if art["kind"] in kinds:
                art["status"] = "deleted"


class Define(Step):
    description = "define the new domain: the backed-up XML, a new name, its disks on the overlays over the chain"

    def probe(self, ctx: StepContext) -> bool:
        return _ours(ctx)

    def execute(self, ctx: StepContext) -> None:
        # right before the define, as restore --define: the folder (domain.xml, signature, manifest against
        # the record) is checked again in this worker, and the XML checked is the XML used
        with restore.open_checked(ctx, define=True) as opened:
            xml = _domain_xml(ctx, opened)
        for art in ctx.rec.artifacts_of("backing-pin"):
            st = os.lstat(art["path"])
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise StepFailed(f"{art['path']} is no longer the file this restore pinned")
        ctx.save("define-intent", domain=ctx.params["define"])
        ctx.hv.define_restored_domain(xml)
        ctx.rec.set_artifact("domain", status="present")

    def revert(self, ctx: StepContext) -> None:
        name = ctx.params["define"]
        if _ours(ctx):
            if ctx.hv.domain_state(name) != "shutoff":
                ctx.save("destroy-intent", domain=name)
                ctx.hv.destroy(name)
            # its NVRAM (if any) is a file libvirt named after this new domain: ours to remove with it
            ours = ctx.hv.firmware(name).nvram is not None
            ctx.save("undefine-intent", domain=name, nvram=ours)
            ctx.hv.undefine_restored_domain(name, nvram=ours)
        ctx.rec.set_artifact("domain", status="deleted")


class Start(Step):
    description = "start the new domain on its overlays"

    def probe(self, ctx: StepContext) -> bool:
        return _ours(ctx) and ctx.hv.domain_state(ctx.params["define"]) in ("running", "paused")

    def execute(self, ctx: StepContext) -> None:
        if not _ours(ctx):
            raise StepFailed(f"domain {ctx.params['define']} (defined by this restore) is gone")
        ctx.save("start-intent", domain=ctx.params["define"])
        ctx.hv.start(ctx.params["define"])
        ctx.data["started_at"] = ctx.clock()

    def revert(self, ctx: StepContext) -> None:
        name = ctx.params["define"]
        if _ours(ctx) and ctx.hv.domain_state(name) != "shutoff":
            ctx.save("destroy-intent", domain=name)
            ctx.hv.destroy(name)


class Pull(Step):
    description = "stream each disk's backup chain into its overlay while the domain runs (blockPull)"

    def _pending(self, ctx: StepContext) -> list[str]:
        """Disks still on a backing chain."""
        return sorted(d.target for d in ctx.hv.disks(ctx.params["define"]) if d.backing)

    def probe(self, ctx: StepContext) -> bool:
        return _ours(ctx) and not self._pending(ctx)

    def execute(self, ctx: StepContext) -> None:
        name = ctx.params["define"]
        if ctx.hv.domain_state(name) == "shutoff":
            # stopped (or its QEMU died) before its disks stood alone: a pull needs it running, and a
            # rollback would delete what the guest wrote, so it is started again on its overlays
            ctx.save("restart-intent", domain=name)
            ctx.hv.start(name)
        sizes = {a["disk"]: int(nbdio.image_info(a["path"])["virtual-size"])
                 for a in ctx.rec.artifacts_of("restored-image")}
        total = sum(sizes.values())
        while pending := self._pending(ctx):
            ctx.check_cancel()
            done = sum(v for k, v in sizes.items() if k not in pending)
            jobs = {disk: ctx.hv.block_job(name, disk) for disk in pending}
            running = [disk for disk, job in jobs.items() if job is not None]
            if not running:  # one disk at a time: never started, or ended without finishing (started again)
                disk = pending[0]
                ctx.save("pull-intent", disk=disk)
                ctx.hv.block_pull(name, disk)
                ctx.save("pull-started", disk=disk)
            for disk in running:
                job = jobs[disk]
                if job is not None and job.end:
                    done += sizes[disk] * job.cur // job.end
            ctx.progress("pull", done, total)
            ctx.sleep(POLL)
        ctx.progress("pull", total, total, force=True)

    def revert(self, ctx: StepContext) -> None:
        name = ctx.params["define"]
        if not _ours(ctx) or ctx.hv.domain_state(name) not in ("running", "paused"):
            return
        for disk in sorted(ctx.rec.artifacts_of("restored-image"), key=lambda a: str(a["disk"])):
            if ctx.hv.block_job(name, disk["disk"]) is not None:
                ctx.hv.block_job_abort(name, disk["disk"])


class Finalize(Step):
    description = "each image stands alone (qemu-img: no backing); write instant-restore.json; complete only now"

    def _path(self, ctx: StepContext) -> str:
        path: str = ctx.rec.artifacts["manifest"]["path"]
        return path

    def probe(self, ctx: StepContext) -> bool:
        doc = bc.read_manifest(self._path(ctx))
        return doc is not None and doc.get("workflow") == ctx.rec.id

    def execute(self, ctx: StepContext) -> None:
        files = {}
        for art in ctx.rec.artifacts_of("restored-image"):
            info = nbdio.image_info(art["path"])
            if info.get("backing-filename") or info.get("full-backing-filename"):
                raise StepFailed(f"{art['path']} still names a backing file: {info.get('backing-filename')}")
            files[art["disk"]] = {"path": art["path"], "virtual_size": info["virtual-size"]}
        for art in ctx.rec.artifacts_of("backing-pin"):  # the images stand alone: the pins are not read any more
            bc.remove_ours(ctx, [art["path"], naming.partial_of(art["path"])])
            art["status"] = "deleted"
        ctx.data["files"] = files
        doc = {"format": "domcapture-restore", "version": 1, "workflow": ctx.rec.id, "strategy": NAME,
               "domain": ctx.domain, "from": ctx.params["from"],
               "chain": [link["id"] for link in ctx.params["chain"]], "defined": ctx.params["define"],
               "files": files}
        ctx.fx.files.write_atomic(self._path(ctx), doc)

    def next_trigger(self, ctx: StepContext) -> str:
        ctx.rec.set_artifact("manifest", status="present")
        started = ctx.data.get("started_at")
        ctx.rec.result = {"restore_dir": os.path.dirname(self._path(ctx)), "manifest": self._path(ctx),
                          "files": ctx.data.get("files", {}), "defined": ctx.params["define"],
                          "chain": [link["id"] for link in ctx.params["chain"]], "from": ctx.params["from"],
                          "running_after_s": round(started - ctx.rec.created_at, 2) if started else None}
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        path = self._path(ctx)
        bc.remove_ours(ctx, [path, naming.partial_of(path)])


STEPS: dict[str, Step] = {"preflight": Preflight(), "overlaying": Overlay(), "defining": Define(),
                          "starting": Start(), "pulling": Pull(), "finalizing": Finalize()}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash={s: RESUME for s in STATES},
                        validate=validate, resolve=resolve, holds_domain=False,
                        options=(restore.OPT_FROM, common.OPT_TARGET, restore.OPT_DEFINE, common.OPT_ON_ERROR),
                        summary="start a new domain at once on a direct backup chain, then stream the data in "
                                "while it runs (blockPull)")
