#!/bin/bash
# Build the domcapture test guest: a Debian cloud kernel plus a busybox
# initramfs running qemu-guest-agent and a counter writer.
#
# Usage: guest/build-guest.sh [CACHE_DIR]
#   CACHE_DIR defaults to $DOMCAPTURE_GUEST_DIR or /var/lib/domcapture/guest.
# Outputs: CACHE_DIR/vmlinuz, CACHE_DIR/initrd.gz (and CACHE_DIR/debs/*.deb).
# Nothing is installed on the host except missing build tools.
set -euo pipefail

START_NS=$(date +%s%N)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
ROOTFS_SRC="$HERE/rootfs"
CACHE_DIR=${1:-${DOMCAPTURE_GUEST_DIR:-/var/lib/domcapture/guest}}
DEB_DIR="$CACHE_DIR/debs"

KERNEL_META=linux-image-cloud-amd64
# Loaded by the guest's rcS in this order.
MODULES=(
    drivers/virtio/virtio_ring
    drivers/virtio/virtio
    drivers/virtio/virtio_pci_legacy_dev
    drivers/virtio/virtio_pci_modern_dev
    drivers/virtio/virtio_pci
    drivers/block/virtio_blk
    drivers/char/virtio_console
    drivers/acpi/button
    drivers/input/evdev
)

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }
elapsed() { echo "$(( ($(date +%s%N) - START_NS) / 1000000 ))" | awk '{printf "%.2f", $1 / 1000}'; }

mkdir -p "$CACHE_DIR" "$DEB_DIR"
CACHE_DIR=$(cd "$CACHE_DIR" && pwd)
DEB_DIR="$CACHE_DIR/debs"

# --- up to date? ------------------------------------------------------------
if [[ -s "$CACHE_DIR/vmlinuz" && -s "$CACHE_DIR/initrd.gz" ]]; then
    newer=$(find "$SELF" "$ROOTFS_SRC" -newer "$CACHE_DIR/initrd.gz" -print -quit)
    if [[ -z "$newer" && ! "$SELF" -nt "$CACHE_DIR/vmlinuz" ]]; then
        echo "build-guest: up to date: $CACHE_DIR/vmlinuz $CACHE_DIR/initrd.gz ($(elapsed) s)"
        exit 0
    fi
fi

# --- host tools ---------------------------------------------------------------
APT_UPDATED=0
apt_update() {
    if [[ $APT_UPDATED == 0 ]]; then
        log "apt-get update"
        apt-get update -qq >&2
        APT_UPDATED=1
    fi
}
need_tools=()
for t in cpio:cpio gzip:gzip dpkg-deb:dpkg ldd:libc-bin tar:tar find:findutils; do
    command -v "${t%%:*}" >/dev/null 2>&1 || need_tools+=("${t#*:}")
done
if (( ${#need_tools[@]} )); then
    log "installing host tools: ${need_tools[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${need_tools[@]}" >&2 \
        || { apt_update; apt-get install -y -qq --no-install-recommends "${need_tools[@]}" >&2; }
fi

# --- download the .debs -------------------------------------------------------
apt_download() {
    # apt-get download into DEB_DIR; retry once after apt-get update.
    ( cd "$DEB_DIR" && apt-get download -q -o APT::Sandbox::User=root "$@" >&2 ) && return 0
    apt_update
    ( cd "$DEB_DIR" && apt-get download -q -o APT::Sandbox::User=root "$@" >&2 )
}
newest_deb() {
    # newest cached .deb whose name matches the glob pattern $1
    local f best="" bestv=""
    shopt -s nullglob
    for f in "$DEB_DIR"/$1_*.deb; do
        local v
        v=$(dpkg-deb -f "$f" Version)
        if [[ -z "$best" ]] || dpkg --compare-versions "$v" gt "$bestv"; then
            best=$f bestv=$v
        fi
    done
    shopt -u nullglob
    echo "$best"
}
resolve_kernel_pkg() {
    apt-cache depends "$KERNEL_META" 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}'
}

missing=()
if [[ -z "$(newest_deb 'linux-image-[0-9]*-cloud-amd64')" ]]; then
    kpkg=$(resolve_kernel_pkg)
    if [[ -z "$kpkg" ]]; then
        apt_update
        kpkg=$(resolve_kernel_pkg)
    fi
    [[ -n "$kpkg" ]] || die "cannot resolve $KERNEL_META to a kernel package"
    missing+=("$kpkg")
fi
for pkg in busybox-static qemu-guest-agent; do
    [[ -n "$(newest_deb "$pkg")" ]] || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
    log "downloading ${missing[*]}"
    apt_download "${missing[@]}"
fi
KERNEL_DEB=$(newest_deb 'linux-image-[0-9]*-cloud-amd64')
BUSYBOX_DEB=$(newest_deb busybox-static)
QGA_DEB=$(newest_deb qemu-guest-agent)
for d in "$KERNEL_DEB" "$BUSYBOX_DEB" "$QGA_DEB"; do
    [[ -s "$d" ]] || die "missing .deb in $DEB_DIR"
done

# --- extract --------------------------------------------------------------------
EXTRACT="$CACHE_DIR/extract"
ROOT="$CACHE_DIR/rootfs.tmp"
rm -rf "$EXTRACT" "$ROOT"
mkdir -p "$EXTRACT" "$ROOT"
trap 'rm -rf "$EXTRACT" "$ROOT" "$CACHE_DIR/vmlinuz.tmp" "$CACHE_DIR/initrd.gz.tmp"' EXIT

# Only the kernel image and the few modules we need from the 27 MB kernel .deb.
members=('./boot/vmlinuz-*')
for m in "${MODULES[@]}"; do
    members+=("./lib/modules/*/kernel/$m.ko")
done
dpkg-deb --fsys-tarfile "$KERNEL_DEB" | tar -x -C "$EXTRACT" --wildcards "${members[@]}"
dpkg-deb -x "$BUSYBOX_DEB" "$EXTRACT"
dpkg-deb -x "$QGA_DEB" "$EXTRACT"

VMLINUZ=$(ls "$EXTRACT"/boot/vmlinuz-* | head -n1)
KVER=${VMLINUZ##*/vmlinuz-}
log "kernel $KVER"

# --- assemble the initramfs -------------------------------------------------------
cd "$ROOT"
mkdir -p bin sbin usr/bin usr/sbin etc lib/modules/"$KVER" lib64 \
         proc sys dev run tmp root mnt var/log
ln -s ../run var/run
chmod 1777 tmp
mknod -m 600 dev/console c 5 1
mknod -m 666 dev/null c 1 3

# busybox and its applet links
install -m 0755 "$EXTRACT/bin/busybox" bin/busybox
for applet in $(bin/busybox --list-full); do
    case "$applet" in
        bin/busybox) continue ;;
        */*/*) ln -s ../../bin/busybox "$applet" ;;
        */*) ln -s ../bin/busybox "$applet" ;;
        *) ln -s bin/busybox "$applet" ;;
    esac
done
ln -s bin/busybox init

# kernel modules, flat, plus their load order
: > etc/modules
for m in "${MODULES[@]}"; do
    src=$(ls "$EXTRACT"/lib/modules/"$KVER"/kernel/"$m".ko)
    install -m 0644 "$src" lib/modules/"$KVER"/
    echo "${m##*/}" >> etc/modules
done

# qemu-ga and the host's copies of its shared libraries (same paths)
install -m 0755 "$EXTRACT/usr/sbin/qemu-ga" usr/sbin/qemu-ga
ldd_out=$(ldd "$EXTRACT/usr/sbin/qemu-ga")
if grep -q 'not found' <<<"$ldd_out"; then
    log "qemu-ga libraries missing on the host, installing its dependencies"
    deps=$(dpkg-deb -f "$QGA_DEB" Depends | tr ',' '\n' | sed -E 's/\(.*\)//; s/\|.*//; s/[[:space:]]//g' | grep -v '^$')
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $deps >&2 \
        || { apt_update; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $deps >&2; }
    ldd_out=$(ldd "$EXTRACT/usr/sbin/qemu-ga")
    ! grep -q 'not found' <<<"$ldd_out" || die "qemu-ga: $(grep 'not found' <<<"$ldd_out")"
fi
awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]+ \(/ {print $1}' <<<"$ldd_out" | while read -r lib; do
    mkdir -p ".${lib%/*}"
    cp -L "$lib" ".$lib"
done

# the guest's own init files
cp -R --remove-destination "$ROOTFS_SRC"/. .
chmod 0755 etc/init.d/* sbin/* etc/acpi/PWRF/*
echo "$KVER" > etc/kernel-version

# fixed owners (cpio -R), order and times: the same inputs give the same image
find . -exec touch -h -d "@${SOURCE_DATE_EPOCH:-0}" {} +
find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet | gzip -6n > "$CACHE_DIR/initrd.gz.tmp"
cd /
cp "$VMLINUZ" "$CACHE_DIR/vmlinuz.tmp"
mv "$CACHE_DIR/vmlinuz.tmp" "$CACHE_DIR/vmlinuz"
mv "$CACHE_DIR/initrd.gz.tmp" "$CACHE_DIR/initrd.gz"
echo "$KVER" > "$CACHE_DIR/kernel-version"

echo "build-guest: built $CACHE_DIR/vmlinuz ($(stat -c %s "$CACHE_DIR/vmlinuz") B)" \
    "$CACHE_DIR/initrd.gz ($(stat -c %s "$CACHE_DIR/initrd.gz") B) in $(elapsed) s"
