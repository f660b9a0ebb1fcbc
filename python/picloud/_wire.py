"""Frame codec for the worker socket and the agent's local socket.

Every message is one frame (docs/workers.md, "Frames")::

    u32 LE  length of what follows (kind + body), 1 .. MAX_FRAME
    u8      kind
    ...     body

Kinds 1 and 2 mean different messages in the two directions of the worker
socket (READY/DONE from the worker, TASK/EXIT to it), so decoding always takes
a *direction*: one of four tables mapping a kind to its parser, each accepting
only what that side of that socket may send:

    WORKER_TO_AGENT   READY, DONE, SEGMENT_CREATE         (worker socket)
    AGENT_TO_WORKER   TASK, EXIT, SEGMENT, ERROR          (worker socket)
    CLIENT_TO_AGENT   SEGMENT_CREATE, SEGMENT_RELEASE, SEGMENT_HOLD
    AGENT_TO_CLIENT   SEGMENT, OK, ERROR

Decoded ``bytes`` fields are read-only memoryviews into the frame body (no
copy); call ``bytes()`` on one to keep it apart from the frame.  They compare
equal to ``bytes`` objects.  ``str`` fields are strict UTF-8.

Any frame that does not parse exactly (unknown kind, length over the limit,
body too short or with bytes left over, invalid UTF-8) raises
``ProtocolError``; the caller is expected to drop the connection.
"""

import struct
from typing import NamedTuple

__all__ = [
    "MAX_FRAME", "ProtocolError", "FrameTooLarge",
    "READY", "DONE", "TASK", "EXIT",
    "SEGMENT_CREATE", "SEGMENT", "SEGMENT_RELEASE", "OK", "ERROR",
    "SEGMENT_HOLD",
    "Ready", "Done", "Task", "Exit", "SegmentCreate", "Segment",
    "SegmentRelease", "Ok", "Error", "SegmentHold",
    "WORKER_TO_AGENT", "AGENT_TO_WORKER", "CLIENT_TO_AGENT", "AGENT_TO_CLIENT",
    "encode_frame", "frame_parts", "decode_frame", "decode_body",
    "send_message", "FrameReader",
]

MAX_FRAME = 64 << 20
"""Largest allowed value of the length prefix (kind byte + body)."""

# Worker -> agent.
READY = 1
DONE = 2
# Agent -> worker.
TASK = 1
EXIT = 2
# Agent's local socket (SEGMENT_CREATE/SEGMENT/ERROR also on the worker socket).
SEGMENT_CREATE = 10
SEGMENT = 11
SEGMENT_RELEASE = 12
OK = 13
ERROR = 14
SEGMENT_HOLD = 15

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEAD = struct.Struct("<IB")          # length prefix + kind
_TAG_STATUS = struct.Struct("<QB")    # DONE
_TAG_KEY = struct.Struct("<QQ")       # TASK
_PID = struct.Struct("<I")            # READY

# send_message() sends parts at least this big as their own iovec instead of
# joining them into one buffer.
_BIG_PART = 32 << 10


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame: drop the connection."""


class FrameTooLarge(ValueError):
    """A message to send would not fit in one frame (``MAX_FRAME``)."""


# --------------------------------------------------------------------------
# Messages


class Ready(NamedTuple):
    pid: int
    python_version: str
    KIND = READY


class Done(NamedTuple):
    tag: int
    status: int                 # 0 returned, 1 raised, 2 could not load
    result: bytes
    error: str
    traceback: str
    stdout: bytes
    stderr: bytes
    segments: list              # list[str]
    KIND = DONE


class Task(NamedTuple):
    tag: int
    function_key: int
    function: bytes             # empty: use the cached function_key
    args: bytes
    workdir: str
    env: list                   # list[tuple[str, str]]
    KIND = TASK


class Exit(NamedTuple):
    KIND = EXIT


class SegmentCreate(NamedTuple):
    size: int
    KIND = SEGMENT_CREATE


class Segment(NamedTuple):
    name: str
    path: str
    size: int
    KIND = SEGMENT


class SegmentRelease(NamedTuple):
    name: str
    KIND = SEGMENT_RELEASE


class SegmentHold(NamedTuple):
    name: str
    KIND = SEGMENT_HOLD


class Ok(NamedTuple):
    KIND = OK


class Error(NamedTuple):
    message: str
    KIND = ERROR


# --------------------------------------------------------------------------
# Encoding: each encoder appends the body's pieces to a list.


def _put_bytes(out, data):
    if type(data) is not bytes:
        data = memoryview(data).cast("B")   # TypeError if not contiguous
    out.append(_U32.pack(len(data)))
    out.append(data)


def _put_str(out, text):
    data = text.encode("utf-8")
    out.append(_U32.pack(len(data)))
    out.append(data)


def _enc_ready(m, out):
    out.append(_PID.pack(m.pid))
    _put_str(out, m.python_version)


def _enc_done(m, out):
    out.append(_TAG_STATUS.pack(m.tag, m.status))
    _put_bytes(out, m.result)
    _put_str(out, m.error)
    _put_str(out, m.traceback)
    _put_bytes(out, m.stdout)
    _put_bytes(out, m.stderr)
    out.append(_U32.pack(len(m.segments)))
    for name in m.segments:
        _put_str(out, name)


def _enc_task(m, out):
    out.append(_TAG_KEY.pack(m.tag, m.function_key))
    _put_bytes(out, m.function)
    _put_bytes(out, m.args)
    _put_str(out, m.workdir)
    out.append(_U32.pack(len(m.env)))
    for key, value in m.env:
        _put_str(out, key)
        _put_str(out, value)


def _enc_empty(m, out):
    pass


def _enc_size(m, out):
    out.append(_U64.pack(m.size))


def _enc_segment(m, out):
    _put_str(out, m.name)
    _put_str(out, m.path)
    out.append(_U64.pack(m.size))


def _enc_name(m, out):
    _put_str(out, m.name)


def _enc_message(m, out):
    _put_str(out, m.message)


_ENCODERS = {
    Ready: _enc_ready, Done: _enc_done, Task: _enc_task, Exit: _enc_empty,
    SegmentCreate: _enc_size, Segment: _enc_segment,
    SegmentRelease: _enc_name, SegmentHold: _enc_name, Ok: _enc_empty,
    Error: _enc_message,
}


def frame_parts(msg):
    """Return ``(total, parts)``: the frame of ``msg`` as a list of buffers.

    ``parts[0]`` is the length prefix and kind; bytes fields are not copied.
    ``total`` is the frame's size in bytes.  Raises ``FrameTooLarge`` if the
    frame would exceed ``MAX_FRAME``, ``struct.error`` if an integer does not
    fit its field.
    """
    try:
        encoder = _ENCODERS[type(msg)]
    except KeyError:
        raise TypeError(f"not a frame message: {type(msg).__name__}") from None
    parts = [b""]
    encoder(msg, parts)
    length = 1
    for p in parts:
        length += len(p)
    if length > MAX_FRAME:
        raise FrameTooLarge(
            f"{type(msg).__name__} frame of {length} bytes exceeds the "
            f"{MAX_FRAME}-byte limit")
    parts[0] = _HEAD.pack(length, msg.KIND)
    return length + 4, parts


def encode_frame(msg):
    """Return the whole frame of ``msg`` as one ``bytes`` object."""
    return b"".join(frame_parts(msg)[1])


def send_message(sock, msg):
    """Send ``msg`` as one frame on a blocking stream socket.

    Small frames go out with one ``sendall``; big bytes fields are passed to
    ``sendmsg`` as their own iovecs rather than copied into one buffer.
    """
    total, parts = frame_parts(msg)
    if total < _BIG_PART:
        sock.sendall(b"".join(parts))
        return
    # Join runs of small parts, keep big ones as they are.
    iov = []
    run = bytearray()
    for p in parts:
        if len(p) >= _BIG_PART:
            if run:
                iov.append(bytes(run))
                run.clear()
            iov.append(p)
        else:
            run += p
    if run:
        iov.append(bytes(run))
    while iov:
        sent = sock.sendmsg(iov)
        # Drop what went out; a partial send leaves a tail of one part.
        while iov and sent >= len(iov[0]):
            sent -= len(iov[0])
            del iov[0]
        if sent:
            iov[0] = memoryview(iov[0])[sent:]


# --------------------------------------------------------------------------
# Decoding


class _Cursor:
    """Reads fields from a body (a 1-D unsigned-byte memoryview)."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf):
        self.buf = buf
        self.pos = 0
        self.end = len(buf)

    def _short(self, need, what):
        raise ProtocolError(
            f"body too short: {what} needs {need} bytes at offset {self.pos}, "
            f"{self.end - self.pos} left")

    def u8(self):
        p = self.pos
        if p >= self.end:
            self._short(1, "u8")
        self.pos = p + 1
        return self.buf[p]

    def u32(self):
        p = self.pos
        if p + 4 > self.end:
            self._short(4, "u32")
        self.pos = p + 4
        return _U32.unpack_from(self.buf, p)[0]

    def u64(self):
        p = self.pos
        if p + 8 > self.end:
            self._short(8, "u64")
        self.pos = p + 8
        return _U64.unpack_from(self.buf, p)[0]

    def bytes(self):
        n = self.u32()
        p = self.pos
        if p + n > self.end:
            self._short(n, "bytes field")
        self.pos = p + n
        return self.buf[p:p + n]

    def str(self):
        raw = self.bytes()
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"str field is not valid UTF-8: {e}") from None

    def count(self, min_item):
        """A list count, checked against the bytes left (each item >= min_item)."""
        n = self.u32()
        if n * min_item > self.end - self.pos:
            raise ProtocolError(
                f"list of {n} items cannot fit in the {self.end - self.pos} "
                f"bytes left")
        return n

    def finish(self, msg):
        if self.pos != self.end:
            raise ProtocolError(
                f"{self.end - self.pos} bytes left over after a "
                f"{type(msg).__name__} body")
        return msg


def _dec_ready(c):
    return c.finish(Ready(c.u32(), c.str()))


def _dec_done(c):
    tag = c.u64()
    status = c.u8()
    if status > 2:
        raise ProtocolError(f"DONE status {status} is not 0, 1 or 2")
    result = c.bytes()
    error = c.str()
    tb = c.str()
    out = c.bytes()
    err = c.bytes()
    segments = [c.str() for _ in range(c.count(4))]
    return c.finish(Done(tag, status, result, error, tb, out, err, segments))


def _dec_task(c):
    tag = c.u64()
    key = c.u64()
    function = c.bytes()
    args = c.bytes()
    workdir = c.str()
    env = [(c.str(), c.str()) for _ in range(c.count(8))]
    return c.finish(Task(tag, key, function, args, workdir, env))


def _dec_exit(c):
    return c.finish(Exit())


def _dec_segment_create(c):
    return c.finish(SegmentCreate(c.u64()))


def _dec_segment(c):
    return c.finish(Segment(c.str(), c.str(), c.u64()))


def _dec_segment_release(c):
    return c.finish(SegmentRelease(c.str()))


def _dec_segment_hold(c):
    return c.finish(SegmentHold(c.str()))


def _dec_ok(c):
    return c.finish(Ok())


def _dec_error(c):
    return c.finish(Error(c.str()))


# Directions: which kinds a reader accepts, and how it parses them.
WORKER_TO_AGENT = {READY: _dec_ready, DONE: _dec_done,
                   SEGMENT_CREATE: _dec_segment_create}
AGENT_TO_WORKER = {TASK: _dec_task, EXIT: _dec_exit,
                   SEGMENT: _dec_segment, ERROR: _dec_error}
CLIENT_TO_AGENT = {SEGMENT_CREATE: _dec_segment_create,
                   SEGMENT_RELEASE: _dec_segment_release,
                   SEGMENT_HOLD: _dec_segment_hold}
AGENT_TO_CLIENT = {SEGMENT: _dec_segment, OK: _dec_ok, ERROR: _dec_error}

_DIRECTION_NAMES = {
    id(WORKER_TO_AGENT): "worker-to-agent",
    id(AGENT_TO_WORKER): "agent-to-worker",
    id(CLIENT_TO_AGENT): "client-to-agent",
    id(AGENT_TO_CLIENT): "agent-to-client",
}


def _parser(kind, direction):
    try:
        return direction[kind]
    except KeyError:
        name = _DIRECTION_NAMES.get(id(direction), "this")
        raise ProtocolError(
            f"unknown frame kind {kind} on a {name} stream") from None


def decode_body(kind, body, direction):
    """Parse the body of a frame of ``kind`` read in ``direction``."""
    view = memoryview(body)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if not view.readonly:
        view = view.toreadonly()
    return _parser(kind, direction)(_Cursor(view))


def decode_frame(data, direction):
    """Parse one complete frame (length prefix included); nothing may follow."""
    view = memoryview(data).cast("B")
    if len(view) < 5:
        raise ProtocolError(f"a frame needs at least 5 bytes, got {len(view)}")
    length, kind = _HEAD.unpack_from(view)
    _check_length(length)
    if len(view) != 4 + length:
        raise ProtocolError(
            f"frame announces {length} bytes after its prefix, "
            f"{len(view) - 4} present")
    return decode_body(kind, view[5:], direction)


def _check_length(length):
    if length == 0:
        raise ProtocolError("frame length 0: no kind byte")
    if length > MAX_FRAME:
        raise ProtocolError(
            f"frame length {length} exceeds the {MAX_FRAME}-byte limit")


class FrameReader:
    """Reads whole frames from a blocking stream socket.

    Small frames are parsed out of one reusable receive buffer, so a burst of
    them costs one ``recv_into``; a frame larger than that buffer is received
    straight into its own ``bytearray``.
    """

    def __init__(self, sock, direction, bufsize=64 << 10):
        self._sock = sock
        self._direction = direction
        self._buf = bytearray(bufsize)
        self._view = memoryview(self._buf)
        self._start = 0     # first unconsumed byte in _buf
        self._end = 0       # end of received data in _buf

    def _fill(self):
        """Receive more into the buffer; False at EOF."""
        if self._end == len(self._buf):
            # Move the unconsumed tail to the front to make room.
            n = self._end - self._start
            self._buf[:n] = self._view[self._start:self._end]
            self._start, self._end = 0, n
        got = self._sock.recv_into(self._view[self._end:])
        self._end += got
        return got > 0

    def read_frame(self):
        """Return ``(kind, body)`` of the next frame, or None at a clean EOF.

        Raises ``ProtocolError`` for a bad length or kind, or EOF inside a
        frame.  ``body`` stays valid after later reads.
        """
        while self._end - self._start < 5:
            if not self._fill():
                have = self._end - self._start
                if have == 0:
                    return None
                raise ProtocolError(
                    f"connection closed inside a frame header ({have} of 5 "
                    f"bytes)")
        length, kind = _HEAD.unpack_from(self._buf, self._start)
        _check_length(length)
        _parser(kind, self._direction)        # reject unknown kinds early
        body_len = length - 1
        total = 5 + body_len
        if total <= len(self._buf):
            # The usual case: the frame fits the receive buffer.
            if self._start + total > len(self._buf):
                n = self._end - self._start
                self._buf[:n] = self._view[self._start:self._end]
                self._start, self._end = 0, n
            while self._end - self._start < total:
                got = self._sock.recv_into(self._view[self._end:])
                if not got:
                    self._eof_in_body(body_len, self._end - self._start - 5)
                self._end += got
            start = self._start + 5
            body = bytes(self._view[start:start + body_len])
            self._start += total
            if self._start == self._end:
                self._start = self._end = 0
            return kind, body
        # A big frame: its own buffer, received into directly.
        body = bytearray(body_len)
        out = memoryview(body)
        have = self._end - self._start - 5
        out[:have] = self._view[self._start + 5:self._end]
        self._start = self._end = 0
        pos = have
        recv_into = self._sock.recv_into
        while pos < body_len:
            got = recv_into(out[pos:])
            if not got:
                self._eof_in_body(body_len, pos)
            pos += got
        return kind, body

    @staticmethod
    def _eof_in_body(need, have):
        raise ProtocolError(
            f"connection closed inside a frame body ({have} of {need} bytes)")

    def read(self):
        """Return the next decoded message, or None at a clean EOF."""
        frame = self.read_frame()
        if frame is None:
            return None
        kind, body = frame
        view = memoryview(body)
        if not view.readonly:
            view = view.toreadonly()
        return self._direction[kind](_Cursor(view))
