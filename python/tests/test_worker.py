"""The worker process, driven through its socket as the node agent would."""

import hashlib
import importlib
import inspect
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading

import cloudpickle
import numpy as np
import pytest

from picloud import _payload, _wire
from picloud.worker import EX_PROTOCOL, FUNCTION_CACHE_SIZE, OUTPUT_CAP

# The functions below are sent by value: the worker cannot import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 30


class Agent:
    """Plays the node agent for one worker process."""

    def __init__(self, tmp_path, fd3=False, shm=None):
        self.shm = shm
        self.sock, child = socket.socketpair()
        self.sock.settimeout(TIMEOUT)
        self.home = tmp_path / "home"
        self.home.mkdir(exist_ok=True)
        self.log_out = open(tmp_path / "worker.stdout", "w+b")
        self.log_err = open(tmp_path / "worker.stderr", "w+b")
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
        env.pop("PICLOUD_WORKER_FD", None)
        env.pop("PYTHONUNBUFFERED", None)   # buffered stdio, as under the agent
        kw = {}
        if fd3:
            # As the agent does it: the socket is fd 3, no variable needed.
            n = child.fileno()

            def to_fd3():
                if n == 3:
                    os.set_inheritable(3, True)
                else:
                    os.dup2(n, 3)
            kw = dict(close_fds=False, preexec_fn=to_fd3)
        else:
            env["PICLOUD_WORKER_FD"] = str(child.fileno())
            kw = dict(pass_fds=[child.fileno()])
        # stdin is a pipe we keep open: the worker must not read it.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "picloud.worker"], cwd=self.home, env=env,
            stdin=subprocess.PIPE, stdout=self.log_out, stderr=self.log_err,
            **kw)
        child.close()
        self.reader = _wire.FrameReader(self.sock, _wire.WORKER_TO_AGENT)
        self.ready = self.reader.read()
        self.cache = _payload.SegmentCache(directory="/dev/shm")
        self.segment_requests = []
        self._keys = 1000

    def send(self, msg):
        _wire.send_message(self.sock, msg)

    def task(self, func=None, args=(), kwargs=None, *, key=None, blob=None,
             encoded_args=None, workdir="", env=(), tag=1):
        if key is None:
            self._keys += 1
            key = self._keys
        if blob is None:
            blob = b"" if func is None else cloudpickle.dumps(func, protocol=5)
        if encoded_args is None:
            encoded_args, _ = _payload.encode_args(
                args, kwargs or {},
                None if self.shm is None else self.shm.allocate)
        self.send(_wire.Task(tag, key, blob, encoded_args, str(workdir),
                             list(env)))

    def done(self, on_segment=None):
        """Read until DONE, answering SEGMENT_CREATE requests."""
        while True:
            msg = self.reader.read()
            if type(msg) is _wire.SegmentCreate:
                self.segment_requests.append(msg.size)
                reply = (on_segment or self.make_segment)(msg.size)
                self.send(reply)
                continue
            assert type(msg) is _wire.Done, msg
            return msg

    def make_segment(self, size):
        name, path = self.shm.create(size)
        return _wire.Segment(name, path, size)

    def call(self, func, *args, **kwargs):
        self.task(func, args, kwargs)
        return self.done()

    def value(self, done):
        assert done.status == 0, (done.error, done.traceback)
        return _payload.decode(done.result, self.cache)

    def wait(self):
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def stderr_text(self):
        self.log_err.seek(0)
        return self.log_err.read().decode("utf-8", "replace")

    def stdout_bytes(self):
        self.log_out.seek(0)
        return self.log_out.read()

    def close(self):
        self.sock.close()
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdin.close()
        self.log_out.close()
        self.log_err.close()
        self.cache.clear()


@pytest.fixture
def agent(tmp_path, shm):
    a = Agent(tmp_path, shm=shm)
    yield a
    a.close()


# --------------------------------------------------------------------------
# Functions run by the worker


def add(x, y=0):
    return x + y


def noop():
    return None


def raise_boom():
    raise ValueError("boom")


def exit_five():
    sys.exit(5)


def interrupt():
    raise KeyboardInterrupt


def return_lock():
    return threading.Lock()


class UnpicklableError(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def raise_unpicklable():
    raise UnpicklableError("bad")


def noisy():
    print("from print")
    sys.stderr.write("from sys.stderr\n")
    os.write(1, b"from fd 1\n")
    os.write(2, b"from fd 2\n")
    subprocess.run(["sh", "-c", "echo from child; echo child err >&2"],
                   check=True)
    import ctypes
    ctypes.CDLL(None).printf(b"from printf\n")      # stays in libc's buffer
    return "ok"


def flood(n):
    os.write(1, b"HEAD")
    chunk = b"." * (1 << 16)
    left = n - 8
    while left > 0:
        left -= os.write(1, chunk[:min(left, len(chunk))])
    os.write(1, b"TAIL")
    sys.stderr.write("e" * (OUTPUT_CAP + 10))
    return n


def where_and_env(name):
    out = subprocess.run(["sh", "-c", f'printf %s "${name}"'],
                         capture_output=True, check=True).stdout
    return os.getcwd(), os.environ.get(name), os.environ.get("HOME"), out


def stdin_info():
    return os.readlink("/proc/self/fd/0"), sys.stdin.read()


def maps():
    """(start, end, path) of this process's file mappings."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6:
                lo, hi = fields[0].split("-")
                out.append((int(lo, 16), int(hi, 16), fields[5].rstrip("\n")))
    return out


def inspect_array(arr):
    """Sum and flags of ``arr``, and the file mapped where its data lies."""
    addr = arr.ctypes.data
    where = [path for lo, hi, path in maps()
             if lo <= addr and addr + arr.nbytes <= hi]
    return (float(arr.sum()), bool(arr.flags.owndata),
            bool(arr.flags.writeable), where)


def digest(data):
    return len(data), hashlib.sha256(data).hexdigest(), type(data).__name__


def is_mapped(path):
    return any(p == path for _, _, p in maps())


def identity(x):
    return x


def big_array():
    return np.arange(1 << 20, dtype=np.float64)          # 8 MiB


def big_bytes():
    return bytes(range(256)) * 4096                     # 1 MiB


def suicide():
    os._exit(3)


# --------------------------------------------------------------------------
# Start-up


def test_ready_carries_pid_and_version(agent):
    assert type(agent.ready) is _wire.Ready
    assert agent.ready.pid == agent.proc.pid
    assert agent.ready.python_version == platform.python_version()


def test_socket_on_fd_3_by_default(tmp_path):
    a = Agent(tmp_path, fd3=True)
    try:
        assert a.ready.pid == a.proc.pid
        assert a.value(a.call(add, 2, 3)) == 5
    finally:
        a.close()


def test_stdin_is_dev_null(agent):
    assert agent.value(agent.call(stdin_info)) == ("/dev/null", "")


# --------------------------------------------------------------------------
# Calls and the function cache


def test_function_returns_a_value(agent):
    done = agent.call(add, 40, y=2)
    assert done.status == 0 and done.error == "" and done.segments == []
    assert agent.value(done) == 42


def test_tag_is_echoed(agent):
    agent.task(add, (1,), tag=2**64 - 2)
    assert agent.done().tag == 2**64 - 2


def test_cached_function_by_key(agent):
    agent.task(add, (1, 2), key=77)
    assert agent.value(agent.done()) == 3
    agent.task(None, (10, 20), key=77)          # empty function bytes
    assert agent.value(agent.done()) == 30
    # New bytes for a cached key replace the function.
    agent.task(noop, (), key=77)
    assert agent.value(agent.done()) is None


def test_unknown_key_without_function_is_a_load_error(agent):
    agent.task(None, (1,), key=0xdead)
    done = agent.done()
    assert done.status == 2
    assert done.error.startswith("LookupError: ")
    assert "0xdead" in done.error and "cache" in done.error
    assert agent.value(agent.call(add, 1, 1)) == 2       # still serving


def test_function_cache_keeps_the_last_16_lru(agent):
    n = FUNCTION_CACHE_SIZE
    assert n == 16
    for key in range(1, n + 1):
        agent.task(add, (key,), key=key)
        assert agent.value(agent.done()) == key
    agent.task(None, (0,), key=1)               # used again by key only
    assert agent.done().status == 0
    agent.task(add, (0,), key=3)                # sent again with its pickle
    assert agent.done().status == 0
    for key in (n + 1, n + 2):                  # evict the two oldest: 2, 4
        agent.task(add, (0,), key=key)
        assert agent.done().status == 0
    for key in (2, 4):
        agent.task(None, (0,), key=key)
        assert agent.done().status == 2, key
    for key in [1, 3] + list(range(5, n + 3)):
        agent.task(None, (key,), key=key)
        assert agent.value(agent.done()) == key, key


# --------------------------------------------------------------------------
# Errors


def test_exception_becomes_status_1_with_remote_traceback(agent):
    done = agent.call(raise_boom)
    assert done.status == 1
    assert done.error == "ValueError: boom"
    line = inspect.getsourcelines(raise_boom)[1] + 1
    assert f'line {line}, in raise_boom' in done.traceback
    assert 'raise ValueError("boom")' in done.traceback
    assert os.path.basename(__file__) in done.traceback
    assert "picloud/worker.py" not in done.traceback     # only the user's frames
    exc = _payload.decode(done.result)
    assert type(exc) is ValueError and exc.args == ("boom",)
    assert agent.value(agent.call(add, 1, 2)) == 3


@pytest.mark.parametrize("func,error", [
    (exit_five, "SystemExit: 5"),
    (interrupt, "KeyboardInterrupt"),
])
def test_base_exceptions_are_task_errors(agent, func, error):
    done = agent.call(func)
    assert done.status == 1 and done.error == error
    assert agent.proc.poll() is None
    assert agent.value(agent.call(add, 2, 2)) == 4


def test_exception_that_does_not_pickle(agent):
    done = agent.call(raise_unpicklable)
    assert done.status == 1
    assert done.error == f"{__name__}.UnpicklableError: bad"
    assert done.result == b""
    assert "raise_unpicklable" in done.traceback
    assert agent.value(agent.call(add, 3, 3)) == 6


def test_unpicklable_result_is_status_1_naming_the_cause(agent):
    done = agent.call(return_lock)
    assert done.status == 1
    assert done.error.startswith("TypeError: cannot pickle the result: ")
    assert "_thread.lock" in done.error
    assert agent.value(agent.call(add, 1, 0)) == 1


@pytest.fixture
def ghost_module(tmp_path):
    """A module importable here but not on the worker's path."""
    name = f"picloud_ghost_{os.getpid()}"
    d = tmp_path / "ghost"
    d.mkdir()
    (d / f"{name}.py").write_text(
        "def f():\n    return 1\n\nclass Thing:\n    pass\n")
    sys.path.insert(0, str(d))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(d))
        sys.modules.pop(name, None)


def test_function_from_a_missing_module_is_status_2(agent, ghost_module):
    done = agent.call(ghost_module.f)
    assert done.status == 2
    assert done.error == (
        f"ModuleNotFoundError: No module named '{ghost_module.__name__}'")
    assert agent.value(agent.call(add, 5)) == 5


def test_argument_from_a_missing_module_is_status_2(agent, ghost_module):
    done = agent.call(add, ghost_module.Thing())
    assert done.status == 2
    assert ghost_module.__name__ in done.error
    assert done.error.startswith("ModuleNotFoundError")


# --------------------------------------------------------------------------
# Output capture


def test_output_is_captured_and_does_not_leak(agent):
    done = agent.call(noisy)
    assert agent.value(done) == "ok"
    out, err = bytes(done.stdout), bytes(done.stderr)
    for text in (b"from print\n", b"from fd 1\n", b"from child\n",
                 b"from printf\n"):
        assert text in out
    for text in (b"from sys.stderr\n", b"from fd 2\n", b"child err\n"):
        assert text in err
    assert b"from" not in err.replace(b"from sys.stderr", b"").replace(
        b"from fd 2", b"")
    done = agent.call(noop)
    assert done.stdout == b"" and done.stderr == b""
    agent.send(_wire.Exit())
    assert agent.wait() == 0
    assert b"from" not in agent.stdout_bytes()       # not in the agent's log
    assert "from" not in agent.stderr_text()


def test_output_over_1_mib_is_cut_in_the_middle(agent):
    total = 3 * OUTPUT_CAP + 12345
    done = agent.call(flood, total)
    assert agent.value(done) == total
    out = bytes(done.stdout)
    assert len(out) <= OUTPUT_CAP
    assert out.startswith(b"HEAD") and out.endswith(b"TAIL")
    m = re.search(rb"\n\[picloud: (\d+) bytes cut\]\n", out)
    assert m is not None
    kept = len(out) - len(m.group(0))
    assert int(m.group(1)) == total - kept
    assert kept >= OUTPUT_CAP - 100
    err = bytes(done.stderr)
    assert len(err) <= OUTPUT_CAP and b"bytes cut]" in err
    # The next task starts from empty files.
    done = agent.call(noop)
    assert done.stdout == b"" and done.stderr == b""


# --------------------------------------------------------------------------
# Environment and working directory


def test_env_and_workdir_are_applied_and_restored(agent, tmp_path):
    wd = tmp_path / "work dir"
    wd.mkdir()
    home = os.environ.get("HOME")
    agent.task(where_and_env, ("PICLOUD_T",), workdir=wd,
               env=[("PICLOUD_T", "välue"), ("HOME", "/picloud-home")])
    cwd, value, task_home, from_child = agent.value(agent.done())
    assert cwd == str(wd)
    assert value == "välue" and from_child == "välue".encode()
    assert task_home == "/picloud-home"
    agent.task(where_and_env, ("PICLOUD_T",))
    cwd, value, task_home, from_child = agent.value(agent.done())
    assert cwd == str(agent.home)
    assert value is None and from_child == b""
    assert task_home == home


def change_dir(path):
    os.chdir(path)
    return os.getcwd()


def test_chdir_inside_a_task_is_undone(agent, tmp_path):
    assert agent.value(agent.call(change_dir, str(tmp_path))) == str(tmp_path)
    agent.task(where_and_env, ("X",))
    assert agent.value(agent.done())[0] == str(agent.home)


def test_missing_workdir_is_a_load_error(agent, tmp_path):
    agent.task(add, (1,), workdir=tmp_path / "nowhere")
    done = agent.done()
    assert done.status == 2
    assert done.error.startswith("FileNotFoundError") and "nowhere" in done.error
    agent.task(where_and_env, ("X",))
    assert agent.value(agent.done())[0] == str(agent.home)


@pytest.mark.parametrize("key", ["A=B", "NUL\0"])
def test_env_name_that_cannot_be_set_is_a_load_error(agent, key):
    agent.task(where_and_env, ("OK_VAR",), env=[("OK_VAR", "1"), (key, "x")])
    done = agent.done()
    assert done.status == 2 and done.error.startswith("ValueError")
    assert agent.value(agent.call(where_and_env, "OK_VAR"))[1] is None


# --------------------------------------------------------------------------
# Shared-memory segments


def test_array_argument_is_read_from_the_segment_without_copy(agent, shm):
    arr = np.random.default_rng(7).random(1 << 17)         # 1 MiB
    encoded, names = _payload.encode_args((arr,), {}, shm.allocate)
    assert len(names) == 1
    path = os.path.join("/dev/shm", names[0])
    agent.task(inspect_array, encoded_args=encoded)
    total, owndata, writeable, where = agent.value(agent.done())
    assert total == pytest.approx(float(arr.sum()))
    assert owndata is False and writeable is False
    # The data lies in the worker's mapping of the segment file: no copy.
    assert where == [path]
    # Kept mapped between tasks.
    assert agent.value(agent.call(is_mapped, path)) is True
    assert agent.value(agent.call(is_mapped, "/dev/shm/not-a-segment")) is False


def test_bytes_argument_through_a_segment(agent, shm):
    data = os.urandom(300_000)
    encoded, names = _payload.encode_args((data,), {}, shm.allocate)
    assert len(names) == 1 and len(encoded) < 1000
    agent.task(digest, encoded_args=encoded)
    assert agent.value(agent.done()) == (
        len(data), hashlib.sha256(data).hexdigest(), "bytes")


def test_returning_an_argument_refers_to_its_segment(agent, shm):
    arr = np.arange(1 << 16, dtype=np.float64)
    encoded, names = _payload.encode_args((arr,), {}, shm.allocate)
    agent.task(identity, encoded_args=encoded)

    def no_segment(size):
        raise AssertionError("the worker asked for a segment")
    done = agent.done(on_segment=no_segment)
    assert done.status == 0 and done.segments == names
    assert (agent.value(done) == arr).all()


@pytest.mark.parametrize("func,expected", [
    (big_array, np.arange(1 << 20, dtype=np.float64)),
    (big_bytes, bytes(range(256)) * 4096),
])
def test_large_result_goes_into_a_segment_from_the_agent(agent, func, expected):
    done = agent.call(func)
    assert done.status == 0, done.error
    assert len(agent.segment_requests) == 1
    size = agent.segment_requests[0]
    nbytes = expected.nbytes if isinstance(expected, np.ndarray) else len(expected)
    assert nbytes <= size < nbytes + 4096
    assert len(done.segments) == 1
    assert done.segments[0].startswith(f"picloud-test-{os.getpid()}-")
    assert len(done.result) < 1000
    value = agent.value(done)
    if isinstance(expected, np.ndarray):
        assert value.dtype == expected.dtype and (value == expected).all()
    else:
        assert type(value) is bytes and value == expected


def test_segment_error_is_status_1_and_the_worker_survives(agent):
    msg = "quota exceeded: user 1000 holds 2 GiB on this node"
    agent.task(big_array)
    done = agent.done(on_segment=lambda size: _wire.Error(msg))
    assert done.status == 1
    assert f"cannot store the result: {msg}" in done.error
    assert done.segments == []
    assert agent.value(agent.call(add, 7)) == 7


def test_missing_argument_segment_is_a_load_error(agent, shm):
    arr = np.ones(1 << 15)
    encoded, names = _payload.encode_args((arr,), {}, shm.allocate)
    shm.cleanup()                                   # the segment is gone
    agent.task(identity, encoded_args=encoded)
    done = agent.done()
    assert done.status == 2 and names[0] in done.error


# --------------------------------------------------------------------------
# Ending


def test_os_exit_closes_the_socket_with_the_exit_code(agent):
    agent.task(suicide)
    assert agent.reader.read() is None
    assert agent.wait() == 3


def test_exit_frame_ends_the_worker(agent):
    agent.send(_wire.Exit())
    assert agent.reader.read() is None
    assert agent.wait() == 0


def test_eof_ends_the_worker(agent):
    assert agent.value(agent.call(add, 1)) == 1
    agent.sock.shutdown(socket.SHUT_WR)
    assert agent.wait() == 0


@pytest.mark.parametrize("junk,reason", [
    (b"\x05\x00\x00\x00\x63abcd", "unknown frame kind 99"),
    (b"\xff\xff\xff\x7f\x01", "exceeds"),
    (b"\x02\x00\x00\x00\x02x", "left over"),     # EXIT with a stray byte
    (b"\x09\x00\x00\x00\x01" + b"\0" * 8, "too short"),   # TASK, 8 bytes
], ids=["kind", "length", "trailing", "short"])
def test_malformed_frame_makes_the_worker_exit(agent, junk, reason):
    agent.sock.sendall(junk)
    assert agent.wait() == EX_PROTOCOL
    assert agent.reader.read() is None
    err = agent.stderr_text()
    assert "protocol error" in err and reason in err


def test_unexpected_reply_to_segment_create_makes_the_worker_exit(agent):
    agent.task(big_array)
    done = agent.reader.read()
    assert type(done) is _wire.SegmentCreate
    agent.send(_wire.Task(1, 1, b"", b"", "", []))     # not SEGMENT or ERROR
    assert agent.wait() == EX_PROTOCOL
    assert "expected SEGMENT or ERROR" in agent.stderr_text()


def test_eof_while_waiting_for_a_segment_ends_the_worker(agent):
    agent.task(big_array)
    assert type(agent.reader.read()) is _wire.SegmentCreate
    agent.sock.shutdown(socket.SHUT_WR)
    assert agent.wait() == 0


def test_sigterm_while_idle(agent):
    """Not a protocol matter, but the agent may kill idle workers."""
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait() == -signal.SIGTERM
