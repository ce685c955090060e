#!/usr/bin/env bash
# Install and start everything domcapture needs on a fresh Debian 12 machine,
# as root, without systemd: Debian packages, a virtualenv with the project,
# redis-server with persistence, virtlogd + libvirtd.  Idempotent: a second run
# only starts what is not running.
#
# Environment:
#   DOMCAPTURE_HOME   state directory (default /var/lib/domcapture)
#   DOMCAPTURE_VENV   virtualenv (default <repo>/.venv)
#   DOMCAPTURE_REDIS_PORT  port of the redis-server started here (default 6379)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
HOME_DIR=${DOMCAPTURE_HOME:-/var/lib/domcapture}
VENV=${DOMCAPTURE_VENV:-$REPO/.venv}
REDIS_PORT=${DOMCAPTURE_REDIS_PORT:-6379}

log() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: must run as root (it installs packages and starts libvirtd)" >&2
    exit 2
fi

PKGS=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
      qemu-system-x86 qemu-utils libvirt-dev pkg-config gcc
      redis-server redis-sentinel redis-tools python3-venv python3-dev python3-libnbd
      libnbd-bin nbdkit e2fsprogs cpio gzip busybox-static procps util-linux-extra
      qemu-system-common mount
      chromium systemd prometheus openssl ovmf swtpm swtpm-tools)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Python environment -------------------------------------------------
# The system interpreter, so Debian's libnbd binding (module `nbd`) imports.
if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
if ! "$VENV/bin/python" -c 'import workflows, workers, libvirt, transitions, rq, redis, pytest, starlette, prometheus_client, playwright, mypy' 2>/dev/null; then
    log "installing domcapture into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e "$REPO[test]"
fi

# --- libvirtd ------------------------------------------------------------
getent group kvm >/dev/null || groupadd -r kvm
# libvirtd resolves its built-in default user and group before reading qemu.conf
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
id libvirt-qemu >/dev/null 2>&1 || useradd -r -g kvm -s /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt /var/lib/libvirt/images /run/libvirt "$HOME_DIR"
QCONF=/etc/libvirt/qemu.conf
if ! grep -q '^# domcapture' "$QCONF" 2>/dev/null; then
    log "writing $QCONF"
    cat > "$QCONF" <<'EOF'
# domcapture: run QEMU as root without a security driver (no systemd here)
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
remember_owner = 0
swtpm_user = "root"
swtpm_group = "root"
EOF
fi
pgrep -x virtlogd >/dev/null || { log "starting virtlogd"; /usr/sbin/virtlogd -d; }
if ! pgrep -x libvirtd >/dev/null; then
    log "starting libvirtd"
    /usr/sbin/libvirtd -d
fi
for _ in $(seq 1 50); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.2
done
virsh -c qemu:///system version >/dev/null || { echo "setup.sh: libvirtd did not answer" >&2; exit 1; }

# --- redis-server with persistence ---------------------------------------
# appendonly + appendfsync always: an acknowledged record write survives a
# SIGKILL of redis-server (the workflow store depends on it).
if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    log "starting redis-server on port $REDIS_PORT (AOF, fsync always) in $HOME_DIR/redis"
    mkdir -p "$HOME_DIR/redis"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$HOME_DIR/redis" \
        --appendonly yes --appendfsync always --save 60 1 \
        --daemonize yes --logfile "$HOME_DIR/redis/redis.log" \
        --pidfile "$HOME_DIR/redis/redis.pid"
    for _ in $(seq 1 50); do
        redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
fi
redis-cli -p "$REDIS_PORT" ping >/dev/null || { echo "setup.sh: redis-server did not answer" >&2; exit 1; }
log "ready: redis on 127.0.0.1:$REDIS_PORT, libvirtd at qemu:///system, venv $VENV"
