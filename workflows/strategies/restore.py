"""Restore direct backups into new disk images, optionally as a new domain.

``--from ID`` names a succeeded direct-backup; its chain (the full backup,
then each incremental in order) is followed through the records.  Each disk
is written as a new qcow2 image (the full's data, then each incremental's
changed clusters over it), checked against the chain (``qemu-img compare``)
and checksummed.  With ``--define NAME`` a new domain is defined from the
source domain's XML saved with the backup: new name, no UUID (libvirt makes
one), the restored images as its disks.  Nothing existing is modified: the
backups are only read, the source domain is not touched.

A crash in any state resumes (an image is rewritten from the start; a
defined domain is recognised by the workflow id in its description).
Rollback deletes the restored images and undefines the domain it defined.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from typing import Any, Callable

from .. import manifest, naming, nbdio
from ..definition import RESUME, Definition, Option
from ..errors import InputError, StepFailed
from ..filecopy import sha256_file
from ..effects import Inspect
from ..record import Artifact, Record
from ..steps import Step, StepContext
from . import backup_common as bc
from . import common, evidence

NAME = "restore"
VERSION = 1

STATES = ["preflight", "restoring", "verifying", "defining", "finalizing"]

TRANSITIONS = [
    # trigger    source        dest
    ["advance", "preflight",  "restoring"],    # the chain's files are there and intact
    ["advance", "restoring",  "verifying"],    # full, then each incremental, into a new image per disk
    ["advance", "verifying",  "defining"],     # restored image == chain; checksums recorded
    ["advance", "defining",   "finalizing"],   # --define NAME: a new domain on the restored images
    ["advance", "finalizing", "succeeded"],
]

MAX_CHAIN = 1000
OPT_FROM = Option("from", "the id of the capture workflow to go back to")
OPT_DEFINE = Option("define", "restore: define a new domain of this name on the restored images")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


# -- input -------------------------------------------------------------------------------------------
def resolve(load: Callable[[str], Record], params: dict[str, Any]) -> dict[str, Any]:
    """``--from ID``: the backup to restore, and its chain back to the full backup, from the records."""
    ref = params.get("from")
    if not ref:
        raise InputError("--from is required: the id of a succeeded direct-backup")
    chain: list[dict[str, Any]] = []
    wf_id: str | None = str(ref)
    while wf_id:
        src = load(wf_id)
        if src.strategy != "direct-backup":
            raise InputError(f"workflow {wf_id} is a {src.strategy} workflow; --from needs a direct-backup")
        if src.status != "succeeded":
            raise InputError(f"backup {wf_id} is {src.status}; only a succeeded direct-backup can be restored")
        if len(chain) > MAX_CHAIN or any(link["id"] == src.id for link in chain):
            raise InputError(f"the chain of backup {ref} loops at {src.id}")
        chain.insert(0, {"id": src.id, "domain": src.domain, "kind": src.result["kind"],
                         "manifest": src.result["manifest"], "files": src.result["files"],
                         "manifest_sha256": src.result.get("manifest_sha256"),
                         "firmware": (src.result.get("firmware") or {}).get("copies") or {}})
        wf_id = src.result.get("parent_backup")
    params["chain"] = chain
    return params


def validate(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    hv = look.hv
    chain = params.get("chain")
    if not chain:
        raise InputError("--from is required: the id of a succeeded direct-backup")
    if chain[0]["kind"] != "full":
        raise InputError(f"the chain of backup {params.get('from')} does not start with a full backup")
    disks = set(chain[-1]["files"])
    for link in chain:
        if link["domain"] != domain:
            raise InputError(f"backup {link['id']} is of domain {link['domain']}, not {domain}")
        if set(link["files"]) != disks:
            raise InputError(f"backup {link['id']} holds disks {sorted(link['files'])}, the chain {sorted(disks)}")
        for disk, info in link["files"].items():
            if not os.path.exists(info["path"]):
                raise InputError(f"backup {link['id']}: its {disk} file {info['path']} is missing")
            if os.path.getsize(info["path"]) != info["size"]:
                raise InputError(f"backup {link['id']}: its {disk} file {info['path']} changed size")
    check_chain_folders(chain, deep=False, define=params.get("define") is not None)
    out: dict[str, Any] = {
        "from": chain[-1]["id"], "chain": chain, "target": common.check_target_dir(params.get("target")),
        "on_error": common.parse_on_error(params),
        "define": None if params.get("define") is None else common.check_text("define", params["define"]),
    }
    if out["define"]:
        if not _NAME_OK.match(out["define"]):
            raise InputError(f"--define {out['define']!r} is not a valid domain name")
        if hv.lookup_domain_description(out["define"]) is not None:
            raise InputError(f"--define: domain {out['define']} already exists")
        if not os.path.exists(_domain_xml(chain[-1])):
            raise InputError(f"backup {chain[-1]['id']} has no domain.xml to define a domain from")
    need = sum(info["size"] for link in chain for info in link["files"].values())
    common.check_space(out["target"], need, "restore target")
    return out


def check_chain_folders(chain: list[dict[str, Any]], *, deep: bool, define: bool) -> None:
    """Refuse a chain whose folders do not match their manifests and records (one line naming the file).

    ``deep=False`` (at submit) reads every small file and checks the disk images' sizes;
    ``deep=True`` (the worker's preflight) re-reads the images too.
    """
    key = manifest.load_key()
    for link in chain:
        if not link.get("manifest_sha256"):  # a version 1 manifest: its domain.xml is not covered
            if key is not None:
                raise InputError(f"backup {link['id']} has a version 1 manifest (no signature) and "
                                 f"{manifest.KEY_ENV} is set; refusing to restore it")
            if define and link is chain[-1]:
                raise InputError(f"backup {link['id']} has a version 1 manifest that does not cover its "
                                 "domain.xml; refusing to --define from it (restore the disks without --define)")
            continue
        failed = manifest.first_failure(manifest.check_folder(link["manifest"], link["manifest_sha256"],
                                                              deep=deep, key=key))
        if failed:
            raise InputError(f"backup {link['id']} does not match its manifest: {failed}")


def _domain_xml(link: dict[str, Any]) -> str:
    return os.path.join(os.path.dirname(link["manifest"]), "domain.xml")


def _marker(wf_id: str) -> str:
    return f"restored by domcapture workflow {wf_id}"


def restored_domain_xml(source_xml: str, name: str, disks: dict[str, str], wf_id: str, note: str,
                        folder: str, nvram: str | None = None) -> str:
    """The source domain's XML with a new name, no UUID, the restored disks, its own log/channel files,
    its own NVRAM (``nvram``; without one, libvirt names a new one)."""
    root = ET.fromstring(source_xml)
    root.find("name").text = name  # type: ignore[union-attr]
    for tag in ("uuid", "description"):
        for el in root.findall(tag):
            root.remove(el)
    desc = ET.Element("description")
    desc.text = f"{_marker(wf_id)}: {note}"
    root.insert(1, desc)
    for d in root.findall("./devices/disk"):
        target = d.find("target")
        if target is None or target.get("dev") not in disks:
            continue
        d.set("type", "file")
        for bs in d.findall("backingStore"):
            d.remove(bs)
        src = d.find("source")
        if src is None:
            src = ET.SubElement(d, "source")
        src.attrib.clear()
        src.set("file", disks[target.get("dev", "")])
        drv = d.find("driver")
        if drv is None:
            drv = ET.SubElement(d, "driver", {"name": "qemu"})
        drv.set("type", "qcow2")
    nvram_el = root.find("./os/nvram")
    if nvram_el is not None:
        # never the source's variable store: our copy, or (none captured) a path libvirt names for this
        # domain and fills from the template at its first start
        nvram_el.text = nvram
        for attr in ("type",):
            nvram_el.attrib.pop(attr, None)
        for child in list(nvram_el):
            nvram_el.remove(child)
    for iface in root.findall("./devices/interface"):
        for mac in iface.findall("mac"):
            iface.remove(mac)  # libvirt makes a new one
    # files the source domain writes (console logs, file channels) get their own copies here
    for el in root.iter():
        if el.tag == "log" and el.get("file"):
            el.set("file", os.path.join(folder, os.path.basename(el.get("file", ""))))
        if el.tag in ("serial", "console", "channel", "parallel") and el.get("type") == "file":
            src = el.find("source")
            if src is not None and src.get("path"):
                src.set("path", os.path.join(folder, os.path.basename(src.get("path", ""))))
    return ET.tostring(root, encoding="unicode")


# -- steps ---------------------------------------------------------------------------------------------
def _chain_files(ctx: StepContext, disk: str) -> list[str]:
    return [link["files"][disk]["path"] for link in ctx.params["chain"]]


class Preflight(Step):
    description = "check every file of the chain against its recorded checksum; name the restored images"

    def execute(self, ctx: StepContext) -> None:
        try:  # the folders may have changed since submit: every byte is read again
            check_chain_folders(ctx.params["chain"], deep=True, define=bool(ctx.params.get("define")))
        except InputError as exc:
            raise StepFailed(str(exc)) from None
        for link in ctx.params["chain"]:
            for info in link["files"].values():
                ctx.guard()
                actual = f"sha256:{sha256_file(info['path'])}"
                if actual != info["checksum"]:
                    raise StepFailed(f"backup {link['id']}: {info['path']} does not match its checksum")
        target, wf = ctx.params["target"], ctx.rec.id
        for disk in sorted(ctx.params["chain"][-1]["files"]):
            ctx.rec.plan_artifact(Artifact(f"restored:{disk}", "restored-image",
                                           naming.restore_file(target, ctx.domain, wf, disk), disk))
        folder = naming.restore_dir(target, ctx.domain, wf)
        common.plan_capture_folder(ctx, folder)
        ctx.rec.plan_artifact(Artifact("manifest", "manifest", os.path.join(folder, "restore.json")))
        captured = ctx.params["chain"][-1].get("firmware", {}).get("nvram")
        if captured:  # the restored domain's own NVRAM: a copy of the captured one, named by this workflow
            art = ctx.rec.plan_artifact(Artifact("firmware:nvram", "firmware-copy",
                                                 os.path.join(folder, evidence.NVRAM_NAME)))
            art["source"] = captured
        if ctx.params.get("define"):
            ctx.rec.plan_artifact(Artifact("domain", "domain", ctx.params["define"]))

    def revert(self, ctx: StepContext) -> None:
        common.remove_capture_folder(ctx)


class Restore(Step):
    description = "write each disk's image: the full backup's data, then each incremental's, in order"

    def probe(self, ctx: StepContext) -> bool:
        return all(a["status"] == "present" and os.path.exists(a["path"])
                   for a in ctx.rec.artifacts_of("restored-image") + ctx.rec.artifacts_of("firmware-copy"))

    def execute(self, ctx: StepContext) -> None:
        arts = ctx.rec.artifacts_of("restored-image")
        sizes = {a["disk"]: sum(os.path.getsize(p) for p in _chain_files(ctx, a["disk"])) for a in arts}
        total, done = sum(sizes.values()), 0
        for art in arts:
            ctx.check_cancel()
            if art["status"] == "present" and os.path.exists(art["path"]):
                done += sizes[art["disk"]]
                continue
            partial = naming.partial_of(art["path"])
            if not os.path.exists(art["path"]):  # else: renamed complete just before a crash
                common.make_capture_folder(ctx)
                ctx.save("restore-intent", disk=art["disk"], partial=partial,
                         chain=[link["id"] for link in ctx.params["chain"]])
                ctx.fx.files.prepare_for_writer(partial)  # 0600, exclusive: qemu-img writes into it
                nbdio.convert_chain(_chain_files(ctx, art["disk"]), partial)
                ctx.fx.files.fsync(partial)
                ctx.fx.files.rename(partial, art["path"])
            ctx.rec.set_artifact(f"restored:{art['disk']}", status="present")
            done += sizes[art["disk"]]
            ctx.progress("restore", done, total, force=True, disk=art["disk"])
            ctx.save("restored", disk=art["disk"])
        if ctx.rec.artifacts_of("firmware-copy"):
            common.make_capture_folder(ctx)
            evidence.copy_firmware(ctx)

    def revert(self, ctx: StepContext) -> None:
        for art in ctx.rec.artifacts_of("restored-image"):
            bc.remove_ours(ctx, [art["path"], naming.partial_of(art["path"])])
            art["status"] = "deleted"
        evidence.remove_firmware(ctx)


class Verify(Step):
    description = "each restored image equals its chain (qemu-img compare), passes qemu-img check; checksums"

    def probe(self, ctx: StepContext) -> bool:
        return all(a.get("checksum") for a in ctx.rec.artifacts_of("restored-image"))

    def execute(self, ctx: StepContext) -> None:
        for art in ctx.rec.artifacts_of("restored-image"):
            ctx.guard()
            nbdio.check_image(art["path"])
            if not nbdio.same_content(_chain_files(ctx, art["disk"]), art["path"]):
                raise StepFailed(f"the restored image of {art['disk']} differs from its backup chain")
            info = nbdio.image_info(art["path"])
            ctx.rec.set_artifact(f"restored:{art['disk']}", checksum=f"sha256:{sha256_file(art['path'])}",
                                 size=os.path.getsize(art["path"]), virtual_size=info["virtual-size"])
            ctx.save("verified", disk=art["disk"])


class Define(Step):
    description = "--define NAME: define a new domain from the backed-up XML on the restored images"

    def probe(self, ctx: StepContext) -> bool:
        name = ctx.params.get("define")
        if not name:
            return True
        desc = ctx.hv.lookup_domain_description(name)
        if desc is not None and _marker(ctx.rec.id) not in desc:
            raise StepFailed(f"a domain named {name} appeared that this restore did not define")
        return desc is not None

    def execute(self, ctx: StepContext) -> None:
        name = ctx.params["define"]
        last = ctx.params["chain"][-1]
        with open(_domain_xml(last)) as f:
            source = f.read()
        disks = {a["disk"]: a["path"] for a in ctx.rec.artifacts_of("restored-image")}
        nvram = ctx.rec.artifacts.get("firmware:nvram")
        xml = restored_domain_xml(source, name, disks, ctx.rec.id, f"backup {last['id']} of {ctx.domain}",
                                  naming.restore_dir(ctx.params["target"], ctx.domain, ctx.rec.id),
                                  nvram=nvram["path"] if nvram else None)
        ctx.save("define-intent", domain=name)
        ctx.hv.define_restored_domain(xml)
        ctx.rec.set_artifact("domain", status="present")

    def revert(self, ctx: StepContext) -> None:
        name = ctx.params.get("define")
        if not name:
            return
        desc = ctx.hv.lookup_domain_description(name)
        if desc is not None and _marker(ctx.rec.id) in desc:
            if ctx.hv.domain_state(name) != "shutoff":
                raise StepFailed(f"domain {name} (defined by this restore) is running; shut it down, then roll "
                                 "back again")
            # the NVRAM file goes with the domain only when it is the copy this restore planned
            planned = ctx.rec.artifacts.get("firmware:nvram")
            ours = planned is not None and ctx.hv.firmware(name).nvram == planned["path"]
            ctx.save("undefine-intent", domain=name, nvram=ours)
            ctx.hv.undefine_restored_domain(name, nvram=ours)
        if "domain" in ctx.rec.artifacts:
            ctx.rec.set_artifact("domain", status="deleted")


class Finalize(Step):
    description = "write restore.json (images, checksums, the chain, the domain); complete only now"

    def _path(self, ctx: StepContext) -> str:
        path: str = ctx.rec.artifacts["manifest"]["path"]
        return path

    def probe(self, ctx: StepContext) -> bool:
        doc = bc.read_manifest(self._path(ctx))
        return doc is not None and doc.get("workflow") == ctx.rec.id

    def _files(self, ctx: StepContext) -> dict[str, Any]:
        return {a["disk"]: {"path": a["path"], "size": a["size"], "checksum": a["checksum"]}
                for a in ctx.rec.artifacts_of("restored-image")}

    def execute(self, ctx: StepContext) -> None:
        doc = {"format": "domcapture-restore", "version": 1, "workflow": ctx.rec.id, "strategy": NAME,
               "domain": ctx.domain, "from": ctx.params["from"],
               "chain": [link["id"] for link in ctx.params["chain"]],
               "defined": ctx.params.get("define"), "files": self._files(ctx)}
        ctx.fx.files.write_atomic(self._path(ctx), doc)

    def next_trigger(self, ctx: StepContext) -> str:
        ctx.rec.set_artifact("manifest", status="present")
        ctx.rec.result = {"restore_dir": os.path.dirname(self._path(ctx)), "manifest": self._path(ctx),
                          "files": self._files(ctx), "chain": [link["id"] for link in ctx.params["chain"]],
                          "from": ctx.params["from"], "defined": ctx.params.get("define"),
                          "nvram": (ctx.rec.artifacts.get("firmware:nvram") or {}).get("path")}
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        path = self._path(ctx)
        bc.remove_ours(ctx, [path, path + ".partial"])


STEPS: dict[str, Step] = {
    "preflight": Preflight(),
    "restoring": Restore(),
    "verifying": Verify(),
    "defining": Define(),
    "finalizing": Finalize(),
}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash={s: RESUME for s in STATES},
                        validate=validate, resolve=resolve,
                        options=(OPT_FROM, common.OPT_TARGET, OPT_DEFINE, common.OPT_ON_ERROR),
                        summary="restore a direct backup chain into new images; optionally define a new domain")
