"""Writes the payloads bench/benches/workers.rs sends to warm workers:
a no-op function, a sum function, empty arguments, and arguments holding a
float64 array of N bytes in a shared-memory segment. Prints this interpreter's
path, then the median time of `arr.sum()` on that array in this one process
(the reference).

usage: make_payloads.py OUT_DIR SEGMENT_NAME ARRAY_BYTES
"""

import mmap
import os
import sys
import time

import cloudpickle
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))
from picloud import _payload  # noqa: E402

out, name, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(os.path.join(out, "noop.pkl"), "wb") as f:
    f.write(cloudpickle.dumps(lambda: None, protocol=5))
with open(os.path.join(out, "sum.pkl"), "wb") as f:
    f.write(cloudpickle.dumps(lambda a: float(a.sum()), protocol=5))
with open(os.path.join(out, "noargs.bin"), "wb") as f:
    f.write(_payload.encode_args((), {})[0])

path = os.path.join(_payload.SHM_DIR, name)
with open(path, "w+b") as f:
    f.truncate(nbytes)
    mm = mmap.mmap(f.fileno(), nbytes)
arr = np.frombuffer(mm, dtype=np.float64)
arr[:] = 1.0
token = _payload.register_segment(name, mm)
data, names = _payload.encode_args((arr,), {})
assert names == [name], names
with open(os.path.join(out, "array.bin"), "wb") as f:
    f.write(data)


times = []
for _ in range(7):
    t = time.perf_counter()
    arr.sum()
    times.append(time.perf_counter() - t)
times.sort()
print(sys.executable)
print(f"{times[len(times) // 2]:.6f}")
