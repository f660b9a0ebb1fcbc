"""One process's link to a picloud cluster, over libpicloud: the server
connection (one per thread, since a wait holds its connection), the node
agent's connection for shared-memory segments, and the embedded local cluster
when none is configured.

Every call into the server goes through libpicloud; this module only holds
handles, converts between Python and C, and keeps shared-memory segments
alive as long as something refers to them.
"""

import atexit
import mmap
import os
import sys
import threading
import weakref

from . import _ffi, _local, _payload
from ._ffi import check, cstr, ffi, lib


class Segment:
    """A shared-memory segment held through the agent, mapped in Python."""

    __slots__ = ("handle", "name", "size", "mapping", "__weakref__")

    def __init__(self, handle, writable):
        self.handle = handle
        buf = ffi.new("char[256]")
        check(lib.picloud_segment_name(handle, buf, 256))
        self.name = ffi.string(buf).decode()
        ptr, length, w = ffi.new("void **"), ffi.new("uint64_t *"), ffi.new("int *")
        check(lib.picloud_segment_data(handle, ptr, length, w))
        self.size = length[0]
        buf = ffi.new("char[4096]")
        check(lib.picloud_segment_path(handle, buf, 4096))
        path = os.fsdecode(ffi.string(buf))
        # The agent made the file ours (mode 0600): Python maps it too, so
        # the mapping lives exactly as long as the arrays that view it.
        with open(path, "r+b" if writable else "rb") as f:
            self.mapping = mmap.mmap(f.fileno(), self.size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))


class Session:
    """Handles of one process; create through ``session()``."""

    def __init__(self, address=None):
        self._lock = threading.Lock()
        self._local = threading.local()
        self._agent = None
        self.cluster = None
        self.state_dir = None
        if address is not None:
            self.address = str(address)
            if os.path.isdir(self.address):
                self.state_dir = self.address
            elif os.path.exists(os.path.join(os.path.dirname(os.path.abspath(self.address)), "agent.sock")):
                # The server's socket in a state directory: its agent is there too.
                self.state_dir = os.path.dirname(os.path.abspath(self.address))
        else:
            self.address = self._find_or_start()
        # Clients that made pipelined submissions (call()), by thread: any
        # other thread's request first makes them send what they buffered,
        # and so does the end of the process.
        self._pipelining = {}
        atexit.register(self.flush_pipelined)
        # Submitted here and not known to have ended: sequence numbers, for
        # kill() without ids.
        self.submitted = {}     # as an ordered set: ended jobs leave it
        # Tasks of each map job submitted here, until it ends: a wait for all
        # of them is a wait for the job.
        self.task_counts = {}
        # Segments a job's arguments use, by sequence number, until it ends.
        self.job_segments = {}
        # Result segments mapped here, by name (held until delete()).
        self.result_segments = {}
        # The tasks of ended jobs, by sequence number (outcomes never change),
        # and single ended tasks of jobs still running, by (seq, index).
        self.ended = {}
        self.ended_tasks = {}
        self.cache_lock = threading.Lock()

    def _find_or_start(self):
        configured = _local.configured_dir()
        if configured is not None:
            explicit = "PICLOUD_DIR" in os.environ
            if explicit or self._answers(configured):
                self.state_dir = configured
                return configured
        self.cluster = _local.LocalCluster()
        self.cluster.wait_ready(
            lambda: os.path.exists(os.path.join(self.cluster.dir, "agent.sock")) and self._answers(self.cluster.dir)
        )
        self.state_dir = self.cluster.dir
        return self.cluster.dir

    @staticmethod
    def _answers(address):
        out = ffi.new("picloud_client **")
        if lib.picloud_client_connect(cstr(address), out) != 0:
            return False
        lib.picloud_client_free(out[0])
        return True

    # ---- connections

    def client(self):
        """This thread's server connection. Calls submitted by other threads
        are sent first, so that a request made here finds them."""
        handle = getattr(self._local, "client", None)
        if handle is None:
            out = ffi.new("picloud_client **")
            check(lib.picloud_client_connect(cstr(self.address), out))
            handle = ffi.gc(out[0], lib.picloud_client_free)
            self._local.client = handle
        others = self._pipelining
        if others:
            me = threading.get_ident()
            for ident, other in list(others.items()):
                if ident != me:
                    # A broken connection is its own thread's to report.
                    lib.picloud_client_flush(other)
        return handle

    def pipelining_client(self):
        """This thread's connection, for pipelined submissions."""
        handle = self.client()
        me = threading.get_ident()
        if self._pipelining.get(me) is not handle:
            with self._lock:
                live = {t.ident for t in threading.enumerate()}
                kept = {i: h for i, h in self._pipelining.items() if i in live and i != me}
                kept[me] = handle
                self._pipelining = kept
        return handle

    def flush_pipelined(self):
        """Makes every thread's pipelined submissions reach the server."""
        for handle in list(self._pipelining.values()):
            lib.picloud_client_flush(handle)

    def forget_connections(self):
        """In a forked child: drops the parent's connections without using
        or freeing them (freeing one would send what the parent buffered a
        second time); the child connects anew."""
        _inherited.append((self._local, self._pipelining, self._agent))
        self._local = threading.local()
        self._pipelining = {}
        self._agent = None

    def reset_client(self):
        """Drops this thread's connection (after it broke)."""
        self._local.client = None
        with self._lock:
            self._pipelining = {i: h for i, h in self._pipelining.items() if i != threading.get_ident()}

    def connection_lost(self):
        """A call reported this thread's server connection lost: the
        thread's next call connects again. Jobs it submitted without an
        answer yet are then named as not known to the server if it never
        got them."""
        self.reset_client()

    def _agent_call(self, rc):
        """Checks a segment call's code; an agent that did not answer in time
        left its connection out of step, as a lost one."""
        if rc == lib.PICLOUD_ERR_TIMEOUT:
            self.agent_lost()
        check(rc, lost=self.agent_lost)

    def agent_lost(self):
        """A segment call reported the agent connection lost (or out of step
        after a timeout): the next one connects anew. Segments mapped
        through the old connection keep it, and their hold, while they live."""
        with self._lock:
            self._agent = None

    def agent(self):
        """The node agent's connection, for segments."""
        with self._lock:
            if self._agent is None:
                out = ffi.new("picloud_agent **")
                state = self.state_dir or os.environ.get("PICLOUD_DIR")
                check(lib.picloud_agent_connect(cstr(state) if state else ffi.NULL, out))
                self._agent = ffi.gc(out[0], lib.picloud_agent_free)
            return self._agent

    # ---- segments

    def create_segment(self, size):
        """A new writable segment of ``size`` bytes, released when its mapping dies."""
        out = ffi.new("picloud_segment **")
        self._agent_call(lib.picloud_segment_create(self.agent(), size, out))
        return self._adopt(out[0], writable=True)

    def map_segment(self, name):
        """An existing segment (e.g. a result's), held and mapped read-only."""
        seg = self.result_segments.get(name)
        if seg is None:
            out = ffi.new("picloud_segment **")
            self._agent_call(lib.picloud_segment_map(self.agent(), cstr(name), out))
            seg = self._adopt(out[0], writable=False)
            self.result_segments[name] = seg
        return seg

    def _adopt(self, handle, writable):
        seg = Segment(handle, writable)
        token = _payload.register_segment(seg.name, seg.mapping)
        # When the last view of the mapping goes, the agent may reuse the
        # segment; only this process tells it so, not a forked child.
        weakref.finalize(seg.mapping, _release, handle, token, os.getpid())
        return seg

    def allocate(self, sizes_out):
        """An ``allocate_segment`` callback for ``_payload.encode`` whose
        segments are appended to ``sizes_out`` (kept alive by the caller)."""

        def allocate(size):
            seg = self.create_segment(size)
            sizes_out.append(seg)
            return seg.name, memoryview(seg.mapping)

        return allocate

    def close(self):
        self.flush_pipelined()
        self._pipelining = {}
        self._local = threading.local()
        self._agent = None
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


def _release(handle, token, owner):
    _payload.unregister_segment(token)
    if os.getpid() == owner:
        lib.picloud_segment_free(handle)
    # A forked child's copy of the handle is left alone: freeing it would
    # tell the agent, over the parent's connection, that the parent is done
    # with the segment.


_session = None
_session_lock = threading.Lock()

# Connections a forked child inherited: kept, never freed (see
# Session.forget_connections).
_inherited = []


def _after_fork_in_child():
    _payload.after_fork_in_child()
    if _session is not None:
        _session.forget_connections()


os.register_at_fork(after_in_child=_after_fork_in_child)


def session():
    """The process's session, connecting (or starting a local cluster) on first use."""
    global _session
    s = _session
    if s is not None:
        return s
    with _session_lock:
        if _session is None:
            _session = Session()
        return _session


def init(address=None):
    """Connects to the cluster at ``address`` (a state directory, a socket
    path or host:port); without one, finds or starts one as the first call would."""
    global _session
    with _session_lock:
        if _session is not None:
            _session.close()
        _session = Session(address)
        return _session


def _connection_lost():
    current = _session
    if current is not None:
        current.connection_lost()


_ffi.on_connection_lost.append(_connection_lost)


def interpreter():
    return sys.executable
