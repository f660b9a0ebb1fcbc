"""PiCloud's API on picloud: ``call``, ``map``, ``result``, ``iresult``,
``join``, ``status``, ``info``, ``kill``, ``delete``, ``array`` and
``CloudException``, so that ``import picloud as cloud`` runs old PiCloud
scripts.

A ``call`` is a job of one task; a ``map`` is an array job whose task i gets
element i (submitted in batches, the function pickled once per batch). Each
element has its own job id, a :class:`Jid`. Functions are pickled with
cloudpickle (lambdas, closures, and functions of the user's own modules by
value); arguments and results with pickle protocol 5, large buffers through
shared memory (see ``docs/workers.md``).
"""

import os
import sys
import sysconfig
import time
import weakref

import cloudpickle

from . import _ffi, _fncache, _payload
from ._ffi import check, cstr, ffi, lib
from ._session import session

# C types looked up once: ffi.new("...") parses its type string on each call.
_T_CALL = ffi.typeof("picloud_python_call *")
_CALL_SIZE = ffi.sizeof("picloud_python_call")
_T_BYTES_ARRAY = ffi.typeof("picloud_bytes[]")
_T_U64_OUT = ffi.typeof("uint64_t *")
_T_U64_ARRAY = ffi.typeof("uint64_t[]")
_T_RESULTS_OUT = ffi.typeof("picloud_results **")
_T_RESULT = ffi.typeof("picloud_task_result *")
_RESULT_SIZE = ffi.sizeof("picloud_task_result")
_T_SIZE_OUT = ffi.typeof("size_t *")
_T_CHARS = ffi.typeof("char *")

#: Exit status of a job killed (deleted) before or while it ran.
EXIT_KILLED = 265
#: Exit status of a job that never ran (e.g. its dependency failed).
EXIT_NEVER_RAN = -1

#: Most encoded argument bytes in one submission (the protocol's frame is 64 MiB).
BATCH_BYTES = 48 << 20
#: Most elements in one submission of a map.
BATCH_ELEMENTS = 50_000
#: Maps at least this long show a progress bar while ``result`` waits (when
#: stdout is a terminal or a notebook and tqdm is installed).
PROGRESS_MIN = 1000

_RESERVED = {
    "_cores", "_memory", "_depends_on", "_depends_on_errors", "_label", "_priority",
    "_max_runtime", "_restartable", "_kill_process", "_env", "_chunksize",
}

#: Elements per task of a ``map`` when ``_chunksize`` is not given: maps of
#: up to this many tasks run one element per task; longer ones are chunked
#: into about this many tasks (at most ``MAX_AUTO_CHUNK`` elements each).
AUTO_CHUNK_TASKS = 256
MAX_AUTO_CHUNK = 1000
#: ``result`` and ``join`` wait for each task of a map they name on its own
#: when they name at most this many of its tasks; for the whole map else.
TASK_WAITS = 64


class Jid(int):
    """A job id: an int (as PiCloud's were) that also knows its picloud job
    and array index. ``seq`` is the job's sequence number; ``index`` the
    element of a map, or None for a ``call``; ``chunk`` the elements per task
    of the map (1 unless it was chunked).

    The int holds all three, so that a jid stored as a plain int and read
    back in another process still names its task: bits 0-31 hold the index
    plus one (0 for a call), bits 32-95 the sequence number, and the bits
    from 96 up the chunk size when it is over 1.
    """

    def __new__(cls, seq, index=None, chunk=1):
        if not 0 <= seq < 1 << 64:
            raise ValueError(f"job sequence number {seq} out of range")
        if index is not None and not 0 <= index < 0xFFFFFFFF:
            raise ValueError(f"element index {index} out of range")
        if chunk < 1 or (chunk > 1 and index is None):
            raise ValueError(f"chunk size {chunk} for {'a call' if index is None else 'a map element'}")
        low = 0 if index is None else index + 1
        return super().__new__(cls, ((chunk if chunk > 1 else 0) << 96) | (seq << 32) | low)

    def __reduce__(self):
        # Pickled (and copied) as its int, rebuilt with all its parts.
        return (Jid.from_int, (int(self),))

    @classmethod
    def from_int(cls, value):
        """The jid whose int is ``value``."""
        value = int(value)
        if value < 0:
            raise ValueError(f"{value} is not a job id")
        low = value & 0xFFFFFFFF
        return cls((value >> 32) & ((1 << 64) - 1), None if low == 0 else low - 1, max(1, value >> 96))

    @property
    def seq(self):
        return (int(self) >> 32) & ((1 << 64) - 1)

    @property
    def index(self):
        low = int(self) & 0xFFFFFFFF
        return None if low == 0 else low - 1

    @property
    def chunk(self):
        return max(1, int(self) >> 96)

    @property
    def task_index(self):
        """The array index of the task that runs this element (None for a call)."""
        index = self.index
        return None if index is None else index // self.chunk

    @property
    def job_id(self):
        """The id `qstat` shows: ``12`` or ``12[3]`` (the task's index)."""
        task = self.task_index
        return str(self.seq) if task is None else f"{self.seq}[{task}]"


class CloudException(Exception):
    """A job did not produce a value: it raised (the remote traceback is in
    the message), was killed, or never ran. ``jid`` and ``status`` say which."""

    def __init__(self, message, jid=None, status=None, remote=None):
        super().__init__(message)
        self.jid = jid
        self.status = status
        #: The exception the function raised, when it could be unpickled here.
        self.remote = remote


class CloudTimeoutError(CloudException, TimeoutError):
    """``result`` or ``join`` ran out of time; the jobs keep running."""


# --------------------------------------------------------------------------
# Submission


def _site_dirs():
    paths = sysconfig.get_paths()
    dirs = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return tuple(os.path.realpath(d) + os.sep for d in dirs if d)


_SITE = _site_dirs()


# Modules already looked at by _by_value (realpath costs a system call per
# directory of the path): name -> the module object that was looked at.
_looked_at = {}


def _by_value(func):
    """Marks the module of ``func`` for pickling by value when it is the
    user's own (not installed), so workers need not import it."""
    module = sys.modules.get(getattr(func, "__module__", None) or "")
    if module is None or module.__name__ == "__main__" or _looked_at.get(module.__name__) is module:
        return
    _looked_at[module.__name__] = module
    path = getattr(module, "__file__", None)
    if path and not os.path.realpath(path).startswith(_SITE):
        top = sys.modules.get(module.__name__.split(".")[0], module)
        try:
            cloudpickle.register_pickle_by_value(top)
        except ValueError:
            cloudpickle.register_pickle_by_value(module)


def _pickle_function(func):
    if not callable(func):
        raise TypeError(f"{func!r} is not callable")
    _by_value(func)
    try:
        return _fncache.dumps(func)
    except Exception as e:
        raise TypeError(f"cannot pickle the function {getattr(func, '__name__', func)!r}: {e}") from e


def _describe(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _encode_args(s, args, kwargs, segments, where=""):
    try:
        return _payload.encode_args(args, kwargs, s.allocate(segments))
    except (_ffi.PicloudError, _payload.SegmentError):
        raise       # no segment for a large buffer: not the arguments' fault
    except Exception as e:
        # Name the culprit: try each argument alone.
        for i, a in enumerate(args):
            try:
                cloudpickle.dumps(a, protocol=5)
            except Exception as inner:
                raise TypeError(f"cannot pickle argument {i}{where} ({_describe(a)}): {inner}") from e
        for k, v in kwargs.items():
            try:
                cloudpickle.dumps(v, protocol=5)
            except Exception as inner:
                raise TypeError(f"cannot pickle argument {k!r}{where} ({_describe(v)}): {inner}") from e
        raise TypeError(f"cannot pickle the arguments{where}: {e}") from e


def _split_reserved(kwargs):
    if not kwargs:
        return {}
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in _RESERVED}
    unknown = [k for k in kwargs if k.startswith("_") and k not in _RESERVED]
    if unknown:
        raise TypeError(f"unknown reserved keyword(s): {', '.join(unknown)} (known: {', '.join(sorted(_RESERVED))})")
    return options


def _memory_bytes(value):
    """``_memory``: an int is MiB (as PiCloud's was); a string may say ``2gb``."""
    if isinstance(value, int):
        return value << 20
    text = str(value).strip().lower()
    units = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40, "b": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text) << 20


class _Options:
    """A ``picloud_job_options`` and the C memory it points into."""

    def __init__(self, options, name, cwd=None):
        self.keep = []
        o = ffi.new("picloud_job_options *")
        o.struct_size = ffi.sizeof("picloud_job_options")
        o.ncpus = int(options.get("_cores", 1))
        if "_memory" in options:
            o.mem_bytes = _memory_bytes(options["_memory"])
        if "_max_runtime" in options:
            # Minutes, as in PiCloud.
            o.walltime_secs = max(1, int(round(float(options["_max_runtime"]) * 60)))
        o.priority = int(options.get("_priority", 0))
        if options.get("_restartable", True) is False:
            o.flags |= lib.PICLOUD_JOB_NO_RERUN
        label = options.get("_label", name)
        o.name = self._str(label)
        o.workdir = self._keep(_cached_cstr(cwd or os.getcwd()))
        env = options.get("_env") or {}
        if env:
            entries = [self._str(f"{k}={v}") for k, v in env.items()]
            arr = ffi.new("const char *[]", entries)
            self.keep.append(arr)
            o.env, o.env_len = arr, len(entries)
        depends = options.get("_depends_on")
        if depends is not None:
            if isinstance(depends, int):
                depends = [depends]
            seqs = sorted({_jid(j).seq for j in depends})
            arr = ffi.new("uint64_t[]", seqs)
            self.keep.append(arr)
            o.depend_on, o.depend_len = arr, len(seqs)
            errors = options.get("_depends_on_errors", "abort")
            if errors not in ("abort", "ignore"):
                raise ValueError("_depends_on_errors must be 'abort' or 'ignore'")
            o.depend_mode = lib.PICLOUD_DEPEND_AFTEROK if errors == "abort" else lib.PICLOUD_DEPEND_AFTERANY
        self.c = o

    def _str(self, text):
        return self._keep(cstr(str(text)))

    def _keep(self, c):
        self.keep.append(c)
        return c


# Options of calls with no reserved keyword, by (name, working directory):
# C reads them and never writes, so one struct serves every such call.
_plain_options = {}


def _options(options, name):
    """The ``_Options`` of a submission (shared when ``options`` is empty)."""
    if options:
        return _Options(options, name)
    cwd = os.getcwd()
    key = (name, cwd)
    opts = _plain_options.get(key)
    if opts is None:
        if len(_plain_options) >= 64:
            _plain_options.clear()
        opts = _plain_options[key] = _Options(options, name, cwd)
    return opts


# C strings that most submissions repeat (the interpreter, the working
# directory), by their text. A submission keeps a reference to each string it
# points to until its C call returns, so dropping them here is always safe.
_cstrs = {}


def _cached_cstr(text):
    c = _cstrs.get(text)
    if c is None:
        if len(_cstrs) >= 64:
            _cstrs.clear()
        c = _cstrs[text] = cstr(text)
    return c


# ``sys.path`` as a C array, rebuilt when it changes: (its items, the array,
# the strings the array points to).
_sys_path = (None, None, None)


def _sys_path_array():
    """``(items, array, strings)`` for ``sys.path``; the caller holds the
    whole tuple while C reads the array."""
    global _sys_path
    current = _sys_path
    items = tuple(p for p in sys.path if p)
    if items != current[0]:
        strings = [cstr(p) for p in items]
        current = _sys_path = (items, ffi.new("const char *[]", strings), strings)
    return current


def _submit(s, function, arg_blobs, segments, options, name, pipelined=False, array=False):
    """Submits one job of ``len(arg_blobs)`` tasks; returns its sequence
    number. ``pipelined``: without waiting for the server, which hears of it
    with this thread's next request, or within a millisecond (a refusal is
    raised by the first call that names the job). ``array``: an array job
    even with one task (a map's are, so that its jids name task 0)."""
    keep = []
    call = ffi.new(_T_CALL)
    call.struct_size = _CALL_SIZE
    call.kill_process = 1 if options.get("_kill_process") else 0
    call.array = 1 if array else 0
    interpreter = _cached_cstr(sys.executable)
    sys_path = _sys_path_array()
    keep += [interpreter, sys_path]
    call.interpreter = interpreter
    call.sys_path, call.sys_path_len = sys_path[1], len(sys_path[0])
    fn = ffi.from_buffer(function)
    call.function.data, call.function.len = fn, len(function)
    args = ffi.new(_T_BYTES_ARRAY, len(arg_blobs))
    for i, blob in enumerate(arg_blobs):
        buf = ffi.from_buffer(blob)
        keep.append(buf)
        args[i].data, args[i].len = buf, len(blob)
    call.args, call.args_len = args, len(arg_blobs)
    names = [cstr(n) for n in dict.fromkeys(segments)]
    name_arr = ffi.new("const char *[]", names) if names else ffi.NULL
    call.segments, call.segments_len = name_arr, len(names)
    opts = _options(options, name)
    seq = ffi.new(_T_U64_OUT)
    if pipelined:
        check(lib.picloud_client_submit_python_async(s.pipelining_client(), call, opts.c, seq))
    else:
        check(lib.picloud_client_submit_python(s.client(), call, opts.c, seq))
    return seq[0]


def _function_name(func):
    return getattr(func, "__name__", type(func).__name__)[:200] or "call"


def call(func, *args, **kwargs):
    """Runs ``func(*args, **kwargs)`` on the cluster; returns its :class:`Jid`.

    Reserved keywords: ``_cores``, ``_memory`` (MiB, or e.g. ``"2gb"``),
    ``_depends_on`` (jids), ``_depends_on_errors`` (``"abort"`` or
    ``"ignore"``), ``_label``, ``_priority``, ``_max_runtime`` (minutes),
    ``_restartable``, ``_kill_process``, ``_env`` (a dict).
    """
    return _call(func, args, kwargs, pipelined=True)


def _call(func, args, kwargs, pipelined):
    """``call``; without ``pipelined``, the server has queued the job (or
    refused it, raised here) when this returns."""
    options = _split_reserved(kwargs)
    s = session()
    function = _pickle_function(func)
    segments = []
    blob, names = _encode_args(s, args, kwargs, segments)
    seq = _submit(s, function, [blob], names, options, _function_name(func), pipelined=pipelined)
    _remember(s, seq, names, segments)
    return Jid(seq)


def map(func, *iterables, **kwargs):  # noqa: A001 - PiCloud's name
    """Runs ``func`` on each element (``zip`` of ``iterables``); returns one
    :class:`Jid` per element. Reserved keywords as for :func:`call`, plus
    ``_chunksize``: elements per task (like ``Pool.map``'s chunksize; by
    default 1 for maps of up to 256 elements, else about 256 tasks). Elements
    of one task share its worker, its stdout and its fate if the worker dies;
    each still has its own value or exception."""
    options = _split_reserved(kwargs)
    elements = list(zip(*iterables))
    chunk = options.pop("_chunksize", None)
    if chunk is None:
        chunk = 1 if len(elements) <= AUTO_CHUNK_TASKS else min(MAX_AUTO_CHUNK, -(-len(elements) // AUTO_CHUNK_TASKS))
    chunk = int(chunk)
    if chunk < 1:
        raise ValueError("_chunksize must be at least 1")
    s = session()
    name = _function_name(func)
    if chunk > 1:
        from ._chunks import ChunkRunner

        _pickle_function(func)   # checks it and marks its module
        function = _pickle_function(ChunkRunner(func))
        units = [tuple(elements[i:i + chunk]) for i in range(0, len(elements), chunk)]
    else:
        function = _pickle_function(func)
        units = elements
    jids = []
    blobs, names, segments, size, first = [], [], [], 0, 0

    def flush():
        nonlocal first
        if not blobs:
            return
        seq = _submit(s, function, blobs, names, options, name, array=True)
        _remember(s, seq, names, list(segments))
        s.task_counts[seq] = len(blobs)
        count = sum(len(u) for u in units[first:first + len(blobs)]) if chunk > 1 else len(blobs)
        jids.extend(Jid(seq, i, chunk) for i in range(count))
        first += len(blobs)
        blobs.clear(), names.clear(), segments.clear()

    try:
        for i, unit in enumerate(units):
            where = f" of element {i}" if chunk == 1 else f" of elements {i * chunk}-{i * chunk + len(unit) - 1}"
            blob, used = _encode_args(s, unit, {}, segments, where=where)
            if blobs and (size + len(blob) > BATCH_BYTES or len(blobs) >= BATCH_ELEMENTS):
                flush()
                size = 0
            blobs.append(blob)
            names.extend(used)
            size += len(blob)
        flush()
    except BaseException:
        # All or nothing: the batches already submitted are cancelled, and
        # forgotten here (a failure to cancel does not hide the first error).
        for seq in dict.fromkeys(j.seq for j in jids):
            try:
                lib.picloud_client_cancel(s.client(), seq, -1)
            except Exception:
                pass
            s.submitted.pop(seq, None)
            s.task_counts.pop(seq, None)
            s.job_segments.pop(seq, None)
        raise
    return jids


def _task_index(jid):
    """The array index of the task running ``jid`` (None for a call)."""
    return jid.task_index


_live_mappings = weakref.WeakValueDictionary()


def _remember(s, seq, names, segments):
    s.submitted[seq] = None
    # The job must keep its argument segments until it has ended: hold the
    # mappings (ours, those of picloud.array arrays it refers to, and those
    # of earlier results passed on, which delete() would otherwise release).
    held = list(segments)
    for name in names:
        mapping = _live_mappings.get(name)
        if mapping is None:
            result = s.result_segments.get(name)
            mapping = None if result is None else result.mapping
        if mapping is not None:
            held.append(mapping)
    for seg in segments:
        _live_mappings[seg.name] = seg.mapping
    if held:
        s.job_segments[seq] = held


# --------------------------------------------------------------------------
# Waiting and results


def _jid(j):
    """``j`` as a :class:`Jid` (PiCloud scripts may hand back plain ints)."""
    if isinstance(j, Jid):
        return j
    return Jid.from_int(j)


def _as_list(jids):
    """The jids as a list, and whether one jid (not a list) was given."""
    if isinstance(jids, int):
        return [_jid(jids)], True
    return [_jid(j) for j in jids], False


def _sliced(timeout, count, attempt):
    """Calls ``attempt(slice_ms)`` (a libpicloud wait) in slices of at most
    200 ms, so that Ctrl-C is seen, until it returns 0 or ``timeout``
    (seconds; None for ever) has passed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        slice_ms = 200 if left is None else int(min(left, 0.2) * 1000)
        rc = attempt(slice_ms)
        if rc == 0:
            return
        if rc != lib.PICLOUD_ERR_TIMEOUT:
            check(rc)
        if left is not None and left <= 0.2:
            raise CloudTimeoutError(f"timed out after {timeout} s waiting for {count} job(s); they go on")


def _wait(s, seqs, timeout, mode=None):
    """Waits until every (or, with WAIT_ANY, one) job has ended, without
    fetching results. Returns the ended flags."""
    mode = lib.PICLOUD_WAIT_ALL if mode is None else mode
    seqs = list(dict.fromkeys(seqs))
    arr = ffi.new("uint64_t[]", seqs)
    ended = ffi.new("uint8_t[]", len(seqs))
    _sliced(timeout, len(seqs), lambda ms: lib.picloud_client_wait(s.client(), arr, len(seqs), ms, mode, ended))
    return dict(zip(seqs, (bool(e) for e in ended)))


class _Task:
    """One task's end, as libpicloud reported it."""

    __slots__ = ("state", "exit_status", "outcome", "comment", "value", "error", "traceback", "stdout",
                 "stderr", "segments", "node", "cput_ms", "walltime_ms", "mem", "id", "_decoded_value")


def _string(ptr, n):
    return ffi.unpack(ptr, n).decode(errors="replace") if n else ""


def _fetch(s, seq):
    """Every task of job ``seq``: a list indexed by array index (one entry
    for a call). Fetched in one request, or task by task when together
    they would not fit one reply."""
    out = ffi.new("picloud_results **")
    rc = lib.picloud_client_results(s.client(), seq, -1, out)
    if rc == lib.PICLOUD_ERR_SERVER:
        status = ffi.new("picloud_task_status *")
        status.struct_size = ffi.sizeof("picloud_task_status")
        check(lib.picloud_client_status(s.client(), seq, -1, status))
        if status.is_array:
            tasks = status.array_queued + status.array_running + status.array_finished
            return [_fetch_task(s, seq, i) for i in range(tasks)]
    check(rc)
    return [t for _, t in _unpack(out[0])]


def _fetch_task(s, seq, index):
    out = ffi.new("picloud_results **")
    check(lib.picloud_client_results(s.client(), seq, index, out))
    return _unpack(out[0])[0][1]


def _unpack(handle):
    """``(seq, task)`` for each task in a ``picloud_results``, which is then freed."""
    results = ffi.gc(handle, lib.picloud_results_free)
    n = ffi.new(_T_SIZE_OUT)
    check(lib.picloud_results_len(results, n))
    tasks = []
    r = ffi.new(_T_RESULT)
    unpack, cast = ffi.unpack, ffi.cast
    for i in range(n[0]):
        r.struct_size = _RESULT_SIZE
        check(lib.picloud_results_get(results, i, r))
        t = _Task()
        t.state = r.state
        t.exit_status = r.exit_status if r.has_exit_status else None
        t.outcome = r.outcome
        t.comment = _string(r.comment, r.comment_len)
        t.value = unpack(cast(_T_CHARS, r.value), r.value_len) if r.value_len else b""
        t.error = _string(r.error, r.error_len)
        t.traceback = _string(r.traceback, r.traceback_len)
        t.stdout = _string(cast(_T_CHARS, r.stdout_data), r.stdout_len) if r.stdout_len else ""
        t.stderr = _string(cast(_T_CHARS, r.stderr_data), r.stderr_len) if r.stderr_len else ""
        t.node = _string(r.node, r.node_len)
        t.id = _string(r.id, r.id_len)
        t.cput_ms, t.walltime_ms, t.mem = r.cput_ms, r.walltime_ms, r.mem_bytes
        t.segments = []
        if r.segments_len:
            name = ffi.new("char **")
            for j in range(r.segments_len):
                check(lib.picloud_results_segment(results, i, j, ffi.cast("const char **", name)))
                t.segments.append(ffi.string(name[0]).decode())
        tasks.append((r.seq, t))
    return tasks


def _tasks(s, seq):
    """Every task of job ``seq``: cached once the job has ended, else fetched."""
    with s.cache_lock:
        tasks = s.ended.get(seq)
    if tasks is None:
        tasks = _fetch(s, seq)
        if all(t.exit_status is not None for t in tasks):
            _keep(s, seq, tasks)
    return tasks


def _keep(s, seq, tasks):
    """Caches the tasks of an ended job."""
    with s.cache_lock:
        s.ended[seq] = tasks
    # Ended: its argument segments may go, and kill() need not name it.
    s.job_segments.pop(seq, None)
    s.submitted.pop(seq, None)
    s.task_counts.pop(seq, None)


def _wait_results(s, seqs, timeout):
    """Waits until every job of ``seqs`` has ended, fetching the outcomes of
    those not cached yet in the same request. Outcomes the server left out
    (too large for one reply) are fetched later, job by job, by ``_tasks``."""
    with s.cache_lock:
        missing = [seq for seq in dict.fromkeys(seqs) if seq not in s.ended]
    if not missing:
        return
    arr = ffi.new(_T_U64_ARRAY, missing)
    out = ffi.new(_T_RESULTS_OUT)
    _sliced(timeout, len(missing), lambda ms: lib.picloud_client_wait_results(
        s.client(), arr, len(missing), ms, lib.PICLOUD_WAIT_ALL, ffi.NULL, out))
    by_seq = {}
    for seq, t in _unpack(out[0]):
        by_seq.setdefault(seq, []).append(t)
    for seq, tasks in by_seq.items():
        _keep(s, seq, tasks)


def _task(s, jid):
    index = jid.task_index
    if index is not None:
        with s.cache_lock:
            task = s.ended_tasks.get((jid.seq, index))
        if task is not None:
            return task
    return _tasks(s, jid.seq)[index or 0]


def _status_word(state, exit_status, comment=""):
    if state == lib.PICLOUD_STATE_HELD:
        return "waiting"
    if state == lib.PICLOUD_STATE_QUEUED:
        return "queued"
    if state != lib.PICLOUD_STATE_FINISHED:
        return "processing"
    if exit_status == 0:
        return "done"
    if exit_status == EXIT_KILLED and "deleted" in comment:
        return "killed"
    if exit_status == EXIT_NEVER_RAN:
        return "stalled"
    return "error"


def _decoded(s, t):
    """A task's decoded value, decoded once."""
    if not hasattr(t, "_decoded_value"):
        t._decoded_value = _payload.decode(t.value, lambda name: memoryview(s.map_segment(name).mapping))
    return t._decoded_value


def _element(jid, t):
    """For an element of a chunked map whose task returned: its entry."""
    chunk = jid.chunk
    if chunk == 1 or t.outcome != lib.PICLOUD_OUTCOME_RETURNED:
        return None
    return t._decoded_value[jid.index % chunk]


def _element_error(jid, t):
    """``(exception, "Type: message", traceback)`` of a failed element of a chunked map."""
    if jid.chunk == 1 or t.outcome != lib.PICLOUD_OUTCOME_RETURNED:
        return None
    _decoded(session(), t)
    entry = _element(jid, t)
    return None if entry[0] else entry[1:]


def _element_status(jid, t):
    word = _status_word(t.state, t.exit_status, t.comment)
    if word == "done" and _element_error(jid, t):
        return "error"
    return word


def _value(s, jid, t, ignore_errors):
    word = _status_word(t.state, t.exit_status, t.comment)
    if t.outcome == lib.PICLOUD_OUTCOME_RETURNED:
        value = _decoded(s, t)
        chunk = jid.chunk
        if chunk == 1:
            return value
        entry = value[jid.index % chunk]
        if entry[0]:
            return entry[1]
        _, remote, error, tb = entry
        exc = CloudException(f"job {jid.job_id} ({t.id}) failed: {error}\nRemote traceback:\n{tb.rstrip()}",
                             jid=jid, status="error", remote=remote)
        if ignore_errors:
            return exc
        raise exc
    remote = None
    if t.outcome == lib.PICLOUD_OUTCOME_RAISED and t.value:
        try:
            remote = _payload.decode(t.value, lambda name: memoryview(s.map_segment(name).mapping))
        except Exception:
            remote = None
    if t.outcome in (lib.PICLOUD_OUTCOME_RAISED, lib.PICLOUD_OUTCOME_LOAD_FAILED):
        message = f"job {t.id} failed: {t.error}"
        if t.traceback:
            message += "\nRemote traceback:\n" + t.traceback.rstrip()
    else:
        message = f"job {t.id} {word}: {t.comment or f'exit status {t.exit_status}'}"
    exc = CloudException(message, jid=jid, status=word, remote=remote)
    if ignore_errors:
        return exc
    raise exc


def _progress(elements, tasks):
    """A progress bar of ``tasks`` tasks for a map of ``elements``, when it
    is long and the bar can be shown; else None."""
    if elements < PROGRESS_MIN:
        return None
    interactive = sys.stdout.isatty() or "ipykernel" in sys.modules
    if not interactive:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=tasks, unit="task")


def _tasks_to_wait_for(s, jids):
    """``(seqs, tasks)``: the jobs to wait for as a whole, and one jid for
    each task of a map to wait for alone (when ``jids`` name some but not
    all of its tasks, at most ``TASK_WAITS``, so that the elements named
    need not wait for the rest of their map)."""
    named = {}
    for j in jids:
        named.setdefault(j.seq, {})[j.task_index] = j
    with s.cache_lock:
        for seq in [seq for seq in named if seq in s.ended]:
            del named[seq]          # ended, and its outcomes are here
    seqs, tasks = [], []
    for seq, by_task in named.items():
        if None in by_task or len(by_task) > TASK_WAITS or len(by_task) == s.task_counts.get(seq):
            seqs.append(seq)
        else:
            tasks.extend(by_task.values())
    return seqs, tasks


def _keep_if_ended(s, seqs):
    """Jobs whose named tasks were waited for one by one: those that have
    ended altogether are fetched and cached whole, which lets go of their
    argument segments."""
    for seq in seqs:
        with s.cache_lock:
            if seq in s.ended:
                continue
        try:
            _wait(s, [seq], 0)
        except CloudTimeoutError:
            continue        # still running: kept when it is waited for whole
        _tasks(s, seq)


def _wait_with_progress(s, jids, timeout, results=True):
    """Waits until the jobs of ``jids`` have ended (the tasks named, for a
    map of which few are named); with ``results``, caches their outcomes
    too."""
    seqs, tasks = _tasks_to_wait_for(s, jids)
    if tasks:
        deadline = None if timeout is None else time.monotonic() + timeout
        for j in tasks:
            _ended_task(s, j, deadline)
        _keep_if_ended(s, {j.seq for j in tasks})
        if timeout is not None:
            timeout = max(0.0, deadline - time.monotonic())
    if not seqs:
        return
    wait = _wait_results if results else _wait
    bar = _progress(len(jids), len({(j.seq, j.task_index) for j in jids}))
    if bar is None:
        return wait(s, seqs, timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        status = ffi.new("picloud_task_status *")
        while True:
            done = 0
            for seq in seqs:
                status.struct_size = ffi.sizeof("picloud_task_status")
                check(lib.picloud_client_status(s.client(), seq, -1, status))
                done += status.array_finished if status.is_array else int(status.state == lib.PICLOUD_STATE_FINISHED)
            bar.update(done - bar.n)
            try:
                return wait(s, seqs, 0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic())))
            except CloudTimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise CloudTimeoutError(f"timed out after {timeout} s waiting for {len(seqs)} job(s); they go on")
    finally:
        bar.close()


def result(jids, timeout=None, ignore_errors=False):
    """The value of each job (one value for one jid), waiting for them.
    A job that failed raises :class:`CloudException`, or with
    ``ignore_errors=True`` is returned as one. ``timeout`` (seconds) raises
    :class:`CloudTimeoutError`; the jobs go on."""
    if type(jids) is Jid and jids.index is None:
        # One call, the commonest case, without the list machinery below.
        s = session()
        seq = jids.seq
        _wait_results(s, (seq,), timeout)
        return _value(s, jids, _tasks(s, seq)[0], ignore_errors)
    jids, single = _as_list(jids)
    s = session()
    _wait_with_progress(s, jids, timeout)
    values = [_value(s, j, _task(s, j), ignore_errors) for j in jids]
    return values[0] if single else values


def iresult(jids, timeout=None, ignore_errors=False):
    """Yields the value of each job in order, each as soon as it is ready."""
    jids, _ = _as_list(jids)
    s = session()
    deadline = None if timeout is None else time.monotonic() + timeout
    for j in jids:
        yield _value(s, j, _ended_task(s, j, deadline), ignore_errors)


def _ended_task(s, jid, deadline):
    """The task that runs ``jid``, once it has ended: from the caches, or
    waited for (until ``deadline``, a ``time.monotonic()``) and fetched in one
    request, then cached."""
    index = _task_index(jid)
    key = (jid.seq, -1 if index is None else index)
    with s.cache_lock:
        tasks = s.ended.get(jid.seq)
        if tasks is not None:
            return tasks[index or 0]
        task = s.ended_tasks.get(key)
    if task is not None:
        return task
    out = ffi.new("picloud_results **")
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    _sliced(timeout, 1, lambda ms: lib.picloud_client_wait_task(s.client(), key[0], key[1], ms, out))
    tasks = [t for _, t in _unpack(out[0])]
    if index is None:
        _keep(s, jid.seq, tasks)
        return tasks[0]
    with s.cache_lock:
        s.ended_tasks[key] = tasks[0]
    return tasks[0]


def join(jids, timeout=None, ignore_errors=False):
    """Waits until the jobs have ended; raises :class:`CloudException` for
    the first that failed unless ``ignore_errors``."""
    jids, _ = _as_list(jids)
    s = session()
    _wait_with_progress(s, jids, timeout, results=not ignore_errors)
    if not ignore_errors:
        for j in jids:
            t = _task(s, j)
            if t.exit_status != 0 or _element_error(j, t):
                _value(s, j, t, False)


def status(jids):
    """PiCloud's words for where each job stands: ``waiting``, ``queued``,
    ``processing``, ``done``, ``error``, ``stalled`` or ``killed``."""
    jids, single = _as_list(jids)
    s = session()
    out = ffi.new("picloud_task_status *")
    words = []
    for j in jids:
        with s.cache_lock:
            cached = s.ended.get(j.seq)
        if cached is not None:
            words.append(_element_status(j, cached[_task_index(j) or 0]))
            continue
        index = _task_index(j)
        out.struct_size = ffi.sizeof("picloud_task_status")
        check(lib.picloud_client_status(s.client(), j.seq, -1 if index is None else index, out))
        if out.state == lib.PICLOUD_STATE_FINISHED:
            # The comment tells killed from failed.
            words.append(_element_status(j, _task(s, j)))
        else:
            words.append(_status_word(out.state, out.exit_status if out.has_exit_status else None))
    return words[0] if single else words


_INFO = ("status", "stdout", "stderr", "runtime", "cputime", "memory", "exception", "exit_status",
         "node", "comment", "job_id")


def info(jids, info_requested=None):
    """Facts about each job, as a dict per jid (all of them, or those named
    in ``info_requested``): status, stdout, stderr, runtime and cputime
    (seconds), memory (peak bytes), exception (the remote traceback),
    exit_status, node, comment, job_id."""
    jids, single = _as_list(jids)
    wanted = _INFO if info_requested is None else tuple(info_requested)
    unknown = [w for w in wanted if w not in _INFO]
    if unknown:
        raise ValueError(f"unknown info {unknown}; known: {', '.join(_INFO)}")
    s = session()
    out = {}
    fetched = {}        # each job's tasks fetched once per call
    for j in jids:
        tasks = fetched.get(j.seq)
        if tasks is None:
            tasks = fetched[j.seq] = _tasks(s, j.seq)
        t = tasks[_task_index(j) or 0]
        element_error = _element_error(j, t)
        full = {
            "status": _element_status(j, t),
            "stdout": t.stdout,
            "stderr": t.stderr,
            "runtime": t.walltime_ms / 1000,
            "cputime": t.cput_ms / 1000,
            "memory": t.mem,
            "exception": element_error[2] if element_error else (t.traceback or t.error) or None,
            "exit_status": t.exit_status,
            "node": t.node or None,
            "comment": t.comment or None,
            "job_id": t.id,
        }
        out[j] = {k: full[k] for k in wanted}
    return out[jids[0]] if single else out


def kill(jids=None):
    """Kills the jobs (all jobs submitted by this process when None)."""
    _kill(jids, forgotten_ok=jids is None)


def _kill(jids, forgotten_ok):
    """``kill``; ``forgotten_ok``: a job the server never queued or has
    forgotten is not an error."""
    s = session()
    if jids is None:
        targets = [(seq, -1) for seq in list(s.submitted)]
    else:
        jids, _ = _as_list(jids)
        targets = [(j.seq, -1 if _task_index(j) is None else _task_index(j)) for j in jids]
    # A job that has already ended is fine to "kill".
    fine = (0, lib.PICLOUD_ERR_SERVER, lib.PICLOUD_ERR_UNKNOWN_JOB) if forgotten_ok else (0, lib.PICLOUD_ERR_SERVER)
    for seq, index in dict.fromkeys(targets):
        rc = lib.picloud_client_cancel(s.client(), seq, index)
        if rc not in fine:
            check(rc)


def delete(jids):
    """Kills the jobs if they still run and forgets their results here,
    releasing the shared memory they held for this process. (The server
    forgets finished jobs after its ``--keep-finished`` time: deleting one it
    has forgotten only forgets it here.)"""
    jids, _ = _as_list(jids)
    _kill(jids, forgotten_ok=True)
    s = session()
    for seq in {j.seq for j in jids}:
        with s.cache_lock:
            tasks = s.ended.pop(seq, None)
            for key in [k for k in s.ended_tasks if k[0] == seq]:
                tasks = (tasks or []) + [s.ended_tasks.pop(key)]
        s.job_segments.pop(seq, None)
        for t in tasks or ():
            for name in t.segments:
                s.result_segments.pop(name, None)


# --------------------------------------------------------------------------
# Shared memory


def array(shape, dtype=float):
    """A numpy array allocated in a shared-memory segment: passed to
    ``call``/``map``, workers read it in place, without a copy."""
    import numpy as np

    dtype = np.dtype(dtype)
    count = 1
    for n in (shape if isinstance(shape, tuple) else (shape,)):
        count *= int(n)
    nbytes = max(1, count * dtype.itemsize)
    s = session()
    seg = s.create_segment(nbytes)
    _live_mappings[seg.name] = seg.mapping
    return np.ndarray(shape, dtype=dtype, buffer=seg.mapping)
