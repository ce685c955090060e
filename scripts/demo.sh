#!/usr/bin/env bash
# The main job, end to end on a fresh Debian 12 machine (as root):
#   install and start what is missing (scripts/setup.sh), build the tiny guest,
#   create a throwaway VM whose disks hold known data, run a worker and the
#   recovery process, capture the VM with snapshot-backup, SIGKILL the worker
#   in the middle of the copy, watch recovery resume the workflow to success,
#   verify the backup, and print where it is.
#
# Environment: DOMCAPTURE_HOME (default /var/lib/domcapture), DEMO_KEEP_VM=1 to
# keep the VM afterwards.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
HOME_DIR=${DOMCAPTURE_HOME:-/var/lib/domcapture}
DEMO=$HOME_DIR/demo
VM=domcapture-demo
export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
export DOMCAPTURE_REDIS_URL=${DOMCAPTURE_REDIS_URL:-redis://127.0.0.1:6379/0}
export DOMCAPTURE_PREFIX=${DOMCAPTURE_PREFIX:-dc}
DC="$REPO/.venv/bin/domcapture"
PY="$REPO/.venv/bin/python"

say() { printf '\n== %s\n' "$*"; }
field() { "$PY" -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {'d': d}))" "$1"; }

bash "$REPO/scripts/setup.sh"
say "building the tiny guest (kernel + busybox + qemu-guest-agent)"
bash "$REPO/guest/build-guest.sh" "$HOME_DIR/guest"

say "creating the throwaway VM $VM in $DEMO"
bash "$REPO/guest/destroy-guest.sh" "$VM" "$DEMO" >/dev/null 2>&1 || true
rm -rf "$DEMO" && mkdir -p "$DEMO/backups" "$DEMO/logs"
bash "$REPO/guest/make-guest.sh" "$VM" "$DEMO" --guest-dir "$HOME_DIR/guest" --data-mib 64
# A third disk of known data: 48 MiB of random bytes, its checksum noted now.
head -c $((48 * 1024 * 1024)) /dev/urandom > "$DEMO/known.raw"
KNOWN_SHA=$(sha256sum "$DEMO/known.raw" | cut -d' ' -f1)
qemu-img convert -f raw -O qcow2 -o compat=1.1 "$DEMO/known.raw" "$DEMO/$VM-vdc.qcow2"
rm "$DEMO/known.raw"
virsh -q attach-disk "$VM" "$DEMO/$VM-vdc.qcow2" vdc --subdriver qcow2 --config
virsh -q start "$VM"
for _ in $(seq 1 240); do
    virsh -q qemu-agent-command "$VM" '{"execute":"guest-ping"}' >/dev/null 2>&1 && break
    sleep 0.5
done
echo "VM running; its guest agent answers; vdc holds known data sha256 $KNOWN_SHA"

say "starting a worker and the recovery process"
"$DC" worker > "$DEMO/logs/worker-1.log" 2>&1 &
WORKER1=$!
"$DC" recovery > "$DEMO/logs/recovery.log" 2>&1 &
RECOVERY=$!
WORKER2=""
cleanup() {
    kill "$RECOVERY" ${WORKER2:+"$WORKER2"} 2>/dev/null || true
    kill -9 "$WORKER1" 2>/dev/null || true
    if [ "${DEMO_KEEP_VM:-0}" != 1 ]; then
        virsh -q destroy "$VM" >/dev/null 2>&1 || true
        virsh -q undefine "$VM" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

say "submitting: domcapture submit snapshot-backup --domain $VM --target $DEMO/backups --quiesce try --bandwidth 12M"
ID=$("$DC" submit snapshot-backup --domain "$VM" --target "$DEMO/backups" --quiesce try --bandwidth 12M)
echo "workflow $ID"

say "waiting for the copy to pass 25%, then SIGKILL of the worker (pid $WORKER1)"
while :; do
    DOC=$("$DC" show "$ID" --json)
    STATE=$(echo "$DOC" | field 'd["state"]')
    PCT=$(echo "$DOC" | field 'd["progress"].get("percent", 0) if d["state"] == "copying" else 0')
    printf '\r  state %-14s copy %5.1f%%' "$STATE" "$PCT"
    if [ "$STATE" = copying ] && "$PY" -c "import sys; sys.exit(0 if float('$PCT') >= 25 else 1)"; then
        break
    fi
    case "$STATE" in cleaning|finalizing|succeeded|rolled_back) echo; echo "copy finished before the kill"; exit 1;; esac
    sleep 0.1
done
kill -9 "$WORKER1"
KILLED_AT=$(date +%s.%N)
echo; echo "worker killed at $PCT% of the copy; the guest keeps running on its overlays:"
virsh domblklist "$VM"

say "starting a new worker; the recovery process notices the dead lease and resumes"
"$DC" worker > "$DEMO/logs/worker-2.log" 2>&1 &
WORKER2=$!
"$DC" wait "$ID" --timeout 600 >/dev/null || { "$DC" show "$ID"; exit 1; }

DOC=$("$DC" show "$ID" --json)
echo "$DOC" > "$DEMO/workflow-$ID.json"
say "outcome"
"$DC" show "$ID" | sed -n '/^status:/,/^history:/p' | grep -v '^history:'
KILLED_AT=$KILLED_AT "$PY" - "$DEMO/workflow-$ID.json" <<'EOF_PY'
import json, os, sys
d = json.load(open(sys.argv[1]))
killed = float(os.environ["KILLED_AT"])
h = d["history"]
recovered = next(e["ts"] for e in h if e["event"] == "recovered")
resumed = next(e["ts"] for e in h if e["event"] == "resumed")
offsets = [f"{e['disk']}@{e['offset']}" for e in h if e["event"] == "copy-intent" and e["offset"]]
print(f"worker death -> recovered by the recovery process: {recovered - killed:.2f} s")
print(f"worker death -> running again on the new worker:   {resumed - killed:.2f} s")
print("copy resumed from the recorded cursor:", ", ".join(offsets) or "none")
data, result = d["data"], d["result"]
print(f"snapshot duration: {data.get('snapshot_seconds')} s; guest frozen (freeze -> thaw): "
      f"{data.get('downtime_s')} s; quiesced: {result['quiesced']}")
EOF_PY
say "the domain is back on its original disks, no block job"
virsh domblklist "$VM"
for t in vda vdb vdc; do virsh blockjob "$VM" "$t" --info; done
ls "$DEMO" | grep -c overlay | sed 's/^/overlay files left beside the disks: /' || true

say "verifying the backup"
"$DC" verify "$ID"
BACKUP_DIR=$(echo "$DOC" | field 'd["result"]["backup_dir"]')
qemu-img convert -O raw "$BACKUP_DIR/vdc.qcow2" "$DEMO/vdc-check.raw"
GOT=$(sha256sum "$DEMO/vdc-check.raw" | cut -d' ' -f1); rm "$DEMO/vdc-check.raw"
[ "$GOT" = "$KNOWN_SHA" ] && echo "vdc in the backup holds exactly the known data (sha256 $GOT)" \
    || { echo "vdc differs: $GOT != $KNOWN_SHA"; exit 1; }
qemu-img convert -O raw "$BACKUP_DIR/vdb.qcow2" "$DEMO/vdb-check.raw"
if e2fsck -fn "$DEMO/vdb-check.raw" >/dev/null 2>&1; then echo "vdb in the backup: e2fsck -fn clean"; else echo "vdb in the backup: journal to replay (crash-consistent)"; e2fsck -fy "$DEMO/vdb-check.raw" >/dev/null 2>&1 || true; fi
debugfs -R 'cat /counter.log' "$DEMO/vdb-check.raw" 2>/dev/null | "$PY" -c '
import sys
n = [int(l.split()[0]) for l in sys.stdin if l.strip()]
ok = n == list(range(1, len(n) + 1))
print(f"guest writer log in the backup: {len(n)} lines, gapless 1..{len(n)}: {ok}")
sys.exit(0 if ok else 1)'
rm -f "$DEMO/vdb-check.raw"

say "done: the backup is in $BACKUP_DIR"
ls -l "$BACKUP_DIR"
