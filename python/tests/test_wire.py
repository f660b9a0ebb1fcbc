"""Frame codec: round trips, exact layout, strict parsing, reading from sockets."""

import array
import os
import socket
import struct
import threading

import pytest

from picloud import _wire as W
from picloud._wire import ProtocolError

TIMEOUT = 10

ALL_MESSAGES = [
    (W.Ready(4242, "3.11.7"), [W.WORKER_TO_AGENT]),
    (W.Done(2**64 - 1, 1, b"\x00res", "ValueError: boom", "Traceback ...\n",
            b"out\n", b"err\xff", ["picloud-a-1", "picloud-a-2"]),
     [W.WORKER_TO_AGENT]),
    (W.Done(0, 0, b"", "", "", b"", b"", []), [W.WORKER_TO_AGENT]),
    (W.Task(7, 2**63, b"fn", b"args", "/tmp/wd",
            [("A", "1"), ("EMPTY", ""), ("ÜNI", "cödé ✓")]),
     [W.AGENT_TO_WORKER]),
    (W.Task(1, 0, b"", b"", "", []), [W.AGENT_TO_WORKER]),
    (W.Exit(), [W.AGENT_TO_WORKER]),
    (W.SegmentCreate(1 << 40), [W.WORKER_TO_AGENT, W.CLIENT_TO_AGENT]),
    (W.Segment("picloud-x-3", "/dev/shm/picloud-x-3", 4096),
     [W.AGENT_TO_WORKER, W.AGENT_TO_CLIENT]),
    (W.SegmentRelease("picloud-x-3"), [W.CLIENT_TO_AGENT]),
    (W.SegmentHold("picloud-x-4"), [W.CLIENT_TO_AGENT]),
    (W.Ok(), [W.AGENT_TO_CLIENT]),
    (W.Error("quota of user 1000 exceeded"),
     [W.AGENT_TO_WORKER, W.AGENT_TO_CLIENT]),
]


def normalize(msg):
    """Messages with bytes fields as bytes (decoding gives memoryviews)."""
    return type(msg)(*[bytes(f) if isinstance(f, memoryview) else f
                       for f in msg])


@pytest.mark.parametrize("msg,directions", ALL_MESSAGES,
                         ids=lambda v: type(v).__name__ if isinstance(v, tuple) else "")
def test_round_trip_every_kind(msg, directions):
    frame = W.encode_frame(msg)
    (length,) = struct.unpack_from("<I", frame)
    assert length == len(frame) - 4
    assert frame[4] == msg.KIND
    for direction in directions:
        back = W.decode_frame(frame, direction)
        assert type(back) is type(msg)
        assert normalize(back) == msg


def test_exact_layout_of_ready_and_segment_create():
    assert W.encode_frame(W.Ready(0x01020304, "3.11")) == (
        b"\x0d\x00\x00\x00"          # length: kind 1 + pid 4 + str 4+4
        b"\x01"
        b"\x04\x03\x02\x01"
        b"\x04\x00\x00\x00" b"3.11")
    assert W.encode_frame(W.SegmentCreate(0x1122334455667788)) == (
        b"\x09\x00\x00\x00\x0a" b"\x88\x77\x66\x55\x44\x33\x22\x11")
    assert W.encode_frame(W.SegmentHold("ab")) == (
        b"\x07\x00\x00\x00\x0f" b"\x02\x00\x00\x00ab")


def test_exact_layout_of_task():
    frame = W.encode_frame(W.Task(5, 6, b"F", b"AA", "/w", [("K", "V")]))
    body = (struct.pack("<QQ", 5, 6) + b"\x01\x00\x00\x00F"
            + b"\x02\x00\x00\x00AA" + b"\x02\x00\x00\x00/w"
            + b"\x01\x00\x00\x00" + b"\x01\x00\x00\x00K" + b"\x01\x00\x00\x00V")
    assert frame == struct.pack("<IB", len(body) + 1, 1) + body


def test_kinds_one_and_two_depend_on_direction():
    frame = W.encode_frame(W.Exit())
    assert W.decode_frame(frame, W.AGENT_TO_WORKER) == W.Exit()
    with pytest.raises(ProtocolError):        # kind 2 = DONE: body too short
        W.decode_frame(frame, W.WORKER_TO_AGENT)


def test_decoded_bytes_fields_are_read_only_views():
    back = W.decode_frame(W.encode_frame(W.Task(1, 2, b"fn", b"ar", "", [])),
                          W.AGENT_TO_WORKER)
    assert isinstance(back.function, memoryview)
    assert back.function.readonly
    assert back.function == b"fn" and back.args == b"ar"


def test_bytes_field_from_a_typed_buffer_counts_bytes():
    data = array.array("d", [1.0, 2.0, 3.0])
    frame = W.encode_frame(W.Done(1, 0, data, "", "", b"", b"", []))
    back = W.decode_frame(frame, W.WORKER_TO_AGENT)
    assert bytes(back.result) == data.tobytes()
    assert len(back.result) == 24


# --------------------------------------------------------------------------
# Strict parsing


def frame(kind, body):
    return struct.pack("<IB", len(body) + 1, kind) + body


def test_unknown_kind():
    with pytest.raises(ProtocolError, match="unknown frame kind 3"):
        W.decode_frame(frame(3, b""), W.AGENT_TO_WORKER)
    # SEGMENT_CREATE is known, but not from the agent to a worker.
    with pytest.raises(ProtocolError, match="unknown frame kind 10"):
        W.decode_frame(W.encode_frame(W.SegmentCreate(1)), W.AGENT_TO_WORKER)


def test_short_body():
    good = W.encode_frame(W.Segment("n", "/p", 9))
    cut = good[5:-1]
    with pytest.raises(ProtocolError, match="too short"):
        W.decode_frame(frame(W.SEGMENT, cut), W.AGENT_TO_CLIENT)
    # A bytes field whose length runs past the end.
    with pytest.raises(ProtocolError, match="too short"):
        W.decode_frame(frame(W.ERROR, b"\x10\x00\x00\x00abc"), W.AGENT_TO_CLIENT)


def test_trailing_bytes():
    with pytest.raises(ProtocolError, match="1 bytes left over"):
        W.decode_frame(frame(W.EXIT, b"x"), W.AGENT_TO_WORKER)
    good = W.encode_frame(W.Error("m"))
    with pytest.raises(ProtocolError, match="left over"):
        W.decode_frame(frame(W.ERROR, good[5:] + b"\0\0"), W.AGENT_TO_CLIENT)


def test_length_prefix_must_match_and_be_in_range():
    good = W.encode_frame(W.Ok())
    with pytest.raises(ProtocolError):
        W.decode_frame(good + b"x", W.AGENT_TO_CLIENT)
    with pytest.raises(ProtocolError, match="exceeds"):
        W.decode_frame(struct.pack("<IB", W.MAX_FRAME + 1, W.OK),
                       W.AGENT_TO_CLIENT)
    with pytest.raises(ProtocolError, match="length 0"):
        W.decode_frame(struct.pack("<IB", 0, W.OK), W.AGENT_TO_CLIENT)


def test_invalid_utf8():
    with pytest.raises(ProtocolError, match="UTF-8"):
        W.decode_frame(frame(W.ERROR, b"\x02\x00\x00\x00\xc3\x28"),
                       W.AGENT_TO_CLIENT)


def test_done_status_must_be_0_1_or_2():
    good = W.encode_frame(W.Done(1, 2, b"", "", "", b"", b"", []))
    W.decode_frame(good, W.WORKER_TO_AGENT)
    bad = bytearray(good)
    bad[5 + 8] = 3
    with pytest.raises(ProtocolError, match="status 3"):
        W.decode_frame(bytes(bad), W.WORKER_TO_AGENT)


def test_list_count_larger_than_the_body_is_rejected():
    body = struct.pack("<QQ", 1, 1) + b"\0" * 12 + struct.pack("<I", 10**9)
    with pytest.raises(ProtocolError, match="cannot fit"):
        W.decode_frame(frame(W.TASK, body), W.AGENT_TO_WORKER)


def test_encoding_refuses_a_frame_over_the_limit():
    big = memoryview(bytearray(W.MAX_FRAME))
    W.encode_frame(W.Error("x" * (W.MAX_FRAME - 5)))      # exactly the limit
    with pytest.raises(W.FrameTooLarge, match="exceeds"):
        W.encode_frame(W.Done(1, 0, big, "", "", b"", b"", []))


def test_encoding_refuses_integers_that_do_not_fit():
    with pytest.raises(struct.error):
        W.encode_frame(W.SegmentCreate(2**64))
    with pytest.raises(struct.error):
        W.encode_frame(W.Done(1, 256, b"", "", "", b"", b"", []))


# --------------------------------------------------------------------------
# Reading from sockets


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    yield a, b
    a.close()
    b.close()


def test_burst_of_small_frames_and_clean_eof(pair):
    a, b = pair
    msgs = [W.Task(i, i * 3, b"f" * i, b"a" * (i % 7), f"/d{i}", [("K", str(i))])
            for i in range(200)] + [W.Exit()]
    a.sendall(b"".join(W.encode_frame(m) for m in msgs))
    a.shutdown(socket.SHUT_WR)
    reader = W.FrameReader(b, W.AGENT_TO_WORKER)
    got = []
    while True:
        m = reader.read()
        if m is None:
            break
        got.append(normalize(m))
    assert got == msgs
    assert reader.read() is None      # EOF stays EOF


@pytest.mark.parametrize("bufsize", [16, 64, 1 << 16])
def test_frames_split_across_reads_and_buffer_sizes(pair, bufsize):
    """Byte-at-a-time delivery, small buffers (compaction) and big frames."""
    a, b = pair
    msgs = [W.Error("x" * n) for n in (0, 3, 10, 11, 40, 100, 5000, 70000)]
    data = b"".join(W.encode_frame(m) for m in msgs)

    def feed():
        for i in range(0, 300):                 # the first frames byte by byte
            a.sendall(data[i:i + 1])
        a.sendall(data[300:])
        a.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=feed)
    t.start()
    reader = W.FrameReader(b, W.AGENT_TO_CLIENT, bufsize=bufsize)
    got = [reader.read() for _ in msgs]
    assert reader.read() is None
    t.join()
    assert got == msgs


def test_big_frame_with_partial_sends(pair):
    """send_message loops over partial sendmsg() calls (timeout sockets are
    non-blocking underneath); the reader receives straight into the body."""
    a, b = pair
    payload = bytes(range(256)) * (40 << 10)          # 10 MiB
    msg = W.Done(9, 0, payload, "e", "t", b"o" * 100, b"", ["s"])
    t = threading.Thread(target=W.send_message, args=(a, msg))
    t.start()
    reader = W.FrameReader(b, W.WORKER_TO_AGENT)
    got = reader.read()
    t.join()
    assert got.tag == 9 and got.segments == ["s"]
    assert got.result == payload
    assert bytes(got.stdout) == b"o" * 100


def test_eof_inside_header_or_body_is_an_error(pair):
    a, b = pair
    a.sendall(b"\x05\x00")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError, match="inside a frame header"):
        W.FrameReader(b, W.AGENT_TO_CLIENT).read()


@pytest.mark.parametrize("size", [100, 200000])
def test_eof_inside_body_is_an_error(pair, size):
    a, b = pair
    a.sendall(W.encode_frame(W.Error("z" * size))[:-1])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError, match="inside a frame body"):
        W.FrameReader(b, W.AGENT_TO_CLIENT).read()


def test_reader_rejects_bad_header_without_waiting_for_the_body(pair):
    a, b = pair
    # The peer keeps the connection open: the reader must not wait for 64 MiB.
    a.sendall(struct.pack("<IB", W.MAX_FRAME + 1, W.OK))
    with pytest.raises(ProtocolError, match="exceeds"):
        W.FrameReader(b, W.AGENT_TO_CLIENT).read()
    a.sendall(struct.pack("<IB", 1000, 99))
    with pytest.raises(ProtocolError, match="unknown frame kind 99"):
        W.FrameReader(b, W.AGENT_TO_CLIENT).read()


def test_importing_picloud_and_the_codec_stays_light():
    import subprocess
    import sys
    code = ("import sys, picloud, picloud._wire; "
            "print(picloud.__version__, sorted(m for m in "
            "('numpy', 'cloudpickle', 'pickle') if m in sys.modules))")
    env = {"PYTHONPATH": os.path.dirname(os.path.dirname(W.__file__)),
           "PATH": os.environ.get("PATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.split(maxsplit=1) == ["0.1.0", "[]\n"]
