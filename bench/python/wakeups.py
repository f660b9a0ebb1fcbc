"""What one wake-up costs on this machine: a one-byte ping-pong between two
processes over a Unix socket pair, with both processes pinned to the same
cpu and then to two different cpus. A Python task's round trip is six such
hand-offs in a row (client, server, agent, worker, agent, server, client),
so this bounds how fast it can be before any of picloud's own work.

    python3 bench/python/wakeups.py [--rounds 20000]

Prints the median of 5 runs of each, as microseconds per round trip (two
hand-offs).
"""

import argparse
import os
import socket
import statistics
import time


def ping_pong(rounds, cpu_a, cpu_b):
    """Microseconds per round trip between a process on ``cpu_a`` and one
    on ``cpu_b``."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        os.sched_setaffinity(0, {cpu_b})
        while True:
            data = b.recv(16)
            if not data:
                os._exit(0)
            b.sendall(data)
    b.close()
    os.sched_setaffinity(0, {cpu_a})
    for _ in range(1000):
        a.sendall(b"x")
        a.recv(16)
    start = time.perf_counter()
    for _ in range(rounds):
        a.sendall(b"x")
        a.recv(16)
    elapsed = time.perf_counter() - start
    a.close()
    os.waitpid(pid, 0)
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    return elapsed / rounds * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs two cpus")
    same, cross = [], []
    for _ in range(5):
        same.append(ping_pong(args.rounds, cpus[0], cpus[0]))
        cross.append(ping_pong(args.rounds, cpus[0], cpus[1]))
    print(f"same cpu:   {statistics.median(same):.1f} µs per round trip")
    print(f"two cpus:   {statistics.median(cross):.1f} µs per round trip")


if __name__ == "__main__":
    main()
