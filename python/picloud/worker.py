"""The warm worker: ``python -m picloud.worker`` (docs/workers.md).

The node agent starts it with its end of a socketpair as file descriptor
``PICLOUD_WORKER_FD`` (default 3).  The worker sends READY, then serves TASK
frames one at a time until EXIT or EOF on the socket; each task is answered by
one DONE.

Per task: the workdir and env of the task are applied, fds 1 and 2 are pointed
at two anonymous files made once at start (memfd), the function (cached by
key) and arguments are unpickled, the function is called, its result encoded
(big buffers go into segments asked of the agent with SEGMENT_CREATE), and
everything is undone: Python's and C's stdio buffers are flushed, fds 1 and 2,
``sys.stdout``/``sys.stderr`` and the current directory restored, and the
task's env variables put back as they were.  (Other changes the function makes
to ``os.environ``, like changes to module globals, stay.)  Unpickling happens
inside that setup, so output and environment during imports count as the
task's.  An empty workdir means the worker's own start directory.

Captured output: at most ``OUTPUT_CAP`` bytes per stream; when a stream is
longer, its first half and its end are kept with a line in between saying how
many bytes were cut (``[picloud: N bytes cut]``).

Exit status: 0 after EXIT or EOF (or a peer that went away while we wrote);
76 (EX_PROTOCOL) after a malformed or unexpected frame, with the reason on
stderr; 2 if there is no socket at PICLOUD_WORKER_FD; 1 after an internal
error.  Atexit handlers registered by task code are not run.
"""

import fcntl
import mmap
import os
import pickle
import socket
import sys
import traceback
from collections import OrderedDict

from picloud import _payload, _wire

FUNCTION_CACHE_SIZE = 16
OUTPUT_CAP = 1 << 20
TEXT_CAP = 256 << 10            # error and traceback strings, each
EX_PROTOCOL = 76

_Done = _wire.Done
_MISSING = object()


def _c_fflush():
    """libc's fflush(NULL), so that C code's buffered stdio output lands in
    the task's capture rather than in a later one."""
    try:
        import ctypes
        fflush = ctypes.CDLL(None).fflush
        fflush.argtypes = [ctypes.c_void_p]
        fflush.restype = ctypes.c_int
        return lambda: fflush(None)
    except (ImportError, OSError, AttributeError):
        return lambda: None


class _LinkBroken(Exception):
    """The agent connection failed during a task: the worker must stop."""


class _Capture:
    """Points fd ``target`` at an anonymous file during a task."""

    def __init__(self, target, name):
        self.target = target
        try:
            self.fd = os.memfd_create(name)           # close-on-exec
        except (AttributeError, OSError):
            import tempfile
            self.fd = os.dup(tempfile.TemporaryFile().fileno())
        # O_APPEND: writers that reopen /proc/self/fd/1 do not overwrite.
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_APPEND)
        try:
            self.saved = os.dup(target)
        except OSError:                  # target was closed: use /dev/null
            self.saved = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self.dirty = False

    def start(self):
        if self.dirty:
            os.ftruncate(self.fd, 0)
            self.dirty = False
        os.dup2(self.fd, self.target)

    def stop(self):
        """Restore the fd and return the captured bytes (capped)."""
        os.dup2(self.saved, self.target)
        size = os.lseek(self.fd, 0, os.SEEK_END)
        if not size:
            return b""
        self.dirty = True
        if size <= OUTPUT_CAP:
            return _pread_all(self.fd, size, 0)
        head = OUTPUT_CAP // 2
        tail = OUTPUT_CAP - head - 64          # 64: room for the note
        note = b"\n[picloud: %d bytes cut]\n" % (size - head - tail)
        return b"".join((_pread_all(self.fd, head, 0), note,
                         _pread_all(self.fd, tail, size - tail)))


def _pread_all(fd, n, offset):
    chunks = []
    while n > 0:
        chunk = os.pread(fd, n, offset)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _type_name(exc):
    cls = type(exc)
    module = getattr(cls, "__module__", None)
    if module in (None, "builtins", "__main__"):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def _message(exc):
    try:
        return str(exc)
    except BaseException:
        return "<exception str() failed>"


def _describe(exc, prefix=""):
    """``Type: message`` of an exception (``Type`` alone if no message)."""
    msg = prefix + _message(exc)
    name = _type_name(exc)
    return f"{name}: {msg}" if msg else name


def _format_tb(exc, skip=1):
    """The formatted traceback, without the worker's own ``skip`` frames."""
    tb = exc.__traceback__
    for _ in range(skip):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    try:
        return "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException as e:
        return f"(traceback could not be formatted: {_message(e)})\n"


def _cap_text(text):
    if len(text) > TEXT_CAP:
        cut = len(text) - TEXT_CAP
        text = text[:TEXT_CAP] + f"\n[picloud: {cut} characters cut]\n"
    return text


class Worker:
    def __init__(self, sock):
        self.sock = sock
        self.reader = _wire.FrameReader(sock, _wire.AGENT_TO_WORKER)
        self.functions = OrderedDict()
        self.segments = _payload.default_cache()
        self.out = _Capture(1, "picloud-stdout")
        self.err = _Capture(2, "picloud-stderr")
        self.home = os.getcwd()
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        self.broken = None
        self.result_maps = []
        self.c_flush = _c_fflush()

    # -- agent link

    def send(self, msg):
        _wire.send_message(self.sock, msg)

    def allocate_segment(self, size):
        """Ask the agent for a segment of ``size`` bytes; map it writable."""
        try:
            self.send(_wire.SegmentCreate(size))
            reply = self.reader.read()
        except BaseException as e:
            self.broken = e
            raise _LinkBroken(f"agent link failed: {e}") from e
        if type(reply) is _wire.Error:
            raise _payload.SegmentError(reply.message)
        if type(reply) is not _wire.Segment:
            if reply is None:
                self.broken = ConnectionResetError(
                    "the agent closed the socket during SEGMENT_CREATE")
            else:
                self.broken = _wire.ProtocolError(
                    f"expected SEGMENT or ERROR after SEGMENT_CREATE, got "
                    f"{type(reply).__name__}")
            raise _LinkBroken(str(self.broken)) from self.broken
        name, path = reply.name, reply.path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if st.st_size < size:
                    raise _payload.SegmentError(
                        f"segment {name!r} at {path} has {st.st_size} bytes, "
                        f"{size} were asked for")
                mm = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        except OSError as e:
            raise _payload.SegmentError(
                f"cannot map segment {name!r} at {path}: {e}") from None
        self.result_maps.append(mm)
        return name, mm

    # -- tasks

    def load_function(self, key, blob):
        functions = self.functions
        if len(blob):
            func = pickle.loads(blob)
            functions[key] = func
            functions.move_to_end(key)
            if len(functions) > FUNCTION_CACHE_SIZE:
                functions.popitem(last=False)
            return func
        func = functions.get(key, _MISSING)
        if func is _MISSING:
            raise LookupError(
                f"function {key:#x} came without its pickle and is not in "
                f"this worker's cache")
        functions.move_to_end(key)
        return func

    def run(self, task):
        """Run one task; return its DONE message."""
        status = 0
        result = b""
        error = tb = ""
        names = []
        undo_env = None
        self.result_maps = []
        _flush(sys.stdout, sys.stderr)
        self.out.start()
        self.err.start()
        try:
            try:
                if task.workdir:
                    os.chdir(task.workdir)
                if task.env:
                    undo_env = []
                    environ = os.environ
                    for key, value in task.env:
                        undo_env.append((key, environ.get(key)))
                        environ[key] = value
                func = self.load_function(task.function_key, task.function)
                args, kwargs = _payload.decode_args(task.args, self.segments)
            except BaseException as e:
                status = 2
                error = _describe(e)
                tb = _format_tb(e)
            else:
                try:
                    value = func(*args, **kwargs)
                except BaseException as e:
                    status = 1
                    error = _describe(e)
                    tb = _format_tb(e)
                    del args, kwargs, func
                    try:
                        result, names = _payload.encode(
                            e, self.allocate_segment)
                    except _LinkBroken:
                        raise
                    except BaseException:
                        result, names = b"", []
                else:
                    del args, kwargs, func
                    try:
                        result, names = _payload.encode(
                            value, self.allocate_segment)
                    except _LinkBroken:
                        raise
                    except _payload.SegmentError as e:
                        status = 1
                        error = _describe(
                            e, "cannot store the result: ")
                        tb = ""
                        result, names = self.encode_quietly(e)
                    except BaseException as e:
                        status = 1
                        error = _describe(e, "cannot pickle the result: ")
                        tb = _format_tb(e)
                        result, names = self.encode_quietly(e)
                    del value
        finally:
            _flush(sys.stdout, sys.stderr, self.stdout, self.stderr)
            self.c_flush()
            sys.stdout, sys.stderr = self.stdout, self.stderr
            stdout = self.out.stop()
            stderr = self.err.stop()
            if undo_env is not None:
                _restore_env(undo_env)
            try:
                os.chdir(self.home)     # also undoes the task's own chdir()
            except OSError:
                pass
            for mm in self.result_maps:
                try:
                    mm.close()
                except BufferError:
                    pass          # still exported somewhere; GC unmaps it
            self.result_maps = []
        if self.broken is not None:
            raise _LinkBroken(str(self.broken)) from self.broken
        error = _cap_text(error)
        tb = _cap_text(tb)
        done = _Done(task.tag, status, result, error, tb, stdout, stderr,
                     names)
        # A bound on the frame size (4 bytes per character at worst).
        size = (len(result) + len(stdout) + len(stderr)
                + 4 * (len(error) + len(tb)) + 4096
                + sum(4 + 4 * len(n) for n in names))
        if size > _wire.MAX_FRAME:
            done = _Done(
                task.tag, 1, b"",
                f"ValueError: cannot send the result: its encoding takes "
                f"{len(result)} bytes, over the {_wire.MAX_FRAME}-byte frame "
                f"limit", "", stdout, stderr, [])
        return done

    def encode_quietly(self, exc):
        """Encode an exception in-band if it pickles, else nothing."""
        try:
            return _payload.encode(exc)
        except BaseException:
            return b"", []

    def serve(self):
        """Serve until EXIT or EOF; return the exit status."""
        self.send(_wire.Ready(os.getpid(), sys.version.split()[0]))
        read = self.reader.read
        Task = _wire.Task
        while True:
            msg = read()
            if type(msg) is Task:
                self.send(self.run(msg))
            elif msg is None or type(msg) is _wire.Exit:
                return 0
            else:
                raise _wire.ProtocolError(
                    f"unexpected {type(msg).__name__} frame between tasks")


def _restore_env(undo):
    environ = os.environ
    for key, old in reversed(undo):
        try:
            if old is None:
                environ.pop(key, None)
            else:
                environ[key] = old
        except ValueError:
            pass        # a name the task could not set in the first place


def _flush(*streams):
    for s in streams:
        try:
            if s is not None:
                s.flush()
        except BaseException:
            pass


def _complain(text):
    try:
        os.write(2, f"picloud.worker[{os.getpid()}]: {text}\n".encode(
            "utf-8", "replace"))
    except OSError:
        pass


def main():
    # stdin is /dev/null whatever the agent gave us.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    env_fd = os.environ.pop("PICLOUD_WORKER_FD", "3")
    try:
        fd = int(env_fd)
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
    except (ValueError, OSError) as e:
        _complain(f"no worker socket at PICLOUD_WORKER_FD={env_fd}: {e}")
        return 2
    sock.setblocking(True)
    code = 0
    try:
        code = Worker(sock).serve()
    except _wire.ProtocolError as e:
        _complain(f"protocol error from the agent: {e}")
        code = EX_PROTOCOL
    except _LinkBroken as e:
        cause = e.__cause__ or e
        if isinstance(cause, _wire.ProtocolError):
            _complain(f"protocol error from the agent: {cause}")
            code = EX_PROTOCOL
        elif not isinstance(cause, (BrokenPipeError, ConnectionResetError)):
            _complain(str(e))
            code = 1
    except (BrokenPipeError, ConnectionResetError):
        pass                              # the agent went away: just stop
    except BaseException:
        _complain("internal error:\n" + traceback.format_exc())
        code = 1
    return code


if __name__ == "__main__":
    _code = main()
    _flush(sys.stdout, sys.stderr)
    os._exit(_code)
