"""picloud's Python API against the tools a scientist would otherwise use, in
one run on one machine: multiprocessing.Pool, ProcessPoolExecutor, and loky,
Dask and Ray when they are installed.

    python3 bench/python/peers.py [--tasks 2000] [--map 10000] [--skip-gib] [--only-picloud]

Measures: one call per no-op task (tasks/s), a map of no-ops (elements/s),
single-task round-trip latency (median of 200 after warm-up), start-up from
`import picloud` to the first result (the embedded local cluster included,
in a fresh process), and `arr.sum()` of a 1 GiB float64 array passed as an
argument, against the same sum in this process.
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))


def noop(*_):
    return None


def total(a):
    return float(a.sum())


def rate(n, seconds):
    return f"{n / seconds:>12,.0f}/s"


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def latency(submit_and_wait, n=200, warmup=20):
    for _ in range(warmup):
        submit_and_wait()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        submit_and_wait()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def row(name, calls, map_rate, lat):
    print(f"{name:<28} {calls:>16} {map_rate:>16} {lat:>14}")


def bench_picloud(args):
    import picloud as cloud

    cloud.result(cloud.call(noop))   # starts the embedded cluster, warms a worker
    cloud.result(cloud.map(noop, range(100)))
    n = args.tasks
    t_calls = timed(lambda: cloud.result([cloud.call(noop) for _ in range(n)]))
    m = args.map
    t_map = timed(lambda: cloud.result(cloud.map(noop, range(m))))
    lat = latency(lambda: cloud.result(cloud.call(noop)))
    row("picloud", rate(n, t_calls), rate(m, t_map), f"{lat * 1000:.2f} ms")
    return cloud


def bench_pool(args):
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(noop, range(100))
        n = args.tasks
        t_calls = timed(lambda: [r.get() for r in [pool.apply_async(noop) for _ in range(n)]])
        m = args.map
        t_map = timed(lambda: pool.map(noop, range(m)))
        lat = latency(lambda: pool.apply_async(noop).get())
        row("multiprocessing.Pool", rate(n, t_calls), rate(m, t_map), f"{lat * 1000:.2f} ms")


def bench_ppe(args, name="ProcessPoolExecutor", make=None):
    make = make or (lambda: concurrent.futures.ProcessPoolExecutor(os.cpu_count()))
    with make() as ex:
        list(ex.map(noop, range(100)))
        n = args.tasks
        t_calls = timed(lambda: [f.result() for f in [ex.submit(noop) for _ in range(n)]])
        m = args.map
        t_map = timed(lambda: list(ex.map(noop, range(m), chunksize=max(1, m // (4 * os.cpu_count())))))
        lat = latency(lambda: ex.submit(noop).result())
        row(name, rate(n, t_calls), rate(m, t_map), f"{lat * 1000:.2f} ms")


def bench_optional(args):
    try:
        import loky

        bench_ppe(args, "loky", lambda: loky.get_reusable_executor(max_workers=os.cpu_count()))
    except ImportError:
        print("loky: not installed")
    try:
        bench_dask(args)
    except ImportError:
        print("dask: not installed")
    try:
        bench_ray(args)
    except ImportError:
        print("ray: not installed")


def bench_dask(args):
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=os.cpu_count(), threads_per_worker=1, processes=True) as lc, Client(lc) as c:
        c.gather(c.map(noop, range(100), pure=False))
        n = args.tasks
        t_calls = timed(lambda: c.gather([c.submit(noop, pure=False) for _ in range(n)]))
        m = args.map
        t_map = timed(lambda: c.gather(c.map(noop, range(m), pure=False)))
        lat = latency(lambda: c.submit(noop, pure=False).result())
        row("dask.distributed", rate(n, t_calls), rate(m, t_map), f"{lat * 1000:.2f} ms")


def bench_ray(args):
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(noop)
        ray.get([remote.remote() for _ in range(100)])
        n = args.tasks
        t_calls = timed(lambda: ray.get([remote.remote() for _ in range(n)]))
        m = args.map
        t_map = timed(lambda: ray.get([remote.remote(i) for i in range(m)]))
        lat = latency(lambda: ray.get(remote.remote()))
        row("ray", rate(n, t_calls), rate(m, t_map), f"{lat * 1000:.2f} ms")
    finally:
        ray.shutdown()


def startup():
    env = {k: v for k, v in os.environ.items() if k not in ("PICLOUD_DIR", "PICLOUD_SERVER")}
    env["HOME"] = "/tmp/picloud-bench-home"
    os.makedirs(env["HOME"], exist_ok=True)
    code = (
        "import time; t = time.perf_counter(); import picloud as cloud; "
        "cloud.result(cloud.call(int)); print(time.perf_counter() - t)"
    )
    env["PYTHONPATH"] = str(ROOT / "python")
    samples = []
    for _ in range(5):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        samples.append(float(out.stdout.strip()))
    return statistics.median(samples)


def bench_gib(cloud):
    import numpy as np

    n = (1 << 30) // 8
    arr = cloud.array((n,), np.float64)
    arr[:] = 1.0
    in_process = statistics.median(timed(lambda: arr.sum()) for _ in range(5))
    cloud.result(cloud.call(total, arr))   # the worker maps the segment once
    via_picloud = statistics.median(timed(lambda: cloud.result(cloud.call(total, arr))) for _ in range(5))
    plain = np.ones(n)
    with multiprocessing.Pool(1) as pool:
        via_pool = timed(lambda: pool.apply(total, (plain,)))
    print(f"1 GiB float64 sum: in process {in_process * 1000:.1f} ms, picloud {via_picloud * 1000:.1f} ms "
          f"({via_picloud / in_process:.2f}x), multiprocessing.Pool {via_pool * 1000:.0f} ms "
          f"({via_pool / in_process:.0f}x)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=2000)
    p.add_argument("--map", type=int, default=10000)
    p.add_argument("--skip-gib", action="store_true")
    p.add_argument("--only-picloud", action="store_true",
                   help="picloud's row alone (to alternate two builds)")
    args = p.parse_args()
    print(f"{os.cpu_count()} cpus; {args.tasks} calls, map of {args.map}")
    row("", "call per task", "map", "latency")
    cloud = bench_picloud(args)
    if args.only_picloud:
        return
    bench_pool(args)
    bench_ppe(args)
    bench_optional(args)
    print(f"start-up, import to first result (embedded cluster): {startup() * 1000:.0f} ms (median of 5)")
    if not args.skip_gib:
        bench_gib(cloud)


if __name__ == "__main__":
    main()
