#!/bin/bash
# Destroy and undefine a test guest made by guest/make-guest.sh and remove
# its files (WORKDIR/NAME-*.qcow2, console and writer logs, NAME.xml).
#
# Usage: guest/destroy-guest.sh NAME [WORKDIR]
#   Without WORKDIR the folder of the domain's disks is used.
set -euo pipefail

[[ $# -ge 1 && $# -le 2 ]] || { sed -n '2,6s/^# \{0,1\}//p' "$0" >&2; exit 2; }
NAME=$1
WORKDIR=${2:-}
URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
virsh_() { virsh -q -c "$URI" "$@"; }

dirs=()
[[ -n "$WORKDIR" ]] && dirs+=("$WORKDIR")

if virsh_ dominfo "$NAME" >/dev/null 2>&1; then
    if [[ -z "$WORKDIR" ]]; then
        while read -r _type _device _target source; do
            [[ "$source" == /* ]] && dirs+=("$(dirname "$source")")
        done < <(virsh_ domblklist "$NAME" --details 2>/dev/null || true)
    fi
    state=$(virsh_ domstate "$NAME" 2>/dev/null || true)
    if [[ "$state" != "shut off" ]]; then
        virsh_ destroy "$NAME" >/dev/null 2>&1 || true
    fi
    virsh_ undefine "$NAME" --checkpoints-metadata --snapshots-metadata --managed-save >/dev/null 2>&1 \
        || virsh_ undefine "$NAME" >/dev/null
    echo "destroy-guest: undefined $NAME"
fi

if (( ${#dirs[@]} )); then
    for d in $(printf '%s\n' "${dirs[@]}" | sort -u); do
        [[ -d "$d" ]] || continue
        rm -f -- "$d/$NAME"-*.qcow2 "$d/$NAME-console.log" "$d/$NAME-writer.log" "$d/$NAME.xml"
    done
fi
