"""Encoded values: in-band and out-of-band round trips, segment references."""

import mmap
import os
import pickle
import struct

import numpy as np
import pytest

from picloud import _payload as P


def no_segments(size):
    raise AssertionError(f"allocate_segment({size}) called")


class Recorder:
    """An allocate_segment backed by bytearrays, recording each call."""

    def __init__(self):
        self.calls = []
        self.buffers = {}

    def __call__(self, size):
        name = f"mem-{len(self.calls)}"
        self.calls.append(size)
        self.buffers[name] = bytearray(size)
        return name, self.buffers[name]

    def map(self, name):
        return memoryview(self.buffers[name]).toreadonly()


def entries(data):
    return P._parse(data)[0]


def same_memory(a, b):
    return np.shares_memory(np.asarray(a), np.frombuffer(b, np.uint8))


@pytest.mark.parametrize("value", [
    None, True, 0, -(2**70), 1.5, 2j, "text ✓", b"bytes", bytearray(b"ba"),
    [1, (2, 3), {"k": {4}}], np.arange(10), np.float32(2.5),
])
def test_in_band_round_trip(value):
    data, names = P.encode(value, no_segments)
    assert names == [] and entries(data) == []
    back = P.decode(data, no_segments)
    if isinstance(value, np.ndarray):
        assert back.dtype == value.dtype and (back == value).all()
    else:
        assert type(back) is type(value) and back == value


def test_functions_and_lambdas_travel_by_value():
    offset = 10
    data, _ = P.encode(lambda x: x + offset, no_segments)
    assert P.decode(data)(5) == 15


def test_layout_without_buffers():
    data, _ = P.encode(None)
    pk = pickle.dumps(None, 5)
    assert data == struct.pack("<I", 0) + struct.pack("<I", len(pk)) + pk


def test_out_of_band_array_round_trip_without_copy_on_decode():
    arr = np.random.default_rng(1).random(1 << 17)          # 1 MiB
    rec = Recorder()
    data, names = P.encode(arr, rec)
    assert rec.calls == [arr.nbytes] and names == ["mem-0"]
    assert entries(data) == [("mem-0", 0, arr.nbytes)]
    assert len(data) < 1000                  # the data is not in the pickle
    seg = rec.map("mem-0")
    back = P.decode(data, rec.map)
    assert (back == arr).all()
    assert not back.flags.owndata and not back.flags.writeable
    assert same_memory(back, seg)            # a view of the segment


def test_threshold_boundary_and_alignment():
    small = np.zeros(P.THRESHOLD - 1, np.uint8)
    exact = np.ones(P.THRESHOLD, np.uint8)
    odd = np.full(P.THRESHOLD + 3, 7, np.uint8)
    rec = Recorder()
    data, names = P.encode({"odd": odd, "small": small, "exact": exact,
                            "again": exact}, rec)
    ents = entries(data)
    # One segment for all; `exact` appears once (pickle memo); `small` in-band.
    assert names == ["mem-0"] and len(rec.calls) == 1
    assert [e[2] for e in ents] == [P.THRESHOLD + 3, P.THRESHOLD]
    assert all(e[1] % P.ALIGN == 0 for e in ents)
    assert ents[1][1] >= ents[0][1] + ents[0][2]
    assert rec.calls[0] >= ents[1][1] + ents[1][2]
    back = P.decode(data, rec.map)
    assert back["again"] is back["exact"]
    assert (back["odd"] == 7).all() and (back["exact"] == 1).all()
    # The in-band one is a writable copy, not in the segment.
    assert back["small"].flags.writeable
    assert not same_memory(back["small"], rec.buffers["mem-0"])
    assert same_memory(back["odd"], rec.buffers["mem-0"])


def test_bytes_and_bytearray_go_out_of_band_at_top_level_and_as_arguments():
    blob = os.urandom(P.THRESHOLD + 10)
    rec = Recorder()
    data, _ = P.encode(blob, rec)
    assert len(entries(data)) == 1
    back = P.decode(data, rec.map)
    assert type(back) is bytes and back == blob

    ba = bytearray(blob)
    data, _ = P.encode_args((blob, 1, blob), {"k": ba}, rec)
    assert [e[2] for e in entries(data)] == [len(blob), len(ba)]
    args, kwargs = P.decode_args(data, rec.map)
    assert args == (blob, 1, blob) and args[0] is args[2]
    assert type(kwargs["k"]) is bytearray and kwargs["k"] == ba


def test_nested_bytes_stay_in_band():
    """Documented limit: pickle has no hook for bytes below the top."""
    blob = b"n" * (P.THRESHOLD + 1)
    data, names = P.encode([blob], no_segments)
    assert names == [] and P.decode(data) == [blob]


def test_without_allocator_large_buffers_stay_in_band():
    arr = np.arange(1 << 16, dtype=np.int64)
    data, names = P.encode(arr)
    assert names == [] and len(data) > arr.nbytes
    assert (P.decode(data) == arr).all()


def test_pickle_buffer_and_custom_threshold():
    pb = pickle.PickleBuffer(bytearray(b"abc" * 10))
    rec = Recorder()
    data, _ = P.encode(pb, rec, threshold=16)
    assert entries(data) == [("mem-0", 0, 30)]
    assert bytes(P.decode(data, rec.map)) == b"abc" * 10
    data, _ = P.encode_args((b"x" * 20, b"y" * 10), {}, rec, threshold=16)
    assert [e[2] for e in entries(data)] == [20]
    assert P.decode_args(data, rec.map) == ((b"x" * 20, b"y" * 10), {})


def test_allocator_errors_propagate_and_small_buffers_are_refused():
    def refuse(size):
        raise P.SegmentError("quota exceeded")

    with pytest.raises(P.SegmentError, match="quota exceeded"):
        P.encode(np.zeros(1 << 17), refuse)
    with pytest.raises(P.SegmentError, match="writable buffer"):
        P.encode(np.zeros(1 << 17), lambda size: ("tiny", bytearray(10)))
    with pytest.raises(P.SegmentError, match="writable buffer"):
        P.encode(np.zeros(1 << 17), lambda size: ("ro", bytes(size)))


def test_unpicklable_value_raises():
    import threading
    with pytest.raises(TypeError, match="lock"):
        P.encode(threading.Lock())


def test_decode_rejects_malformed_data():
    data, _ = P.encode([1, 2])
    with pytest.raises(ValueError, match="bytes after the pickle"):
        P.decode(data + b"\0")
    with pytest.raises(ValueError, match="malformed"):
        P.decode(data[:-1])
    rec = Recorder()
    data, _ = P.encode(np.zeros(1 << 17), rec)
    small = {"mem-0": memoryview(bytearray(100))}
    with pytest.raises(ValueError, match="outside segment"):
        P.decode(data, small.__getitem__)


def test_decode_takes_any_buffer_of_the_encoding():
    data, _ = P.encode({"a": [1, 2.5, "x"]})
    for form in (data, bytearray(data), memoryview(data), memoryview(data).toreadonly()):
        assert P.decode(form) == {"a": [1, 2.5, "x"]}
    # A header that claims more or fewer bytes than there are is malformed,
    # however the buffer is given.
    for bad in (data[:-1], memoryview(data)[:-1], data + b"\0", memoryview(data + b"\0")):
        with pytest.raises(ValueError):
            P.decode(bad)


def test_decode_args_checks_its_shape():
    data, _ = P.encode([1, 2])
    with pytest.raises(TypeError, match="not an \\(args tuple, kwargs dict\\)"):
        P.decode_args(data)
    data, _ = P.encode_args([1], {"a": 2})
    assert P.decode_args(data) == ((1,), {"a": 2})


def test_segment_names_lists_each_once():
    rec = Recorder()
    a = np.zeros(1 << 17)
    data, names = P.encode([a, np.ones(1 << 17)], rec)
    assert P.segment_names(data) == names == ["mem-0"]
    assert P.segment_names(P.encode(1)[0]) == []


# --------------------------------------------------------------------------
# Registered segments: referenced, not copied


def test_buffer_address_matches_numpy():
    arr = np.arange(1000, dtype=np.int32)
    ro = memoryview(arr).toreadonly()
    assert P.buffer_address(ro) == (arr.ctypes.data, arr.nbytes)
    assert P.buffer_address(ro[40:]) == (arr.ctypes.data + 40 * 4, 960 * 4)


def test_buffer_inside_a_registered_segment_is_referenced(shm):
    size = 4 << 20
    name, path = shm.create(size)
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, size)
    os.close(fd)
    token = P.register_segment(name, mm)
    try:
        arr = np.frombuffer(mm, np.float64, count=1 << 17, offset=8192)
        arr[:] = np.arange(1 << 17)
        data, names = P.encode(arr, no_segments)
        assert names == [name]
        assert entries(data) == [(name, 8192, arr.nbytes)]
        assert P.find_segment(arr.ctypes.data, arr.nbytes) == (name, 8192)
        # Half inside, half outside: not in the segment.
        assert P.find_segment(arr.ctypes.data + size - 8192 - 8, 16) is None
        cache = P.SegmentCache(directory=os.path.dirname(path))
        back = P.decode(data, cache)
        assert (back == arr).all()
        del back, arr
        cache.clear()
    finally:
        P.unregister_segment(token)
    # Once unregistered, the same buffer is copied into a new segment.
    arr = np.frombuffer(mm, np.float64, count=1 << 17, offset=8192)
    rec = Recorder()
    data, names = P.encode(arr, rec)
    assert names == ["mem-0"] and rec.calls == [arr.nbytes]
    del arr
    mm.close()


# --------------------------------------------------------------------------
# SegmentCache


def test_cache_maps_read_only_reuses_and_registers(shm):
    name, path = shm.create(1 << 16, b"hello")
    cache = P.SegmentCache(directory=os.path.dirname(path))
    try:
        view = cache(name)
        assert view.readonly and bytes(view[:5]) == b"hello"
        with pytest.raises(TypeError):
            view[0] = 1
        assert cache(name) is view                     # cached
        assert P.find_segment(P.buffer_address(view[100:200])[0], 100) == (
            name, 100)
    finally:
        cache.clear()
    assert P.find_segment(P.buffer_address(view)[0], 1) is None


def test_cache_remaps_a_replaced_file_and_sweeps_removed_ones(shm):
    name, path = shm.create(8192, b"old")
    other, other_path = shm.create(4096, b"x")
    cache = P.SegmentCache(directory=os.path.dirname(path))
    try:
        assert bytes(cache(name)[:3]) == b"old"
        os.unlink(path)
        shm.paths.remove(path)
        name2, path2 = shm.create(8192, b"new")
        os.rename(path2, path)                # same name, another file
        shm.paths[shm.paths.index(path2)] = path
        assert bytes(cache(name)[:3]) == b"new"
        os.unlink(path)
        cache(other)                          # mapping a new one sweeps
        assert name not in cache and other in cache
    finally:
        cache.clear()


def test_cache_is_bounded(shm):
    cache = P.SegmentCache(directory="/dev/shm", limit=3)
    try:
        names = [shm.create(4096)[0] for _ in range(5)]
        for n in names:
            cache(n)
        cache(names[2])                       # refresh
        assert len(cache) == 3
        assert [n in cache for n in names] == [False, False, True, True, True]
    finally:
        cache.clear()


def test_cache_rejects_bad_names_and_missing_files():
    cache = P.SegmentCache(directory="/dev/shm")
    for bad in ["", "..", "a/b", "../etc/passwd"]:
        with pytest.raises(P.SegmentError, match="invalid segment name"):
            cache(bad)
    with pytest.raises(P.SegmentError, match="cannot open"):
        cache(f"picloud-test-{os.getpid()}-missing")


def test_the_segment_registry_holds_up_under_threads():
    import threading

    errors = []

    def churn(worker):
        try:
            for i in range(400):
                buf = bytearray(4096)
                name = f"seg-{worker}-{i}"
                token = P.register_segment(name, buf)
                start = P.buffer_address(buf)[0]
                assert P.find_segment(start + 100, 10) == (name, 100)
                P.unregister_segment(token)
                assert P.find_segment(start + 100, 10) is None or P.find_segment(start + 100, 10)[0] != name
        except BaseException as e:
            errors.append(e)

    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)          # switch threads as often as can be
    try:
        threads = [threading.Thread(target=churn, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert not any(entry[2].startswith("seg-") for entry in P._reg_entries)


def test_a_new_mapping_at_a_stale_entrys_address_replaces_it():
    buf = bytearray(4096)
    stale = P.register_segment("gone-before-its-finalizer", buf)   # never unregistered
    fresh = P.register_segment("mapped-there-now", buf)
    start = P.buffer_address(buf)[0]
    assert P.find_segment(start + 8, 8) == ("mapped-there-now", 8)
    P.unregister_segment(stale)                 # the late finalizer: no harm
    assert P.find_segment(start + 8, 8) == ("mapped-there-now", 8)
    P.unregister_segment(fresh)
    assert P.find_segment(start + 8, 8) is None
