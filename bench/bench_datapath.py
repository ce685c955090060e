"""The data path against the hardware's own tools, side by side in one run on one domain.

One no-OS QEMU domain (tests/realenv.py ``DiskDomain``) with one qcow2 disk
of ``--disk-mib`` holding ``--data-mib`` of data.  Each job below runs once,
after the host's page cache is dropped (``echo 3 > /proc/sys/vm/drop_caches``;
without the permission to do so the bench says so and goes on), and each of
ours is printed as a ratio to its baseline:

| ours (``domcapture submit ... --wait``)      | baseline                                        |
| -------------------------------------------- | ----------------------------------------------- |
| snapshot-backup --quiesce off                | qemu-img convert -U -m 8 -W -O qcow2            |
| direct-backup --mode push                    | bare push job (virsh backup-begin), polled      |
| direct-backup --mode pull (full)             | nbdcopy from a bare pull export into qcow2,     |
|                                              | into raw; virtnbdbackup -l copy (if given)      |
| direct-backup --mode pull --incremental      | the full pull above (nothing changed, 1 %, 10 %)|

Ours run through the real stack: a ``domcapture worker`` on a private Redis
prefix and queue (started fresh before each job, so its peak RSS is that
job's), the CLI submitting and waiting.  Besides the time the table shows
the growth of the host's page cache (``Cached`` in /proc/meminfo) over the
job, as a share of the bytes copied, and the peak RSS of the job's process
tree (sampled every 50 ms; for ours the worker and its children).

Usage (root; qemu:///system, Redis):
  PYTHONPATH=$PWD .venv/bin/python bench/bench_datapath.py [--disk-mib 2048] [--data-mib 1024]
      [--virtnbdbackup /path/to/virtnbdbackup/checkout] [--workdir /var/tmp] [--json out.json]
      [--repeat N] [--keep] [--only snapshot,push,pull,incremental,options]
The issue's figures used --disk-mib 4096 --data-mib 2048.  ``--repeat N`` runs the
snapshot, push and pull groups N times, each group's jobs in turn, and shows the
median with the spread; ``--keep`` keeps the work folder with the workers' logs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.realenv import DiskDomain, WorkerCluster  # noqa: E402

MIB = 1024 * 1024


# -- measuring -----------------------------------------------------------------------------------
def cached_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


def drop_caches() -> str:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        return "none (no permission to write /proc/sys/vm/drop_caches)"


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Peak of the summed RSS of a process tree, sampled every 50 ms."""

    def __init__(self, roots: Callable[[], list[int]]) -> None:
        self.roots, self.peak = roots, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            kids = _children()
            todo, total = list(self.roots()), 0
            seen: set[int] = set()
            while todo:
                pid = todo.pop()
                if pid in seen:
                    continue
                seen.add(pid)
                total += _rss(pid)
                todo.extend(kids.get(pid, []))
            self.peak = max(self.peak, total)
            self._stop.wait(0.05)

    def __enter__(self) -> "RssSampler":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def resident(path: str) -> int:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", path], capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else 0


SOURCE: list[str] = []  # the domain's disk image: QEMU reads it through the host's cache (its own cache mode)


def measure(name: str, fn: Callable[[], Any], roots: Callable[[], list[int]], copied: int,
            warm: Callable[[], object] | None = None) -> dict[str, Any]:
    drop_caches()
    if warm is not None:  # read the CLI's own Python modules back into the cache, as on any used host
        warm()
    c0 = cached_bytes()
    with RssSampler(roots) as rss:
        t0 = time.perf_counter()
        extra = fn()
        seconds = time.perf_counter() - t0
    grown = cached_bytes() - c0
    source = sum(resident(p) for p in SOURCE)
    row = {"job": name, "seconds": round(seconds, 3), "cache_growth": grown, "copied": copied,
           "cache_share": round(grown / copied, 3) if copied else None, "peak_rss": rss.peak,
           "source_cached": source,
           "other_share": round((grown - source) / copied, 3) if copied else None}
    if isinstance(extra, dict):
        after = extra.pop("_after", None)
        row.update(extra)
        if after is not None:
            row.update(after())
    print(f"  {name}: {seconds:.2f} s, page cache {grown / MIB:+.0f} MiB ({source / MIB:.0f} MiB of it the disk "
          f"image), peak RSS {rss.peak / MIB:.0f} MiB"
          + (f", engine {row['engine_seconds']:.2f} s: {row['states']}" if "states" in row else "")
          + (f"; in transferring: {row['transfer_events']}" if row.get("transfer_events") else ""),
          file=sys.stderr, flush=True)
    return row


# -- baselines -----------------------------------------------------------------------------------
class Proc:
    """A child process whose pid the RSS sampler follows."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def run(self, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
        self.pids = [p.pid]
        out, err = p.communicate(timeout=3600)
        self.pids = []
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} exited {p.returncode}: {err.strip()[-500:]}")
        return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


PUSH_READ = "bare push job, fsync, then one read of its file from the disk (dd, O_DIRECT)"
PUSH_SHA = "bare push job, then sha256 of its file from the page cache (openssl)"


def read_direct(path: Path) -> None:
    """The least any proof of a file's bytes costs once they left the cache: one read at the disk's speed."""
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=8M", "iflag=direct", "status=none"], check=True)


def sha256_cached(path: Path) -> None:
    """sha256 at the CPU's speed (OpenSSL uses SHA-NI; coreutils' sha256sum does not, and is 7× slower)."""
    subprocess.run(["openssl", "dgst", "-sha256", str(path)], check=True, stdout=subprocess.DEVNULL)


def libvirt_dom(uri: str, name: str) -> Any:
    import libvirt
    return libvirt.open(uri).lookupByName(name)


def wait_job_gone(dom: Any, interval: float = 0.02) -> None:
    import libvirt
    while dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
        time.sleep(interval)
    done = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    if done.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED:
        raise RuntimeError(f"the bare backup job did not complete: {done}")


def bare_push(dom: Any, disk: str, out: str) -> None:
    xml = (f"<domainbackup mode='push'><disks><disk name='{disk}' type='file'><target file='{out}'/>"
           "<driver type='qcow2'/></disk></disks></domainbackup>")
    dom.backupBegin(xml, None, 0)
    wait_job_gone(dom)


def bare_pull_begin(dom: Any, disk: str, socket: str, scratch: str) -> None:
    xml = (f"<domainbackup mode='pull'><server transport='unix' socket='{socket}'/><disks>"
           f"<disk name='{disk}' backup='yes' type='file'><scratch file='{scratch}'/></disk>"
           "</disks></domainbackup>")
    dom.backupBegin(xml, None, 0)


def bare_pull_end(dom: Any) -> None:
    import libvirt
    try:
        dom.abortJob()
    except libvirt.libvirtError:
        pass
    while dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
        time.sleep(0.02)


# -- ours ----------------------------------------------------------------------------------------
class Ours:
    def __init__(self, redis_url: str, uri: str, logdir: Path) -> None:
        self.prefix = f"dcbench-{uuid.uuid4().hex[:6]}"
        self.cluster = WorkerCluster(redis_url, uri, self.prefix, logdir, lease_ttl=10.0)
        self.cluster.env["PYTHONPATH"] = str(REPO)
        self.worker: subprocess.Popen[bytes] | None = None

    def fresh_worker(self) -> None:
        if self.worker is not None:
            self.cluster.kill(self.worker)
        self.worker = self.cluster.start_worker()
        log = self.cluster.logdir / f"{self.cluster._n:02d}-worker.log"
        deadline = time.time() + 60
        while "Listening on" not in (log.read_text() if log.exists() else ""):
            if time.time() > deadline or self.worker.poll() is not None:
                raise RuntimeError(f"the worker did not start: {log.read_text() if log.exists() else ''}")
            time.sleep(0.05)

    def warm(self) -> None:
        self.cluster.cli("list", "--json")

    def pids(self) -> list[int]:
        return [self.worker.pid] if self.worker and self.worker.poll() is None else []

    def submit(self, strategy: str, domain: str, *args: str) -> dict[str, Any]:
        out = self.cluster.cli("submit", strategy, "--domain", domain, *args, "--wait", "--json", check=False)
        doc = json.loads(out.stdout) if out.stdout.strip() else {}
        if out.returncode != 0 or doc.get("status") != "succeeded":
            raise RuntimeError(f"{strategy} did not succeed: {doc.get('status')} {doc.get('error')} "
                               f"{out.stderr[-500:]}")
        result = doc.get("result") or {}
        return {"engine_seconds": round(doc["updated_at"] - doc["created_at"], 3),
                "bytes_read": result.get("bytes_read"), "result": result,
                # read once the clock stopped (each is a CLI run of its own)
                "_after": lambda: {"states": self.state_times(doc["id"]),
                                   "transfer_events": self.event_times(doc["id"], "transferring")}}

    def state_times(self, wf_id: str) -> dict[str, float]:
        """Seconds spent in each state, from the record's history (where the engine's time goes)."""
        history = self.cluster.show(wf_id)["history"]
        out: dict[str, float] = {}
        for ev, nxt in zip(history, history[1:], strict=False):
            out[ev["state"]] = round(out.get(ev["state"], 0.0) + nxt["ts"] - ev["ts"], 3)
        return out

    def event_times(self, wf_id: str, state: str) -> list[tuple[str, float]]:
        """The events recorded inside ``state``, each with the seconds since the one before it."""
        history = self.cluster.show(wf_id)["history"]
        out: list[tuple[str, float]] = []
        prev: float | None = None
        for ev in history:
            if ev["state"] != state:
                continue
            if prev is not None:
                out.append((str(ev.get("event") or ev.get("trigger") or "?"), round(ev["ts"] - prev, 3)))
            prev = ev["ts"]
        return out

    def cleanup(self, redis_url: str) -> None:
        self.cluster.stop()
        import redis
        r = redis.Redis.from_url(redis_url)
        for key in r.scan_iter(f"{self.prefix}*"):
            r.delete(key)


# -- the run ---------------------------------------------------------------------------------------
def guest_change(dom: DiskDomain, disk: str, disk_mib: int, percent: float, pattern: int) -> int:
    """Overwrite ``percent`` of the disk through QEMU, in pieces spread over the whole disk."""
    total = max(1, int(disk_mib * percent / 100))
    piece = max(1, total // 16)
    count = max(1, total // piece)
    stride = disk_mib // count
    for i in range(count):
        dom.guest_write(disk, pattern, i * stride, piece)
    return count * piece * MIB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--disk-mib", type=int, default=2048)
    ap.add_argument("--data-mib", type=int, default=1024)
    ap.add_argument("--uri", default="qemu:///system")
    ap.add_argument("--redis-url", default=os.environ.get("DOMCAPTURE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--virtnbdbackup", help="a checkout of virtnbdbackup to run its copy mode from")
    ap.add_argument("--virtnbdbackup-pythonpath", default="",
                    help="extra PYTHONPATH for virtnbdbackup's dependencies")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each full job (and its baselines, in turn) this many times; the median is shown")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (images, backups, workers' logs)")
    ap.add_argument("--report", metavar="JSON", help="only print the table of a run saved with --json")
    ap.add_argument("--only", default=",".join(GROUPS),
                    help=f"comma-separated groups to run, of {', '.join(GROUPS)} (default: all; "
                         "incremental needs pull)")
    args = ap.parse_args()
    if args.report:
        return reprint(args.report)
    if not 4 <= args.data_mib < args.disk_mib:
        print("bench_datapath: --data-mib must be at least 4 and below --disk-mib", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("bench_datapath: --repeat must be at least 1", file=sys.stderr)
        return 2
    only = {g.strip() for g in args.only.split(",") if g.strip()}
    if not only or only - set(GROUPS) or ("incremental" in only and "pull" not in only):
        print(f"bench_datapath: --only takes groups of {', '.join(GROUPS)} (incremental with pull)",
              file=sys.stderr)
        return 2

    # the CLI's and the worker's modules byte-compiled, as an installed package is (pip compiles at install):
    # without it, under PYTHONDONTWRITEBYTECODE, every CLI start compiles them again (about 1 s of CPU here)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "workflows"), str(REPO / "workers")],
                   check=True, stdout=subprocess.DEVNULL)
    work = Path(tempfile.mkdtemp(prefix="dcbench-", dir=args.workdir))
    dom: DiskDomain | None = None
    ours = Ours(args.redis_url, args.uri, work / "logs")
    rows: list[dict[str, Any]] = []
    proc = Proc()
    baseline_pids = lambda: proc.pids  # noqa: E731
    cache_mode = drop_caches()
    try:
        print(f"creating a {args.disk_mib} MiB qcow2 holding {args.data_mib} MiB ...", file=sys.stderr, flush=True)
        fill = args.data_mib // 4
        dom = DiskDomain.create(args.uri, work / "dom", sizes_mib={"vda": args.disk_mib}, fill_mib=fill,
                                random_mib=args.data_mib - fill - 1)
        disk, image = "vda", str(dom.disks["vda"])
        SOURCE.append(image)
        data = args.data_mib * MIB
        vdom = libvirt_dom(args.uri, dom.name)
        out = work / "out"
        for sub in ("pull", *(f"{kind}{i}" for kind in ("sb", "push") for i in range(args.repeat))):
            (out / sub).mkdir(parents=True)

        # snapshot-backup vs qemu-img convert
        if "snapshot" in only:
            snapshot_group(rows, proc, ours, dom, image, out, data, baseline_pids, args.repeat)
        if "push" in only:
            push_group(rows, ours, dom, vdom, disk, out, data, args.repeat)
        if "pull" in only:
            pull_group(rows, proc, ours, dom, vdom, disk, out, data, work, args, baseline_pids)
        if "incremental" in only:
            incremental_group(rows, ours, dom, disk, out, args)
        if "options" in only:
            options_group(rows, ours, dom, out, data, work)
    finally:
        ours.cleanup(args.redis_url)
        if dom is not None:
            dom.destroy()
        if args.keep:
            print(f"kept {work} (the workers' logs in {work / 'logs'})", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    report(rows, args, cache_mode)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cache": cache_mode, "rows": rows}, f, indent=1, default=str)
    return 0


GROUPS = ("snapshot", "push", "pull", "incremental", "options")
Row = dict[str, Any]


def median_rows(runs: list[Row]) -> Row:
    """Rows of one job run several times: the median run's row, with every run's time beside it."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    row = dict(ordered[len(ordered) // 2])
    if len(runs) > 1:
        row["runs"] = [r["seconds"] for r in ordered]
        if all(r.get("engine_seconds") is not None for r in runs):
            row["engine_runs"] = sorted(r["engine_seconds"] for r in runs)
    return row


def interleaved(rows: list[Row], repeat: int, jobs: list[tuple[str, Callable[[int], Row]]]) -> None:
    """Run ``jobs`` in turn ``repeat`` times (a baseline and ours see the same disk's moods), add medians."""
    runs: dict[str, list[Row]] = {name: [] for name, _ in jobs}
    for i in range(repeat):
        for name, job in jobs:
            runs[name].append(job(i))
    rows.extend(median_rows(runs[name]) for name, _ in jobs)


def baseline_job(name: str, run: Callable[[], object], made: Path, roots: Callable[[], list[int]], data: int,
                 then_fsync: bool, then: Callable[[Path], object] | None = None) -> Callable[[int], Row]:
    """One baseline run (the file it makes fsynced after it, when ``then_fsync``; then ``then(file)``),
    its file removed after."""
    def work() -> None:
        run()
        if then_fsync:
            fsync(made)
        if then is not None:
            then(made)

    def job(_i: int) -> Row:
        row = measure(name, work, roots, data)
        os.unlink(made)
        return row
    return job


def snapshot_group(rows: list[Row], proc: Proc, ours: Ours, dom: DiskDomain, image: str, out: Path, data: int,
                   baseline_pids: Callable[[], list[int]], repeat: int) -> None:
    copy = out / "convert.qcow2"

    def convert() -> object:
        return proc.run(["qemu-img", "convert", "-U", "-m", "8", "-W", "-O", "qcow2", image, str(copy)])

    def snapshot_backup(i: int) -> Row:
        ours.fresh_worker()
        return measure("domcapture snapshot-backup --quiesce off",
                       lambda: ours.submit("snapshot-backup", dom.name, "--target", str(out / f"sb{i}"),
                                           "--quiesce", "off"), ours.pids, os.path.getsize(image), ours.warm)
    interleaved(rows, repeat, [
        ("convert", baseline_job("qemu-img convert -U -m 8 -W -O qcow2", convert, copy, baseline_pids, data,
                                 False)),
        ("convert+fsync", baseline_job("qemu-img convert, then fsync of the copy", convert, copy, baseline_pids,
                                       data, True)),
        ("ours", snapshot_backup)])


def push_group(rows: list[Row], ours: Ours, dom: DiskDomain, vdom: Any, disk: str, out: Path, data: int,
               repeat: int) -> None:
    target = out / "push.qcow2"

    def push(i: int) -> Row:
        ours.fresh_worker()
        return measure("domcapture direct-backup --mode push",
                       lambda: ours.submit("direct-backup", dom.name, "--target", str(out / f"push{i}"),
                                           "--mode", "push", "--quiesce", "off"), ours.pids, data, ours.warm)
    interleaved(rows, repeat, [
        ("bare", baseline_job("bare push job (backup-begin, polled)", lambda: bare_push(vdom, disk, str(target)),
                              target, lambda: [], data, False)),
        ("bare+fsync", baseline_job("bare push job, then fsync of its file",
                                    lambda: bare_push(vdom, disk, str(target)), target, lambda: [], data, True)),
        # what any proof of the bytes QEMU wrote costs: one read of the file, from the disk when the
        # backup must not stay in the host's page cache, from the cache when it may
        ("bare+fsync+read", baseline_job(
            PUSH_READ, lambda: bare_push(vdom, disk, str(target)), target, lambda: [], data, True,
            lambda f: (drop_file_cache(f), read_direct(f)))),
        ("bare+sha256", baseline_job(
            PUSH_SHA, lambda: bare_push(vdom, disk, str(target)), target, lambda: [], data, False, sha256_cached)),
        ("ours", push)])


def pull_group(rows: list[Row], proc: Proc, ours: Ours, dom: DiskDomain, vdom: Any, disk: str, out: Path,
               data: int, work: Path, args: argparse.Namespace, baseline_pids: Callable[[], list[int]]) -> None:
    runs: dict[str, list[Row]] = {}

    def add(row: Row) -> None:
        runs.setdefault(row["job"], []).append(row)

    def one_round(i: int) -> None:
            # baselines: one bare export, nbdcopy into qcow2 and raw, each also made durable
            sock, scratch = str(work / "bare.sock"), str(work / "bare.scratch")
            bare_pull_begin(vdom, disk, sock, scratch)
            try:
                url = f"nbd+unix:///{disk}?socket={sock}"
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(out / "nbdcopy.qcow2"),
                                str(args.disk_mib * MIB)], check=True)
                add(measure("nbdcopy bare pull export -> qcow2 (qemu-nbd)",
                            lambda: proc.run(["nbdcopy", url, "--", "[", "qemu-nbd", "-f", "qcow2",
                                              str(out / "nbdcopy.qcow2"), "]"]), baseline_pids, data))
                os.unlink(out / "nbdcopy.qcow2")
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(out / "nbdcopy.qcow2"),
                                str(args.disk_mib * MIB)], check=True)
                add(measure("nbdcopy bare pull export -> qcow2, flushed (--flush)",
                            lambda: proc.run(["nbdcopy", "--flush", url, "--", "[", "qemu-nbd", "-f", "qcow2",
                                              str(out / "nbdcopy.qcow2"), "]"]), baseline_pids, data))
                add(measure("nbdcopy bare pull export -> raw",
                            lambda: proc.run(["nbdcopy", url, str(out / "nbdcopy.raw")]), baseline_pids, data))
            finally:
                bare_pull_end(vdom)
            for f in ("nbdcopy.qcow2", "nbdcopy.raw"):
                os.unlink(out / f)
            if args.virtnbdbackup:
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (args.virtnbdbackup,
                                                                              args.virtnbdbackup_pythonpath) if p)}
                vnb = [sys.executable, os.path.join(args.virtnbdbackup, "virtnbdbackup"), "-U", args.uri,
                       "-d", dom.name, "-l", "copy", "-o", str(out / "virtnbdbackup")]
                add(measure("virtnbdbackup -l copy", lambda: proc.run(vnb, env=env), baseline_pids, data))
                shutil.rmtree(out / "virtnbdbackup", ignore_errors=True)
                add(measure("virtnbdbackup -l copy, then fsync of its files",
                            lambda: (proc.run(vnb, env=env),
                                     [fsync(p) for p in (out / "virtnbdbackup").rglob("*") if p.is_file()]),
                            baseline_pids, data))
                shutil.rmtree(out / "virtnbdbackup", ignore_errors=True)
            ours.fresh_worker()
            folder = out / ("pull" if i == args.repeat - 1 else f"pull-r{i}")  # the last one: the incrementals' base
            folder.mkdir(exist_ok=True)
            add(measure("domcapture direct-backup --mode pull (full)",
                        lambda: ours.submit("direct-backup", dom.name, "--target", str(folder), "--mode", "pull",
                                            "--quiesce", "off"), ours.pids, data, ours.warm))

    for i in range(args.repeat):
        one_round(i)
    rows.extend(median_rows(r) for r in runs.values())


def incremental_group(rows: list[Row], ours: Ours, dom: DiskDomain, disk: str, out: Path,
                      args: argparse.Namespace) -> None:
    # incrementals (pull), after nothing, 1 % and 10 % of the disk changed
    for label, percent in (("nothing changed", 0.0), ("1 % changed", 1.0), ("10 % changed", 10.0)):
        changed = guest_change(dom, disk, args.disk_mib, percent, 0x5A) if percent else 0
        ours.fresh_worker()
        rows.append(measure(f"domcapture pull incremental, {label}",
                            lambda: ours.submit("direct-backup", dom.name, "--target", str(out / "pull"),
                                                "--mode", "pull", "--incremental", "--quiesce", "off"),
                            ours.pids, changed, ours.warm))


def options_group(rows: list[Row], ours: Ours, dom: DiskDomain, out: Path, data: int, work: Path) -> None:
    # the options' cost: a compressed, then an encrypted full pull against the plain one
    key = work / "bench.key"
    key.write_text("bench passphrase")
    for label, folder, extra in (("--compress zstd", "pull-zstd", ["--compress", "zstd"]),
                                 ("--encrypt-key-file (LUKS)", "pull-luks", ["--encrypt-key-file", str(key)])):
        ours.fresh_worker()
        (out / folder).mkdir()
        row = measure(f"domcapture direct-backup --mode pull (full) {label}",
                      lambda folder=folder, extra=extra: ours.submit(
                          "direct-backup", dom.name, "--target", str(out / folder), "--mode", "pull",
                          "--quiesce", "off", *extra), ours.pids, data, ours.warm)
        row["stored"] = sum(p.stat().st_blocks * 512 for p in (out / folder).rglob("*.qcow2"))
        rows.append(row)


BASELINE = {
    "domcapture snapshot-backup --quiesce off": "qemu-img convert -U -m 8 -W -O qcow2",
    "domcapture direct-backup --mode push": "bare push job (backup-begin, polled)",
    "domcapture direct-backup --mode pull (full)": "nbdcopy bare pull export -> qcow2 (qemu-nbd)",
    "domcapture pull incremental, nothing changed": "domcapture direct-backup --mode pull (full)",
    "domcapture pull incremental, 1 % changed": "domcapture direct-backup --mode pull (full)",
    "domcapture pull incremental, 10 % changed": "domcapture direct-backup --mode pull (full)",
    "domcapture direct-backup --mode pull (full) --compress zstd": "domcapture direct-backup --mode pull (full)",
    "domcapture direct-backup --mode pull (full) --encrypt-key-file (LUKS)":
        "domcapture direct-backup --mode pull (full)",
}


DURABLE = {  # the same baseline with its output on disk, as ours is when it reports success
    "domcapture snapshot-backup --quiesce off": "qemu-img convert, then fsync of the copy",
    "domcapture direct-backup --mode push": "bare push job, then fsync of its file",
    "domcapture direct-backup --mode pull (full)": "nbdcopy bare pull export -> qcow2, flushed (--flush)",
}


SHORT = {
    "qemu-img convert -U -m 8 -W -O qcow2": "qemu-img convert",
    "qemu-img convert, then fsync of the copy": "qemu-img convert + fsync",
    "bare push job (backup-begin, polled)": "bare push job",
    "bare push job, then fsync of its file": "bare push job + fsync",
    PUSH_READ: "bare push job + fsync + one read from the disk",
    PUSH_SHA: "bare push job + sha256 from the cache",
    "nbdcopy bare pull export -> qcow2 (qemu-nbd)": "nbdcopy -> qcow2",
    "nbdcopy bare pull export -> qcow2, flushed (--flush)": "nbdcopy --flush -> qcow2",
    "nbdcopy bare pull export -> raw": "nbdcopy -> raw",
    "domcapture direct-backup --mode pull (full)": "the full pull",
}


def _vs(r: dict[str, Any], base: dict[str, Any] | None) -> str:
    """``wall× name (engine×)``: ours against one baseline, by the CLI's time and by the engine's own."""
    if not base:
        return ""
    text = f"{r['seconds'] / base['seconds']:.2f}× {SHORT.get(base['job'], base['job'])}"
    if r.get("engine_seconds"):
        text += f" (engine {r['engine_seconds'] / base.get('engine_seconds', base['seconds']):.2f}×)"
    return text


def report(rows: list[dict[str, Any]], args: argparse.Namespace, cache_mode: str) -> None:
    by = {r["job"]: r for r in rows}
    print(f"\n{args.disk_mib} MiB qcow2 holding {args.data_mib} MiB; "
          f"page cache dropped before each job: {cache_mode}\n")
    print("| job | time | engine | ours vs baseline: time (engine) | page cache growth | of it not the disk image "
          "| peak RSS |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        parts = [_vs(r, by.get(BASELINE.get(r["job"], ""))), _vs(r, by.get(DURABLE.get(r["job"], "")))]
        if r["job"] == "domcapture direct-backup --mode push":  # against the job plus a proof of its bytes
            parts += [_vs(r, by.get(PUSH_READ)), _vs(r, by.get(PUSH_SHA))]
        if r["job"] == "domcapture direct-backup --mode pull (full)":
            parts.append(_vs(r, by.get("nbdcopy bare pull export -> raw")))
            for label in ("virtnbdbackup -l copy", "virtnbdbackup -l copy, then fsync of its files"):
                vnb = by.get(label)
                parts.append(f"{label.replace('-l copy', 'copy')} takes {vnb['seconds'] / r['seconds']:.2f}× "
                             f"ours ({vnb['seconds'] / r['engine_seconds']:.2f}× our engine time)" if vnb
                             else "")
        engine = f"{r['engine_seconds']:.2f} s" if r.get("engine_seconds") is not None else ""
        share = f" ({100 * r['cache_share']:.0f} % of copied)" if r.get("cache_share") is not None else ""
        if "source_cached" in r:
            oshare = f" ({100 * r['other_share']:.0f} %)" if r.get("other_share") is not None else ""
            other = f"{(r['cache_growth'] - r['source_cached']) / MIB:+.0f} MiB{oshare}"
        else:
            other = "not measured"
        spread = f" ({r['runs'][0]:.2f}–{r['runs'][-1]:.2f})" if r.get("runs") else ""
        print(f"| {r['job']} | {r['seconds']:.2f} s{spread} | {engine} | {'; '.join(p for p in parts if p)} | "
              f"{r['cache_growth'] / MIB:+.0f} MiB{share} | {other} | {r['peak_rss'] / MIB:.0f} MiB |")
    plain = next((r for r in rows if r["job"] == "domcapture direct-backup --mode pull (full)"), None)
    for r in rows:
        if "stored" in r and plain is not None and r["copied"]:
            print(f"\n{r['job']}: stores {r['stored'] / MIB:.0f} MiB for {r['copied'] / MIB:.0f} MiB of data "
                  f"(ratio {r['stored'] / r['copied']:.2f}), "
                  f"{r['seconds'] / plain['seconds']:.2f}× the plain pull's time")


def reprint(path: str) -> int:
    """Print the table of a run saved with --json."""
    with open(path) as f:
        doc = json.load(f)
    report(doc["rows"], argparse.Namespace(**doc["args"]), doc["cache"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
