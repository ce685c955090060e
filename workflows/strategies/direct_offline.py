"""``direct-backup`` of a shut-off domain: no QEMU, so no backup job; the same checkpoints and bitmaps.

libvirt keeps one persistent bitmap per checkpoint in each qcow2 image, named
as the checkpoint and enabled (recording every write since the checkpoint);
an incremental from checkpoint X reads X's bitmap (libvirt's "incremental
backup internals").  A shut-off domain gets exactly that layout by hand:

- begin: check the base checkpoint's bitmap in every image (present, enabled,
  saved cleanly; otherwise the backup falls back to full), add this
  checkpoint's bitmap (``qemu-img bitmap --add --enable``), record the
  images' (mtime, size) signature, and redefine the checkpoint in libvirt
  (``REDEFINE``: libvirt cannot create one on an inactive domain, and only
  validates bitmaps on a running one), its parent the newest checkpoint;
- transfer: read each image through a private read-only ``qemu-nbd``: every
  allocated extent (full) or the base bitmap's dirty extents (incremental),
  with the same resumable cursor as a pull backup;
- a start behind our back: qemu-img and qemu-nbd hold the image's lock, so
  QEMU cannot open an image while it is being changed or read; between two
  steps or disks, the domain state and the signature are checked before and
  after the copies, and a change rolls the backup back;
- rollback: the libvirt checkpoint is deleted (metadata only on a shut-off
  domain, whose bitmaps are then removed with ``qemu-img bitmap --remove``;
  by libvirt, bitmaps included, on a running one).
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..errors import CheckpointInconsistent, OperationFailed, StepFailed
from ..effects import OfflineImages
from ..hypervisor.backup_types import checkpoint_xml
from ..steps import StepContext

IN_USE = "in-use"  # a bitmap QEMU did not save cleanly (it crashed): its content is unknown
ENABLED = "auto"


def is_offline(ctx: StepContext) -> bool:
    return bool(ctx.data.get("offline"))


def _images(ctx: StepContext) -> OfflineImages:
    if ctx.fx.images is None:
        raise StepFailed("this worker cannot handle a shut-off domain's images (no image port)")
    return ctx.fx.images


def image_paths(ctx: StepContext) -> dict[str, str]:
    """target -> the disk's own (top) image, where its bitmaps live."""
    return {d["target"]: d["source"] for d in ctx.data["disks"]}


def signature(ctx: StepContext) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for path in image_paths(ctx).values():
        st = os.stat(path)
        out[path] = [st.st_mtime_ns, st.st_size]
    return out


def require_untouched(ctx: StepContext, when: str) -> None:
    """The domain is still shut off and no image changed since this backup's checkpoint was taken."""
    state = ctx.hv.domain_state(ctx.domain)
    if state != "shutoff":
        raise StepFailed(f"{ctx.domain} is {state} {when}: the offline backup is not of one instant")
    if signature(ctx) != ctx.data.get("offline_signature"):
        raise StepFailed(f"{ctx.domain} had its images written {when}: the offline backup is not of one instant")


def check_base_bitmaps(ctx: StepContext, base: str) -> None:
    """Each image holds the base checkpoint's bitmap, enabled and saved cleanly (else: not a base)."""
    images = _images(ctx)
    for target, path in image_paths(ctx).items():
        flags = images.bitmaps(path).get(base)
        if flags is None:
            raise CheckpointInconsistent(f"image {path} of {target} has no bitmap {base}")
        if IN_USE in flags or ENABLED not in flags:
            how = "not saved cleanly" if IN_USE in flags else "disabled"
            raise CheckpointInconsistent(f"bitmap {base} of {path} is {how}")


def begin(ctx: StepContext, name: str, base: str | None) -> None:
    """Bitmaps, then the libvirt checkpoint (its probe): a crash between the two adds nothing twice."""
    state = ctx.hv.domain_state(ctx.domain)
    if state != "shutoff":
        raise StepFailed(f"{ctx.domain} is {state}: it was started before its offline backup began")
    if base:
        check_base_bitmaps(ctx, base)
    images = _images(ctx)
    for target, path in image_paths(ctx).items():
        if name not in images.bitmaps(path):
            ctx.save("bitmap-add-intent", disk=target, image=path, bitmap=name)
            images.add_bitmap(path, name)
    ctx.data["offline_signature"] = signature(ctx)
    ctx.data["checkpoint_at"] = int(time.time())
    known = ctx.hv.list_checkpoints(ctx.domain)
    parent = max(known, key=lambda c: (c.created or 0, c.name)).name if known else None
    xml = checkpoint_xml(name, [d.target for d in ctx.hv.disks(ctx.domain)],
                         [d["target"] for d in ctx.data["disks"]], parent=parent, created=ctx.data["checkpoint_at"])
    ctx.save("checkpoint-redefine-intent", checkpoint=name, parent=parent)
    ctx.hv.checkpoint_redefine(ctx.domain, xml)


def undo_begin(ctx: StepContext, name: str) -> None:
    """Delete the checkpoint and its bitmaps, whatever the domain's state became."""
    state = ctx.hv.domain_state(ctx.domain)
    if ctx.hv.lookup_checkpoint(ctx.domain, name) is not None:
        ctx.save("checkpoint-delete-intent", checkpoint=name, metadata_only=state == "shutoff")
        ctx.hv.checkpoint_delete(ctx.domain, name, metadata_only=state == "shutoff")
        state = ctx.hv.domain_state(ctx.domain)
    images = _images(ctx)
    left: list[str] = []
    for target, path in image_paths(ctx).items():
        if not os.path.exists(path):
            continue
        try:
            present = name in images.bitmaps(path)
        except OperationFailed:
            present = True
        if not present:
            continue
        if state != "shutoff":
            left.append(path)  # QEMU holds the image; libvirt does not know the bitmap: it only costs space
            continue
        ctx.save("bitmap-remove-intent", disk=target, image=path, bitmap=name)
        images.remove_bitmap(path, name)
    if left:
        ctx.data["leftover_bitmaps"] = {"bitmap": name, "images": left}


def open_export(ctx: StepContext, target: str, dirty: bool) -> Any:
    base = (ctx.data.get("base") or {}).get("checkpoint") if dirty else None
    return _images(ctx).open_export(image_paths(ctx)[target], base)
