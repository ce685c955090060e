#!/usr/bin/env bash
# The whole test suite on real services, on a fresh Debian 12 machine as root:
# installs and starts what is missing (scripts/setup.sh), builds the tiny test
# guest, lints, then runs every test.  Real-service tests fail (never skip)
# here when a service is missing.  Extra arguments go to pytest.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
bash scripts/setup.sh
bash guest/build-guest.sh "${DOMCAPTURE_HOME:-/var/lib/domcapture}/guest"
export DOMCAPTURE_REQUIRE_REAL=1
export DOMCAPTURE_GUEST_DIR="${DOMCAPTURE_HOME:-/var/lib/domcapture}/guest"
echo "[test] ruff"
.venv/bin/ruff check workflows workers tests bench
echo "[test] import contracts (pyproject.toml [tool.importlinter])"
.venv/bin/lint-imports --no-cache
echo "[test] mypy"
.venv/bin/mypy workflows workers
.venv/bin/mypy tests
echo "[test] pytest"
# three test processes (pytest-xdist, a file to a process: some files share a domain across their tests in
# order): the real-service tests mostly wait on QEMU and libvirt, so three
# share two cores well; DOMCAPTURE_TEST_PROCESSES=0 runs them in this one process.  The tests marked
# exclusive (the chaos run restarts libvirtd) run alone afterwards.
rc=0
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -rfE -m "not exclusive" --dist loadfile \
    -n "${DOMCAPTURE_TEST_PROCESSES:-3}" "$@" || rc=$?
echo "[test] pytest, exclusive"
xrc=0
.venv/bin/python -m pytest -q -p no:cacheprovider -rfE -m exclusive "$@" || xrc=$?
[ "$xrc" -eq 5 ] && xrc=0  # 5: arguments that select none of them
[ "$rc" -eq 0 ] && rc=$xrc
exit "$rc"
