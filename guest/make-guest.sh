#!/bin/bash
# Create (and optionally start) a domcapture test guest.
#
# Usage: guest/make-guest.sh NAME WORKDIR [--data-mib N] [--interval SECONDS]
#                            [--guest-dir DIR] [--force] [--start]
#
# Creates WORKDIR/NAME-vda.qcow2 (32 MiB ext4), WORKDIR/NAME-vdb.qcow2 (data
# ext4, default 64 MiB) and WORKDIR/NAME.xml, and defines the domain. The
# kernel and initramfs come from guest/build-guest.sh (--guest-dir, default
# $DOMCAPTURE_GUEST_DIR or /var/lib/domcapture/guest). With --start the domain
# is started and the script waits (up to 120 s) for the guest agent.
set -euo pipefail

usage() { sed -n '2,12s/^# \{0,1\}//p' "$0" >&2; exit 2; }
die() { echo "make-guest: error: $*" >&2; exit 1; }

[[ $# -ge 2 ]] || usage
NAME=$1 WORKDIR=$2
shift 2
DATA_MIB=64
INTERVAL=0.05
GUEST_DIR=${DOMCAPTURE_GUEST_DIR:-/var/lib/domcapture/guest}
START=0
FORCE=0
AGENT_TIMEOUT=120
while [[ $# -gt 0 ]]; do
    case "$1" in
        --data-mib) DATA_MIB=$2; shift 2 ;;
        --interval) INTERVAL=$2; shift 2 ;;
        --guest-dir) GUEST_DIR=$2; shift 2 ;;
        --start) START=1; shift ;;
        --force) FORCE=1; shift ;;
        -h|--help) usage ;;
        *) die "unknown option $1" ;;
    esac
done
[[ "$NAME" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "bad domain name '$NAME'"
[[ "$DATA_MIB" =~ ^[0-9]+$ && "$DATA_MIB" -ge 8 ]] || die "--data-mib must be an integer >= 8"
[[ "$INTERVAL" =~ ^[0-9]*\.?[0-9]+$ ]] || die "--interval must be a number of seconds"

URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
virsh_() { virsh -q -c "$URI" "$@"; }

mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
GUEST_DIR=$(cd "$GUEST_DIR" 2>/dev/null && pwd) || die "no guest dir $GUEST_DIR (run guest/build-guest.sh)"
KERNEL=$GUEST_DIR/vmlinuz
INITRD=$GUEST_DIR/initrd.gz
[[ -s "$KERNEL" && -s "$INITRD" ]] || die "missing $KERNEL or $INITRD (run guest/build-guest.sh $GUEST_DIR)"
for t in qemu-img mkfs.ext4 virsh; do
    command -v "$t" >/dev/null || die "$t not found"
done

if virsh_ dominfo "$NAME" >/dev/null 2>&1; then
    die "domain $NAME already exists (guest/destroy-guest.sh $NAME $WORKDIR)"
fi

VDA=$WORKDIR/$NAME-vda.qcow2
VDB=$WORKDIR/$NAME-vdb.qcow2
XML=$WORKDIR/$NAME.xml
CONSOLE_LOG=$WORKDIR/$NAME-console.log
WRITER_LOG=$WORKDIR/$NAME-writer.log

make_disk() {  # make_disk FILE MIB LABEL
    local out=$1 mib=$2 label=$3 raw
    if [[ -e "$out" && $FORCE == 0 ]]; then
        die "$out exists (use --force to recreate)"
    fi
    raw=$(mktemp "$WORKDIR/.$NAME-$label.XXXXXX.raw")
    truncate -s "${mib}M" "$raw"
    mkfs.ext4 -q -F -L "$label" "$raw"
    qemu-img convert -q -f raw -O qcow2 -o compat=1.1 "$raw" "$out.tmp"
    rm -f "$raw"
    mv -f "$out.tmp" "$out"
}
make_disk "$VDA" 32 dcsys
make_disk "$VDB" "$DATA_MIB" dcdata
rm -f "$CONSOLE_LOG" "$WRITER_LOG"

# KVM only with real hardware virtualization; a software-nested /dev/kvm
# (kvm_pvm) boots a real kernel much slower than plain TCG.
DOMTYPE=qemu
if [[ -w /dev/kvm ]] && grep -qE '\b(vmx|svm)\b' /proc/cpuinfo && [[ ! -e /sys/module/kvm_pvm ]]; then
    DOMTYPE=kvm
fi

# cryptomgr.notests and the initcall blacklist skip self-tests that are slow
# under TCG; pci=noacpi uses the BIOS PIRQ table instead of evaluating the ACPI
# interrupt links (about 0.15 s per PCI device under TCG).
CMDLINE="console=ttyS0 quiet cryptomgr.notests initcall_blacklist=crypto_kdf108_init,init_kprobe_trace pci=noacpi dc.interval=$INTERVAL"

xml_escape() { sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' -e "s/'/\&apos;/g" <<<"$1"; }

cat > "$XML" <<XML
<domain type='$DOMTYPE'>
  <name>$NAME</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$(xml_escape "$KERNEL")</kernel>
    <initrd>$(xml_escape "$INITRD")</initrd>
    <cmdline>$CMDLINE</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$(xml_escape "$VDA")'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$(xml_escape "$VDB")'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='pty'>
      <log file='$(xml_escape "$CONSOLE_LOG")' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='file'>
      <source path='$(xml_escape "$WRITER_LOG")' append='on'/>
      <target type='virtio' name='org.domcapture.writer.0'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
XML

virsh_ define "$XML" >/dev/null
echo "make-guest: defined $NAME (type $DOMTYPE): $VDA $VDB"

[[ $START == 1 ]] || exit 0

ms() { echo $(( $(date +%s%N) / 1000000 )); }
t0=$(ms)
virsh_ start "$NAME" >/dev/null
t1=$(ms)
deadline=$(( t0 + AGENT_TIMEOUT * 1000 ))
until virsh_ qemu-agent-command "$NAME" '{"execute":"guest-ping"}' --timeout 2 >/dev/null 2>&1; do
    if (( $(ms) > deadline )); then
        echo "make-guest: no guest agent after ${AGENT_TIMEOUT} s; console log tail:" >&2
        tail -n 20 "$CONSOLE_LOG" >&2 || true
        exit 1
    fi
    sleep 0.1
done
t2=$(ms)
awk -v s=$((t1 - t0)) -v a=$((t2 - t0)) -v n="$NAME" \
    'BEGIN {printf "make-guest: started %s: virsh start %.2f s, boot to agent %.2f s\n", n, s / 1000, a / 1000}'
