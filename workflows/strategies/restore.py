"""Restore direct backups into new disk images, optionally as a new domain.

``--from ID`` names a succeeded direct-backup; its chain (the full backup,
then each incremental in order) is followed through the records.  Each disk
is written as a new qcow2 image (the full's data, then each incremental's
changed clusters over it), checked against the chain (``qemu-img compare``)
and checksummed.  ``--disk vdb`` restores that disk alone; with ``--to PATH``
its flattened image is written to PATH (a new file; no restore folder, the
record holds the result).  With ``--define NAME`` a new domain is defined from the
source domain's XML saved with the backup: new name, a UUID derived from the
workflow id (``restored_uuid``), the restored images as its disks, its own
NVRAM copy, and, when the backup captured its TPM emulator's state, its own
copy of that state in swtpm's folder for the new UUID (written before the
define, with the modes and owner libvirt gives a new domain's).  Nothing
existing is modified: the backups are only read, the source domain is not
touched.

A crash in any state resumes (an image is rewritten from the start; a
defined domain is recognised by the workflow id in its description).
Rollback deletes the restored images, undefines the domain it defined (with
its TPM state) and deletes whichever planned TPM files remain.
"""

from __future__ import annotations

import os
import re
import uuid
import xml.etree.ElementTree as ET
from typing import Any, Callable

from .. import backupfolder as bf
from .. import naming, nbdio, validate
from ..definition import RESUME, Definition, Option
from ..errors import InputError, InvalidTarget, StepFailed
from ..filecopy import sha256_file
from ..effects import Inspect
from ..hypervisor.base import TPM_STATE_ROOT, swtpm_owner
from ..record import Artifact, Record
from ..steps import Step, StepContext
from . import backup_common as bc
from . import chain as chain_mod
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

OPT_FROM = Option("from", "the id of the capture workflow to go back to")
OPT_DEFINE = Option("define", "restore: define a new domain of this name on the restored images")
OPT_ENCRYPT_KEY_FILE = Option("encrypt_key_file", "restore: the passphrase file of an encrypted backup "
                                                  "(the restored images are not encrypted)")
OPT_DISK = Option("disk", "restore only this disk (e.g. vdb)")
OPT_TO = Option("to", "with --disk: write that disk's image (the chain flattened, qcow2) to this new file")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


# -- input -------------------------------------------------------------------------------------------
def resolve(load: Callable[[str], Record], params: dict[str, Any]) -> dict[str, Any]:
    """``--from ID``: the backup to restore, and its chain back to the full backup, from the records."""
    params["chain"] = chain_mod.backup_chain(load, params.get("from"))
    return params


def check_new_file(name: str, value: Any) -> str:
    """A file to create: its folder is checked the way ``--target`` is (exists, writable, nobody else can
    swap names in it or above it); the last component is never resolved: whatever is there (a file, a
    dangling symlink) is refused now, and the worker creates it with ``O_EXCL|O_NOFOLLOW`` and puts the
    image there with a link that never replaces anything."""
    raw = validate.path(name, value)
    base = os.path.basename(raw)
    if not base or base in (".", "..") or ".." in raw.split("/"):
        raise InvalidTarget(f"--{name} {raw}: name a new file (no '..', not a folder)")
    folder = os.path.dirname(os.path.abspath(raw))
    try:
        folder = common.check_target_dir(folder)
    except InvalidTarget as exc:
        raise InvalidTarget(f"--{name} {raw}: {exc}") from None
    path = os.path.join(folder, base)
    for p in (path, naming.partial_of(path)):
        if os.path.lexists(p):
            raise InvalidTarget(f"--{name} {path}: {p} already exists; choose a new file")
    return path


def validate_params(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    hv = look.hv
    chain = params.get("chain") or []
    disks = chain_mod.check_chain(chain, params.get("from"), domain)
    check_chain_folders(chain, deep=False, define=params.get("define") is not None)  # no link followed
    disk = chain_mod.pick_disk(disks, params.get("disk"), chain[-1]["id"], required=False)
    key = common.check_key_file("encrypt_key_file", params["encrypt_key_file"]) \
        if params.get("encrypt_key_file") else None
    for link in chain:  # an encrypted file needs the key, and the key must unlock it
        for info in link["files"].values():
            nbdio.check_key(info["path"], key)
    out: dict[str, Any] = {
        "from": chain[-1]["id"], "chain": chain, "on_error": common.parse_on_error(params),
        "define": None if params.get("define") is None else common.check_text("define", params["define"]),
        "disk": disk, "to": None,
    }
    if params.get("to") is not None:
        if disk is None:
            raise InputError("--to needs --disk: the one disk to write there")
        if params.get("target") is not None:
            raise InputError("--to and --target exclude each other: --to names the restored file itself")
        out["to"] = check_new_file("to", params["to"])
        out["target"] = None
    else:
        out["target"] = common.check_target_dir(params.get("target"))
    if out["define"]:
        if disk is not None:
            raise InputError("--define needs every disk of the backup; leave out --disk")
        if not _NAME_OK.match(out["define"]):
            raise InputError(f"--define {out['define']!r} is not a valid domain name")
        if hv.lookup_domain_description(out["define"]) is not None:
            raise InputError(f"--define: domain {out['define']} already exists")
        if not os.path.exists(_domain_xml(chain[-1])):
            raise InputError(f"backup {chain[-1]['id']} has no domain.xml to define a domain from")
        tpm_files(chain[-1])  # each captured TPM file's relative path stays inside a state folder
    need = sum(info["size"] for link in chain for d, info in link["files"].items() if disk in (None, d))
    common.check_space(out["target"] or os.path.dirname(out["to"]), need, "restore target")
    if key:
        out["encrypt_key_file"] = key
    return out


def check_chain_folders(chain: list[dict[str, Any]], *, deep: bool, define: bool) -> None:
    """Refuse a chain whose folders do not match their manifests and records (one line naming the file).

    ``deep=False`` (at submit) reads every small file and checks the disk images' sizes and headers;
    ``deep=True`` re-reads the images too.  Nothing is followed (``chain.open_chain``).
    """
    chain_mod.open_chain(chain, deep=deep, define=define).close()


def open_checked(ctx: StepContext, *, define: bool = False) -> bf.Opened:
    """The chain's files, checked again in this worker right before they are used, and held open: what a
    step reads is what was checked.  A refusal fails the step (the workflow rolls back) naming the file."""
    try:
        opened = chain_mod.open_chain(ctx.params["chain"], disks=None if define else _disks(ctx), define=define,
                                      known=ctx.data.get("checked"))
    except InputError as exc:
        raise StepFailed(str(exc)) from None
    ctx.data["checked"] = {**(ctx.data.get("checked") or {}), **opened.known()}
    return opened


def restored_uuid(wf_id: str) -> str:
    """The UUID of the domain restore ``wf_id`` defines: the same on every attempt, so its TPM state
    folder (named by it) can be written, probed and removed before and after the define."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"domcapture:restore:{wf_id}"))


def tpm_files(link: dict[str, Any]) -> dict[str, str]:
    """The captured TPM files of a backup and where each goes in a state folder (copy path -> relative
    path); refuses a relative path that would leave the folder.  {} when none are recorded."""
    out: dict[str, str] = {}
    for src, rel in (link.get("tpm_files") or {}).items():
        if (not isinstance(rel, str) or not rel or validate.has_control(rel) or os.path.isabs(rel)
                or os.path.normpath(rel) != rel or rel.split(os.sep)[0] in ("..", ".")):
            raise InputError(f"backup {link['id']}: TPM file {src} has a bad relative path {rel!r}")
        if os.path.dirname(src) != os.path.dirname(link["manifest"]) \
                or not os.path.basename(src).startswith(f"{evidence.TPM_FOLDER}."):
            raise InputError(f"backup {link['id']}: {src} is not a TPM copy in the backup's folder")
        out[src] = rel
    return out


def _tpm_note(link: dict[str, Any]) -> str | None:
    """Why the restored domain starts with a fresh TPM although the source had state (else None)."""
    if tpm_files(link):
        return None
    if any(name.startswith("tpm:") for name in link.get("firmware") or {}):
        return (f"backup {link['id']} does not record where its TPM files go (captured before that was "
                "recorded): the new domain starts with a fresh TPM")
    return None


def _domain_xml(link: dict[str, Any]) -> str:
    return os.path.join(os.path.dirname(link["manifest"]), "domain.xml")


def _marker(wf_id: str) -> str:
    return f"restored by domcapture workflow {wf_id}"


def restored_domain_xml(source_xml: str, name: str, disks: dict[str, str], wf_id: str, note: str,
                        folder: str, nvram: str | None = None, domain_uuid: str | None = None) -> str:
    """The source domain's XML with a new name, the UUID ``domain_uuid`` (None: none, libvirt makes one),
    the restored disks, its own log/channel files, its own NVRAM (``nvram``; without one, libvirt names a
    new one)."""
    root = ET.fromstring(source_xml)
    root.find("name").text = name  # type: ignore[union-attr]
    for tag in ("uuid", "description"):
        for el in root.findall(tag):
            root.remove(el)
    if domain_uuid:
        uuid_el = ET.Element("uuid")
        uuid_el.text = domain_uuid
        root.insert(1, uuid_el)
    desc = ET.Element("description")
    desc.text = f"{_marker(wf_id)}: {note}"
    root.insert(1, desc)
    devices = root.find("devices")
    for d in root.findall("./devices/disk"):
        target = d.find("target")
        if target is None or target.get("dev") not in disks:
            if (devices is not None and d.get("device", "disk") == "disk" and d.find("readonly") is None
                    and d.find("shareable") is None):
                devices.remove(d)  # a writable disk left out of the backup: never share the source's image
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
    return chain_mod.files_of(ctx.params["chain"], disk)


def _disks(ctx: StepContext) -> set[str]:
    disk = ctx.params.get("disk")
    return {disk} if disk else set(ctx.params["chain"][-1]["files"])


class Preflight(Step):
    description = "check every file of the chain against its recorded checksum; name the restored images"

    def execute(self, ctx: StepContext) -> None:
        ctx.data.pop("checked", None)  # the folders may have changed since submit: every byte is read again
        open_checked(ctx, define=bool(ctx.params.get("define"))).close()
        wf, to = ctx.rec.id, ctx.params.get("to")
        if to:  # one disk, to the file the operator named: no folder, no restore.json
            if "restored:" + ctx.params["disk"] not in ctx.rec.artifacts and os.path.lexists(to):
                raise StepFailed(f"--to {to}: a file appeared there after submit; nothing was written")
            ctx.rec.plan_artifact(Artifact(f"restored:{ctx.params['disk']}", "restored-image", to,
                                           ctx.params["disk"]))
            return
        target = ctx.params["target"]
        for disk in sorted(_disks(ctx)):
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
            plan_tpm_state(ctx)
            ctx.rec.plan_artifact(Artifact("domain", "domain", ctx.params["define"]))

    def revert(self, ctx: StepContext) -> None:
        common.remove_capture_folder(ctx)


def plan_tpm_state(ctx: StepContext) -> None:
    """Name the restored domain's TPM state (its folder, subfolders and files, under the new UUID's
    folder) before anything is written; nothing when the backup recorded no TPM files."""
    try:
        files = tpm_files(ctx.params["chain"][-1])
    except InputError as exc:
        raise StepFailed(str(exc)) from None
    if not files:
        return
    state = f"{TPM_STATE_ROOT}/{restored_uuid(ctx.rec.id)}"
    if "tpm-folder:" not in ctx.rec.artifacts and os.path.lexists(state):
        raise StepFailed(f"{state} exists already; refusing to restore a TPM state over it")
    folders = {""}
    for rel in files.values():
        parent = os.path.dirname(rel)
        while parent:
            folders.add(parent)
            parent = os.path.dirname(parent)
    for part in sorted(folders, key=lambda r: (r.count(os.sep) + bool(r), r)):  # parents first
        ctx.rec.plan_artifact(Artifact(f"tpm-folder:{part}", "tpm-folder", os.path.join(state, part).rstrip("/")))
    for src, rel in sorted(files.items(), key=lambda kv: kv[1]):
        art = ctx.rec.plan_artifact(Artifact(f"tpm:{rel}", "tpm-state", os.path.join(state, rel)))
        art["source"] = src


#: the modes libvirt gives a new domain's swtpm state: the UUID's folder, the folders in it, the files
TPM_MODES = {"top": 0o711, "folder": 0o700}


def write_tpm_state(ctx: StepContext, sources: dict[str, str] | None = None) -> None:
    """Copy each planned TPM file into the new domain's state folder; a file already there with the
    checksum it was written with is kept (a resumed restore)."""
    folders = ctx.rec.artifacts_of("tpm-folder")
    files = ctx.rec.artifacts_of("tpm-state")
    if not files:
        return
    owner = swtpm_owner()
    ctx.save("tpm-intent", state=ctx.rec.artifacts["tpm-folder:"]["path"], files=len(files))
    for art in folders:
        ctx.fx.files.make_tpm_folder(art["path"], mode=TPM_MODES["top" if art["name"] == "tpm-folder:" else
                                                                 "folder"], owner=owner)
        ctx.rec.set_artifact(art["name"], status="present")
    for art in files:
        ctx.check_cancel()
        if art["status"] == "present" and os.path.exists(art["path"]) \
                and f"sha256:{sha256_file(art['path'])}" == art.get("checksum"):
            continue
        src = (sources or {}).get(art["source"])
        if src is None:
            raise StepFailed(f"{art['source']}: not a checked file of the backup's folder")
        digest, size = ctx.fx.files.write_tpm_file(src, art["path"], owner=owner)
        ctx.rec.set_artifact(art["name"], status="present", checksum=f"sha256:{digest}", size=size)
    ctx.save("tpm-written", state=ctx.rec.artifacts["tpm-folder:"]["path"])


def remove_tpm_state(ctx: StepContext) -> None:
    """Delete the planned TPM files and folders that remain (the undefine removed them when it ran)."""
    for art in ctx.rec.artifacts_of("tpm-state"):
        for path in (art["path"], naming.partial_of(art["path"])):
            ctx.fx.files.remove_owned(path)
        art["status"] = "deleted"
    for art in reversed(ctx.rec.artifacts_of("tpm-folder")):
        if os.path.isdir(art["path"]) and not ctx.fx.files.remove_folder(art["path"]):
            raise StepFailed(f"{art['path']} holds files this restore did not write; left in place")
        art["status"] = "deleted"


class Restore(Step):
    description = "write each disk's image: the full backup's data, then each incremental's, in order"

    def probe(self, ctx: StepContext) -> bool:
        return all(a["status"] == "present" and os.path.exists(a["path"])
                   for a in ctx.rec.artifacts_of("restored-image") + ctx.rec.artifacts_of("firmware-copy"))

    def execute(self, ctx: StepContext) -> None:
        with open_checked(ctx, define=bool(ctx.params.get("define"))) as opened:
            self._restore(ctx, opened)

    def _restore(self, ctx: StepContext, opened: bf.Opened) -> None:
        arts = ctx.rec.artifacts_of("restored-image")
        sizes = {a["disk"]: sum(os.fstat(opened.fd(p)).st_size for p in _chain_files(ctx, a["disk"])) for a in arts}
        total, done = sum(sizes.values()), 0
        for art in arts:
            ctx.check_cancel()
            if art["status"] == "present" and os.path.exists(art["path"]):
                done += sizes[art["disk"]]
                continue
            partial = naming.partial_of(art["path"])
            if not os.path.exists(art["path"]):  # else: renamed complete just before a crash
                if "folder" in ctx.rec.artifacts:
                    common.make_capture_folder(ctx)
                ctx.save("restore-intent", disk=art["disk"], partial=partial,
                         chain=[link["id"] for link in ctx.params["chain"]])
                ctx.fx.files.prepare_for_writer(partial)  # 0600, exclusive: qemu-img writes into it
                nbdio.convert_chain([opened.proc(p) for p in _chain_files(ctx, art["disk"])], partial,
                                    ctx.params.get("encrypt_key_file"))
                ctx.fx.files.fsync(partial)
                ctx.fx.files.rename_noreplace(partial, art["path"])
            ctx.rec.set_artifact(f"restored:{art['disk']}", status="present")
            done += sizes[art["disk"]]
            ctx.progress("restore", done, total, force=True, disk=art["disk"])
            ctx.save("restored", disk=art["disk"])
        if ctx.rec.artifacts_of("firmware-copy"):
            common.make_capture_folder(ctx)
            evidence.copy_firmware(ctx, sources={p: opened.proc(p) for p in opened.fds})

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
        with open_checked(ctx, define=bool(ctx.params.get("define"))) as opened:
            self._verify(ctx, opened)

    def _verify(self, ctx: StepContext, opened: bf.Opened) -> None:
        for art in ctx.rec.artifacts_of("restored-image"):
            ctx.guard()
            nbdio.check_image(art["path"])
            if not nbdio.same_content([opened.proc(p) for p in _chain_files(ctx, art["disk"])], art["path"],
                                      ctx.params.get("encrypt_key_file")):
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
        with open_checked(ctx, define=True) as opened:  # right before the define: the XML checked is the XML used
            source = opened.read(_domain_xml(last)).decode()
            self._define(ctx, name, last, source, opened)

    def _define(self, ctx: StepContext, name: str, last: dict[str, Any], source: str, opened: bf.Opened) -> None:
        disks = {a["disk"]: a["path"] for a in ctx.rec.artifacts_of("restored-image")}
        nvram = ctx.rec.artifacts.get("firmware:nvram")
        xml = restored_domain_xml(source, name, disks, ctx.rec.id, f"backup {last['id']} of {ctx.domain}",
                                  naming.restore_dir(ctx.params["target"], ctx.domain, ctx.rec.id),
                                  nvram=nvram["path"] if nvram else None, domain_uuid=restored_uuid(ctx.rec.id))
        write_tpm_state(ctx, {p: opened.proc(p) for p in opened.fds})
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
            ctx.hv.undefine_restored_domain(name, nvram=ours)  # with its TPM state folder
        if "domain" in ctx.rec.artifacts:
            ctx.rec.set_artifact("domain", status="deleted")
        remove_tpm_state(ctx)


class Finalize(Step):
    description = "write restore.json (images, checksums, the chain, the domain); complete only now"

    def _path(self, ctx: StepContext) -> str | None:
        art = ctx.rec.artifacts.get("manifest")
        return str(art["path"]) if art else None

    def probe(self, ctx: StepContext) -> bool:
        if self._path(ctx) is None:
            return True  # --to: the record alone holds the result
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
        path = self._path(ctx)
        if path is not None:
            ctx.fx.files.write_atomic(path, doc)

    def next_trigger(self, ctx: StepContext) -> str:
        path = self._path(ctx)
        if path is not None:
            ctx.rec.set_artifact("manifest", status="present")
        ctx.rec.result = {"restore_dir": os.path.dirname(path) if path else None, "manifest": path,
                          "files": self._files(ctx), "chain": [link["id"] for link in ctx.params["chain"]],
                          "from": ctx.params["from"], "defined": ctx.params.get("define"),
                          "nvram": (ctx.rec.artifacts.get("firmware:nvram") or {}).get("path"),
                          **self._tpm(ctx)}
        return "advance"

    @staticmethod
    def _tpm(ctx: StepContext) -> dict[str, Any]:
        """The new domain's UUID and what became of the captured TPM state (None: no --define)."""
        if not ctx.params.get("define"):
            return {"uuid": None, "tpm": None}
        files = ctx.rec.artifacts_of("tpm-state")
        top = ctx.rec.artifacts.get("tpm-folder:")
        return {"uuid": restored_uuid(ctx.rec.id),
                "tpm": {"state": top["path"] if top else None,
                        "files": {a["name"].removeprefix("tpm:"): a["checksum"] for a in files},
                        "fresh": _tpm_note(ctx.params["chain"][-1])}}

    def revert(self, ctx: StepContext) -> None:
        path = self._path(ctx)
        if path is not None:
            bc.remove_ours(ctx, [path, path + ".partial"])


STEPS: dict[str, Step] = {
    "preflight": Preflight(),
    "restoring": Restore(),
    "verifying": Verify(),
    "defining": Define(),
    "finalizing": Finalize(),
}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash={s: RESUME for s in STATES},
                        validate=validate_params, resolve=resolve, holds_domain=False,
                        options=(OPT_FROM, common.OPT_TARGET, OPT_DEFINE, OPT_DISK, OPT_TO, common.OPT_ON_ERROR,
                                 OPT_ENCRYPT_KEY_FILE),
                        summary="restore a direct backup chain into new images; optionally define a new domain")
