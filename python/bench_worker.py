"""Micro-benchmark: no-op task round trips through the socket to one worker.

    python3 python/bench_worker.py [--tasks N] [--same-core] [--workdir DIR]

Plays the agent (in Python, so the figures include this side's cost too):
starts ``python -m picloud.worker`` on a socketpair, sends one TASK carrying
the function, then N TASKs by function key only (empty args, no output) and
waits for each DONE before sending the next.  Prints round trips per second,
latency percentiles, and the worker's CPU time per task (from wait4).
"""

import argparse
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cloudpickle                          # noqa: E402

from picloud import _payload, _wire         # noqa: E402


def noop():
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=50000)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--same-core", action="store_true",
                    help="pin this process and the worker to one CPU")
    ap.add_argument("--workdir", default="",
                    help="workdir sent with every task (default: none)")
    opts = ap.parse_args()

    cmd = [sys.executable, "-m", "picloud.worker"]
    print("command:", " ".join([sys.executable] + sys.argv))
    print("worker: ", " ".join(cmd), "(PYTHONPATH=%s)" % HERE)
    if opts.same_core:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})        # inherited by the worker
        print("pinned both processes to CPU", cpu)

    ours, theirs = socket.socketpair()
    env = dict(os.environ, PYTHONPATH=HERE,
               PICLOUD_WORKER_FD=str(theirs.fileno()))
    proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], env=env,
                            stdin=subprocess.DEVNULL)
    theirs.close()
    reader = _wire.FrameReader(ours, _wire.WORKER_TO_AGENT)
    ready = reader.read()
    assert type(ready) is _wire.Ready, ready

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    func = cloudpickle.dumps(noop, protocol=5)
    args, _ = _payload.encode_args((), {})
    send = _wire.send_message
    Task = _wire.Task
    first = Task(0, 1, func, args, opts.workdir, [])
    send(ours, first)
    assert reader.read().status == 0

    task = Task(1, 1, b"", args, opts.workdir, [])
    frame = _wire.encode_frame(task)    # the same bytes every time
    for _ in range(opts.warmup):
        ours.sendall(frame)
        reader.read_frame()

    lat = [0] * opts.tasks
    clock = time.perf_counter_ns
    t0 = clock()
    for i in range(opts.tasks):
        t = clock()
        ours.sendall(frame)
        reader.read_frame()
        lat[i] = clock() - t
    elapsed = (clock() - t0) / 1e9

    # Check the last reply fully, then stop the worker and get its CPU time.
    send(ours, task)
    done = reader.read()
    assert done.status == 0 and _payload.decode(done.result) is None, done
    send(ours, _wire.Exit())
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    lat.sort()
    n = opts.tasks
    total_tasks = n + opts.warmup + 2
    cpu = usage.ru_utime + usage.ru_stime
    print(f"tasks:            {n} no-op round trips (after {opts.warmup} warm-up)")
    print(f"throughput:       {n / elapsed:,.0f} round trips/s")
    print(f"latency median:   {lat[n // 2] / 1000:.1f} us")
    print(f"latency p99:      {lat[n * 99 // 100] / 1000:.1f} us")
    print(f"worker CPU/task:  {cpu / total_tasks * 1e6:.1f} us "
          f"(incl. start-up: {cpu:.2f} s over {total_tasks} tasks)")


if __name__ == "__main__":
    main()
