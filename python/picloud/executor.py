"""``picloud.Executor``: a ``concurrent.futures.Executor`` whose tasks are
picloud jobs, so ``as_completed`` and ``wait`` work on them.

``submit`` is ``cloud.call``, except that it returns once the server has
queued the job (a refusal raises there); one background thread, with its own
server connection, waits for any pending job to end and completes its
future.
"""

import concurrent.futures
import threading

from . import cloud
from ._ffi import ConnectionLost, lib
from ._session import session


class Executor(concurrent.futures.Executor):
    """Runs each submitted call as a picloud job. ``call_options`` (reserved
    keywords such as ``_cores``) apply to every job."""

    def __init__(self, **call_options):
        unknown = set(call_options) - cloud._RESERVED
        if unknown:
            raise TypeError(f"unknown options {sorted(unknown)}")
        self._options = call_options
        self._pending = {}          # seq -> Future
        self._lock = threading.Condition()
        self._shutdown = False
        self._thread = None

    def submit(self, fn, /, *args, **kwargs):
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to an Executor that was shut down")
            # Submitting under the lock: a shutdown waits for it, and the
            # watcher cannot stop between the job's submission and its entry.
            jid = cloud._call(fn, args, {**kwargs, **self._options}, pipelined=False)
            future = concurrent.futures.Future()
            future.jid = jid
            future.set_running_or_notify_cancel()
            self._pending[jid.seq] = future
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="picloud-executor", daemon=True)
                self._thread.start()
            self._lock.notify()
        return future

    def _watch(self):
        s = session()
        while True:
            with self._lock:
                while not self._pending and not self._shutdown:
                    self._lock.wait()
                if not self._pending:
                    return
                seqs = list(self._pending)
            try:
                ended = cloud._wait(s, seqs, 0.2, mode=lib.PICLOUD_WAIT_ANY)
            except cloud.CloudTimeoutError:
                continue
            except ConnectionLost as e:  # the connection broke: fail what is pending
                with self._lock:
                    pending, self._pending = self._pending, {}
                for future in pending.values():
                    future.set_exception(e)
                s.reset_client()
                continue
            except Exception:
                # One job's trouble (say, the server forgot it): find it, and
                # fail only its future.
                ended = {seq: self._failed_alone(s, seq) for seq in seqs}
            for seq, done in ended.items():
                if not done:
                    continue
                with self._lock:
                    future = self._pending.pop(seq, None)
                if future is None:
                    continue
                try:
                    future.set_result(cloud.result(future.jid))
                except BaseException as e:
                    future.set_exception(e)

    def _failed_alone(self, s, seq):
        """Whether job ``seq`` has ended; a job the server cannot wait for
        fails its future (and counts as not ended)."""
        try:
            return cloud._wait(s, [seq], 0, mode=lib.PICLOUD_WAIT_ANY)[seq]
        except cloud.CloudTimeoutError:
            return False
        except Exception as e:
            with self._lock:
                future = self._pending.pop(seq, None)
            if future is not None:
                future.set_exception(e)
            return False

    def shutdown(self, wait=True, *, cancel_futures=False):
        with self._lock:
            self._shutdown = True
            pending = dict(self._pending) if cancel_futures else {}
            self._lock.notify()
        if pending:
            cloud.kill([f.jid for f in pending.values()])
        if wait and self._thread is not None:
            self._thread.join()
