"""How soon a node serves the next Python task after a fault: for each fault
(segfault, os._exit, memory limit, fork bomb), run the faulty task, then time
one no-op task from submission to result through the real CLI (a fresh worker
must start). Reference: the same no-op on a warm worker.

usage: python3 bench/python/recovery.py   (as root, for the cgroup faults)
Needs target/debug/picloud (cargo build --workspace --bins).
"""

import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "python"))
from picloud_cluster import Cluster  # noqa: E402


def hog():
    blocks = []
    for _ in range(64):
        blocks.append(bytearray(16 << 20))


def bomb():
    try:
        while True:
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
    except OSError:
        raise RuntimeError("fork failed")


FAULTS = [
    ("segfault", lambda: ctypes.string_at(0), []),
    ("os._exit(3)", lambda: os._exit(3), []),
    ("memory limit (64 MiB)", hog, ["--mem", "64mb"]),
    ("fork bomb (pids limit)", bomb, []),
]


def timed_noop(cluster):
    t = time.perf_counter()
    [r] = cluster.results(cluster.submit(lambda: None, ()))
    assert r["exit_status"] == 0, r
    return time.perf_counter() - t


def main():
    with tempfile.TemporaryDirectory(prefix="picloud-recovery-") as d:
        os.chmod(d, 0o755)
        cluster = Cluster(d)
        try:
            timed_noop(cluster)
            warm = sorted(timed_noop(cluster) for _ in range(5))[2]
            print(f"no-op on a warm worker, submit to result through the CLI: {warm * 1000:.1f} ms")
            for name, fault, options in FAULTS:
                [r] = cluster.results(cluster.submit(fault, (), options=options), timeout=120)
                after = timed_noop(cluster)
                print(f"after {name} (exit {r['exit_status']}): next task in {after * 1000:.1f} ms")
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
