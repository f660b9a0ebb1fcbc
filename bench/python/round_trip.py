"""Round trip and calls per second of the Python API, nothing else: the
median of 1 500 sequential `cloud.result(cloud.call(noop))`, then 3 000
calls and one `result`. Short enough to alternate two builds a few times.

    PICLOUD_LIB=... PICLOUD_BIN=... python3 bench/python/round_trip.py
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

import picloud as cloud  # noqa: E402


def noop(*_):
    return None


def main():
    for _ in range(200):
        cloud.result(cloud.call(noop))
    samples = []
    for _ in range(1500):
        t = time.perf_counter()
        cloud.result(cloud.call(noop))
        samples.append(time.perf_counter() - t)
    t = time.perf_counter()
    cloud.result([cloud.call(noop) for _ in range(3000)])
    rate = 3000 / (time.perf_counter() - t)
    print(f"latency {statistics.median(samples) * 1e3:.3f} ms  calls {rate:.0f}/s")


if __name__ == "__main__":
    main()
