"""The encoded-value format of arguments and results (docs/workers.md).

::

    list<(str segment_name, u64 offset, u64 length)>   out-of-band buffers
    bytes                                              pickle, protocol 5

The pickle is made by cloudpickle (so lambdas and locally defined classes
travel by value) with a ``buffer_callback``: a buffer of at least
``THRESHOLD`` bytes (numpy arrays, ``pickle.PickleBuffer``; ``bytes`` and
``bytearray`` only at the top of the value or as a direct argument, as pickle
has no hook for them deeper down) leaves the pickle and is stored in a
shared-memory segment; smaller ones stay in the pickle.

Encoding copies the large buffers into one segment obtained from
``allocate_segment(size) -> (name, writable buffer)``, each at an offset
aligned to ``ALIGN`` bytes.  A buffer that already lies inside a registered
segment (see ``register_segment``; ``SegmentCache`` registers what it maps) is
referenced where it is, without a copy.

Decoding maps each named segment read-only (``SegmentCache``: mmap of
``<dir>/<name>``, cached by name) and hands ``pickle.loads`` memoryviews of
them: numpy arrays come back as read-only views of the segment, with no copy.
"""

import bisect
import io
import mmap
import os
import pickle
import struct
import threading
from collections import OrderedDict

import cloudpickle

from ._wire import _Cursor, ProtocolError

__all__ = [
    "THRESHOLD", "ALIGN", "SHM_DIR", "SegmentError",
    "encode", "encode_args", "decode", "decode_args", "segment_names",
    "register_segment", "unregister_segment", "find_segment",
    "buffer_address", "SegmentCache", "default_cache",
]

THRESHOLD = 64 << 10
"""Buffers of at least this many bytes go out of band."""

ALIGN = 64
"""Alignment of each out-of-band buffer's offset inside a new segment."""

SHM_DIR = os.environ.get("PICLOUD_SHM_DIR", "/dev/shm")
"""Where segments named in encoded values are found (by default)."""

_U32 = struct.Struct("<I")
_ENTRY_TAIL = struct.Struct("<QQ")
_NO_BUFFERS = _U32.pack(0)

# Values that pickle the same with pickle and cloudpickle and hold no buffer
# worth moving out of band: pickled with the C pickler directly.
_PLAIN = frozenset([type(None), bool, int, float, complex, str])


class SegmentError(Exception):
    """A segment could not be obtained or mapped (e.g. the agent refused)."""


# --------------------------------------------------------------------------
# Buffer addresses and the registry of mapped segments

_ctypes_api = None
_ctypes_lock = threading.Lock()


def _buffer_api():
    global _ctypes_api
    if _ctypes_api is not None:
        return _ctypes_api
    with _ctypes_lock:
        if _ctypes_api is not None:
            return _ctypes_api
        import ctypes

        class PyBuffer(ctypes.Structure):   # CPython's Py_buffer
            _fields_ = [
                ("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p),
            ]

        get = ctypes.pythonapi.PyObject_GetBuffer
        get.argtypes = [ctypes.py_object, ctypes.POINTER(PyBuffer), ctypes.c_int]
        get.restype = ctypes.c_int
        release = ctypes.pythonapi.PyBuffer_Release
        release.argtypes = [ctypes.POINTER(PyBuffer)]
        release.restype = None
        _ctypes_api = (PyBuffer, get, release, ctypes.byref)
    return _ctypes_api


def buffer_address(obj):
    """Return ``(address, nbytes)`` of a C-contiguous buffer (read-only is fine)."""
    PyBuffer, get, release, byref = _buffer_api()
    view = PyBuffer()
    get(obj, byref(view), 0)   # PyBUF_SIMPLE: contiguous bytes
    try:
        return view.buf or 0, view.len
    finally:
        release(byref(view))


# Sorted by start address; entries are (start, end, name).  Ranges of live
# mappings never overlap.  Both lists change only under _reg_lock; tokens
# given to unregister_segment wait in _released until the lock is free, since
# it runs from finalizers, which may interrupt this thread while it holds it.
_reg_starts = []
_reg_entries = []
_reg_lock = threading.Lock()
_released = []


def register_segment(name, buffer):
    """Declare that ``buffer`` (a mapping of the whole segment) holds ``name``.

    Buffers found inside it are then referenced by encode() instead of copied.
    Returns a token for unregister_segment(); call that *before* the mapping
    goes away, or a later mapping at the same address would be mistaken for
    this segment.
    """
    start, size = buffer_address(buffer)
    entry = (start, start + size, name)
    with _reg_lock:
        _drop_released()
        i = bisect.bisect_left(_reg_starts, start)
        # An entry at the same address is of a mapping already unmapped
        # whose finalizer has not run yet: live mappings never share one.
        while i < len(_reg_starts) and _reg_starts[i] == start:
            del _reg_starts[i]
            del _reg_entries[i]
        _reg_starts.insert(i, start)
        _reg_entries.insert(i, entry)
    return entry


def unregister_segment(token):
    """Forget a registration made by register_segment (no error if gone).
    Safe from any thread and from finalizers: when the registry is busy, the
    registration is dropped by its next user, before it looks anything up."""
    _released.append(token)
    if _reg_lock.acquire(blocking=False):
        try:
            _drop_released()
        finally:
            _reg_lock.release()


def after_fork_in_child():
    """A forked child starts with fresh locks: another thread of the parent
    may have held one at the fork, and it does not exist here."""
    global _reg_lock, _ctypes_lock
    _reg_lock = threading.Lock()
    _ctypes_lock = threading.Lock()


def _drop_released():
    """Removes the registrations given to unregister_segment (holding _reg_lock)."""
    while _released:
        token = _released.pop()
        i = bisect.bisect_left(_reg_starts, token[0])
        while i < len(_reg_entries) and _reg_starts[i] == token[0]:
            if _reg_entries[i] == token:
                del _reg_starts[i]
                del _reg_entries[i]
                break
            i += 1


def find_segment(address, nbytes):
    """Return ``(name, offset)`` if [address, address+nbytes) lies in a
    registered segment, else None."""
    with _reg_lock:
        _drop_released()
        i = bisect.bisect_right(_reg_starts, address) - 1
        if i < 0:
            return None
        start, end, name = _reg_entries[i]
    if address + nbytes <= end:
        return name, address - start
    return None


# --------------------------------------------------------------------------
# Encoding


class _BigBuffer:
    """Stands for a big ``bytes`` or ``bytearray`` so that its data leaves the
    pickle (the pickler writes those two types in-band whatever the callback
    says).  Pickles as ``bytes(<buffer>)`` or ``bytearray(<buffer>)``: the
    receiver needs nothing from picloud to load it.
    """

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        return type(self.data), (pickle.PickleBuffer(self.data),)


_LIFTED = (bytes, bytearray)


def _lift(value, seen, threshold):
    if type(value) in _LIFTED and len(value) >= threshold:
        wrapper = seen.get(id(value))
        if wrapper is None:
            wrapper = seen[id(value)] = _BigBuffer(value)
        return wrapper
    return value


def _lift_buffers(value, is_args, threshold):
    """Replace big ``bytes``/``bytearray`` objects at the top of a value, or
    among the arguments, by _BigBuffer.  Deeper ones stay in the pickle:
    pickle gives no hook for them."""
    seen = {}
    if is_args:
        args, kwargs = value
        if any(type(a) in _LIFTED for a in args) or any(
                type(v) in _LIFTED for v in kwargs.values()):
            value = (tuple(_lift(a, seen, threshold) for a in args),
                     {k: _lift(v, seen, threshold) for k, v in kwargs.items()})
        return value
    return _lift(value, seen, threshold)


def _all_plain(args_kwargs):
    """Whether every argument of ``(args, kwargs)`` is of a plain type, which
    the standard pickler writes as cloudpickle would, with no buffers."""
    args, kwargs = args_kwargs
    return all(type(a) in _PLAIN for a in args) and all(type(v) in _PLAIN for v in kwargs.values())


def encode(value, allocate_segment=None, *, threshold=THRESHOLD,
           _is_args=False):
    """Encode ``value``; return ``(data, segment_names)``.

    ``allocate_segment(size) -> (name, buffer)`` is called at most once, for
    all buffers of at least ``threshold`` bytes that do not already lie in a
    registered segment; ``buffer`` must be writable and at least ``size``
    bytes.  Without ``allocate_segment`` such buffers stay in the pickle.
    ``segment_names`` lists every segment the data refers to (in order of
    first use): the holder of ``data`` must keep them alive.  Exceptions from
    pickling or from ``allocate_segment`` propagate.
    """
    if type(value) in _PLAIN or (_is_args and _all_plain(value)):
        data = pickle.dumps(value, 5)
        return b"".join((_NO_BUFFERS, _U32.pack(len(data)), data)), []

    value = _lift_buffers(value, _is_args, threshold)
    # Per out-of-band buffer, in pickle order: [raw view, name, offset];
    # name is None for buffers to copy into the new segment.
    oob = []
    check_registry = bool(_reg_entries)

    def callback(pb):
        raw = pb.raw()
        n = raw.nbytes
        if n < threshold:
            return True
        if check_registry:
            found = find_segment(buffer_address(raw)[0], n)
            if found is not None:
                oob.append([raw, found[0], found[1]])
                return False
        if allocate_segment is None:
            return True
        oob.append([raw, None, 0])
        return False

    out = io.BytesIO()
    cloudpickle.CloudPickler(out, protocol=5, buffer_callback=callback).dump(value)
    del value
    data = out.getbuffer()

    names = []
    if oob:
        size = 0
        for entry in oob:
            if entry[1] is None:
                entry[2] = size
                size += (entry[0].nbytes + ALIGN - 1) // ALIGN * ALIGN
        if size:
            name, target = allocate_segment(size)
            dst = memoryview(target)
            try:
                if dst.format != "B" or dst.ndim != 1:
                    dst = dst.cast("B")
                if dst.readonly or dst.nbytes < size:
                    raise SegmentError(
                        f"segment {name!r} is not a writable buffer of "
                        f"{size} bytes")
                for entry in oob:
                    if entry[1] is None:
                        raw, off = entry[0], entry[2]
                        dst[off:off + raw.nbytes] = raw
                        entry[1] = name
            finally:
                dst.release()
            del target
        header = [_U32.pack(len(oob))]
        for raw, name, off in oob:
            encoded = name.encode("utf-8")
            header.append(_U32.pack(len(encoded)))
            header.append(encoded)
            header.append(_ENTRY_TAIL.pack(off, raw.nbytes))
            if name not in names:
                names.append(name)
            raw.release()
        oob.clear()
    else:
        header = [_NO_BUFFERS]
    header.append(_U32.pack(len(data)))
    header.append(data)
    result = b"".join(header)
    data.release()
    return result, names


def encode_args(args, kwargs, allocate_segment=None, *, threshold=THRESHOLD):
    """Encode the arguments of a call, as ``(args_tuple, kwargs_dict)``."""
    return encode((tuple(args), dict(kwargs)), allocate_segment,
                  threshold=threshold, _is_args=True)


# --------------------------------------------------------------------------
# Decoding


def _parse(data):
    """Split encoded data into ``([(name, offset, length)], pickle_view)``."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    c = _Cursor(view)
    try:
        entries = [(c.str(), c.u64(), c.u64()) for _ in range(c.count(20))]
        pickled = c.bytes()
        if c.pos != c.end:
            raise ProtocolError(f"{c.end - c.pos} bytes after the pickle")
    except ProtocolError as e:
        raise ValueError(f"malformed encoded value: {e}") from None
    return entries, pickled


def segment_names(data):
    """The names of the segments encoded ``data`` refers to (first use order)."""
    names = []
    for name, _, _ in _parse(data)[0]:
        if name not in names:
            names.append(name)
    return names


def decode(data, map_segment=None):
    """Decode ``data`` made by encode().

    ``map_segment(name)`` returns a buffer over the whole segment (default:
    ``default_cache()``, read-only mappings of ``SHM_DIR/<name>``).  The
    out-of-band buffers reach ``pickle.loads`` as memoryviews of it, without
    a copy.
    """
    # The usual case, no out-of-band buffer: the header is read here rather
    # than by the general parser, which costs more than unpickling a small
    # value.
    kind = type(data)
    if (kind is bytes or kind is memoryview and data.format == "B" and data.ndim == 1) and len(data) >= 8 \
            and data[:4] == _NO_BUFFERS and _U32.unpack_from(data, 4)[0] == len(data) - 8:
        return pickle.loads(memoryview(data)[8:])
    entries, pickled = _parse(data)
    if not entries:
        return pickle.loads(pickled)
    if map_segment is None:
        map_segment = default_cache()
    buffers = []
    for name, offset, length in entries:
        seg = map_segment(name)
        seg = seg if type(seg) is memoryview else memoryview(seg)
        if seg.format != "B":
            seg = seg.cast("B")
        if offset + length > seg.nbytes:
            raise ValueError(
                f"buffer [{offset}, {offset + length}) is outside segment "
                f"{name!r} of {seg.nbytes} bytes")
        buffers.append(seg[offset:offset + length])
    return pickle.loads(pickled, buffers=buffers)


def decode_args(data, map_segment=None):
    """Decode call arguments; return ``(args_tuple, kwargs_dict)``."""
    value = decode(data, map_segment)
    if (type(value) is not tuple or len(value) != 2
            or type(value[0]) is not tuple or type(value[1]) is not dict):
        raise TypeError(
            f"encoded arguments are not an (args tuple, kwargs dict) pair "
            f"but {type(value).__name__}")
    return value


# --------------------------------------------------------------------------
# Read-only mappings of segments, kept between uses


def _check_name(name):
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise SegmentError(f"invalid segment name {name!r}")


class SegmentCache:
    """Read-only mappings of segments by name, kept for reuse (LRU, ``limit``).

    Calling the cache with a name returns a read-only memoryview of the whole
    segment; use it as decode()'s ``map_segment``.  A cached mapping is reused
    while the file at its path is the same (device, inode, size); a file that
    was removed or replaced is mapped again, and mappings of removed files are
    dropped whenever a new segment is mapped, so that they do not pin memory.
    Each mapping is registered (register_segment) while cached, so buffers in
    it are referenced rather than copied when encoded again.
    """

    def __init__(self, directory=None, limit=64):
        self.directory = SHM_DIR if directory is None else directory
        self.limit = limit
        self._maps = OrderedDict()   # name -> (identity, view, token, path)

    def path(self, name):
        _check_name(name)
        return os.path.join(self.directory, name)

    def __call__(self, name):
        return self.view(name)

    def view(self, name):
        path = self.path(name)
        entry = self._maps.get(name)
        if entry is not None:
            try:
                st = os.stat(path)
                same = (st.st_dev, st.st_ino, st.st_size) == entry[0]
            except OSError:
                same = False
            if same:
                self._maps.move_to_end(name)
                return entry[1]
            self.drop(name)
        return self._map(name, path)

    def _map(self, name, path):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SegmentError(f"cannot open segment {name!r}: {e}") from None
        try:
            st = os.fstat(fd)
            if st.st_size == 0:
                raise SegmentError(f"segment {name!r} is empty")
            mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
        except OSError as e:
            raise SegmentError(f"cannot map segment {name!r}: {e}") from None
        finally:
            os.close(fd)
        view = memoryview(mm)
        token = register_segment(name, view)
        self._sweep()
        self._maps[name] = ((st.st_dev, st.st_ino, st.st_size), view, token,
                            path)
        while len(self._maps) > self.limit:
            self.drop(next(iter(self._maps)))
        return view

    def _sweep(self):
        """Drop mappings whose file is gone or replaced."""
        for name, (ident, _, _, path) in list(self._maps.items()):
            try:
                st = os.stat(path)
                alive = (st.st_dev, st.st_ino, st.st_size) == ident
            except OSError:
                alive = False
            if not alive:
                self.drop(name)

    def drop(self, name):
        """Forget a mapping; it is unmapped once no view of it is in use."""
        entry = self._maps.pop(name, None)
        if entry is not None:
            unregister_segment(entry[2])

    def clear(self):
        for name in list(self._maps):
            self.drop(name)

    def __contains__(self, name):
        return name in self._maps

    def __len__(self):
        return len(self._maps)


_default_cache = None


def default_cache():
    """The process-wide SegmentCache over ``SHM_DIR``."""
    global _default_cache
    if _default_cache is None:
        _default_cache = SegmentCache()
    return _default_cache
