"""Where one Python task's time goes on the embedded cluster: the round trip
of one `call`, calls per second, a map of one element per task, and the CPU
each process (and each of its threads) spends per call.

    python3 bench/python/task_path.py [--calls 3000] [--map 20000]

Use a release build (`PICLOUD_LIB`, `PICLOUD_BIN`); bench/README.md has the
figures. Per-thread CPU comes from /proc/<pid>/task/<tid>/stat before and
after a run of sequential `cloud.result(cloud.call(noop))`.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))

import picloud as cloud  # noqa: E402


def noop(*_):
    return None


def descendants():
    """This process and every process below it: pid -> command line."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append((int(entry), cmd))
    out, todo = {os.getpid(): "client"}, [os.getpid()]
    while todo:
        for pid, cmd in children.get(todo.pop(), []):
            out[pid] = cmd
            todo.append(pid)
    return out


def thread_ticks(pid):
    """CPU ticks (user + system) per thread name of process `pid`."""
    ticks = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return ticks
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        ticks[name] = ticks.get(name, 0) + int(fields[11]) + int(fields[12])
    return ticks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--map", type=int, default=20000)
    args = parser.parse_args()

    for _ in range(50):
        cloud.result(cloud.call(noop))
    samples = []
    for _ in range(200):
        t = time.perf_counter()
        cloud.result(cloud.call(noop))
        samples.append(time.perf_counter() - t)
    print(f"round trip of one call (median of 200): {statistics.median(samples) * 1000:.3f} ms")

    n = args.calls
    t = time.perf_counter()
    cloud.result([cloud.call(noop) for _ in range(n)])
    print(f"one call per task, {n} calls: {n / (time.perf_counter() - t):,.0f}/s")

    m = args.map
    t = time.perf_counter()
    cloud.result(cloud.map(noop, range(m), _chunksize=1))
    print(f"map of {m}, one element per task: {m / (time.perf_counter() - t):,.0f}/s")

    procs = descendants()
    before = {pid: thread_ticks(pid) for pid in procs}
    t = time.perf_counter()
    for _ in range(n):
        cloud.result(cloud.call(noop))
    wall = time.perf_counter() - t
    after = {pid: thread_ticks(pid) for pid in procs}
    hz = os.sysconf("SC_CLK_TCK")
    print(f"{n} sequential calls, {wall / n * 1e6:.0f} µs each; CPU per call:")
    for pid, cmd in procs.items():
        for name, total in sorted(after[pid].items()):
            used = total - before[pid].get(name, 0)
            if used:
                print(f"  {cmd[:48]:<48} {name:<14} {used / hz / n * 1e6:7.1f} µs")


if __name__ == "__main__":
    main()
