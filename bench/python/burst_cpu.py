"""The CPU each process spends per call during a burst of `call`s: N calls
in a loop, then one `result` of them all, on the embedded cluster.

    PICLOUD_LIB=... PICLOUD_BIN=... python3 bench/python/burst_cpu.py [N]
    python3 bench/python/burst_cpu.py --pool [N]

Prints calls per second, the loop's time per call, and the CPU per call of
this process and of every picloud process (server, agent, workers), from
/proc/<pid>/stat before and after (10 ms ticks: over 4 000 calls, 2.5 µs a
tick). `PICLOUD_PYTHON` picks the Python package's directory (default: the
one beside this script), to compare two checkouts side by side. With
`--pool`, the same burst goes through `multiprocessing.Pool(2).apply_async`
instead (this process's threads included, and its two workers).
"""

import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, os.environ.get("PICLOUD_PYTHON", str(Path(__file__).resolve().parents[2] / "python")))

import picloud as cloud  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def noop(*_):
    return None


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def picloud_processes():
    """pid -> command line of every other process whose command names picloud."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "picloud" in cmd:
                found[int(entry)] = cmd[:70]
    return found


def pool_burst(n):
    """The same burst through multiprocessing.Pool."""
    import multiprocessing

    with multiprocessing.Pool(2) as pool:
        pool.map(noop, range(100))
        workers = {p.pid: f"Pool worker {p.pid}" for p in pool._pool}
        before = {pid: cpu_seconds(pid) for pid in workers}
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        pending = [pool.apply_async(noop) for _ in range(n)]
        t1 = time.perf_counter()
        for r in pending:
            r.get()
        t2 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        used = {pid: cpu_seconds(pid) - before[pid] for pid in workers}
    client = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    print(f"{n / (t2 - t0):,.0f} calls/s; the loop {1e6 * (t1 - t0) / n:.1f} µs per call, "
          f"all {1e6 * (t2 - t0) / n:.1f} µs per call")
    print(f"{1e6 * client / n:7.1f} µs per call  this process (its threads included)")
    for pid, cmd in workers.items():
        print(f"{1e6 * used[pid] / n:7.1f} µs per call  {cmd}")


def main():
    args = sys.argv[1:]
    if args[:1] == ["--pool"]:
        return pool_burst(int(args[1]) if len(args) > 1 else 4000)
    n = int(args[0]) if args else 4000
    cloud.result(cloud.call(noop))
    cloud.result(cloud.map(noop, range(100)))
    procs = picloud_processes()
    before = {pid: cpu_seconds(pid) for pid in procs}
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    jids = [cloud.call(noop) for _ in range(n)]
    t1 = time.perf_counter()
    cloud.result(jids)
    t2 = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    client = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    print(f"{n / (t2 - t0):,.0f} calls/s; the loop {1e6 * (t1 - t0) / n:.1f} µs per call, "
          f"all {1e6 * (t2 - t0) / n:.1f} µs per call")
    print(f"{1e6 * client / n:7.1f} µs per call  this client")
    for pid, cmd in procs.items():
        try:
            print(f"{1e6 * (cpu_seconds(pid) - before[pid]) / n:7.1f} µs per call  {cmd}")
        except OSError:
            pass


if __name__ == "__main__":
    main()
