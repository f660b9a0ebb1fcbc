"""The embedded default: with no cluster configured, the first call starts a
server and an agent for this machine (``picloud up`` in a private state
directory) and stops them when this Python process exits.

"No cluster configured" means ``PICLOUD_DIR`` is unset and no server answers
in ``~/.picloud``. With ``PICLOUD_DIR`` set, or a server running in
``~/.picloud``, picloud connects there instead and starts nothing.
"""

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time

from . import _native

#: How long the embedded cluster may take to come up.
START_TIMEOUT = 30.0


class LocalCluster:
    """A ``picloud up`` child process in a private state directory."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix=f"picloud-{os.getuid()}-")
        env = dict(os.environ, PICLOUD_DIR=self.dir, PICLOUD_PYTHONPATH=_native.package_dir())
        env.pop("PICLOUD_LOG", None)
        self._log = open(os.path.join(self.dir, "up.log"), "wb")
        self.proc = subprocess.Popen(
            # Its state directory goes when it stops: a journal would keep nothing.
            [_native.binary_path(), "up", "--dir", self.dir, "--kill-grace", "1", "--no-journal"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        atexit.register(self.stop)

    def wait_ready(self, ready):
        """Polls ``ready()`` until it is true; raises if ``picloud up`` dies or times out."""
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.002
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the local picloud cluster failed to start:\n{self.log()}")
            if ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the local picloud cluster did not start in {START_TIMEOUT} s:\n{self.log()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def log(self):
        try:
            with open(os.path.join(self.dir, "up.log"), "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self):
        """Stops the cluster (its jobs are killed) and removes its directory."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def configured_dir():
    """The state directory of a configured cluster, or None when there is none."""
    explicit = os.environ.get("PICLOUD_DIR")
    if explicit:
        return explicit
    home = os.path.join(os.path.expanduser("~"), ".picloud")
    if os.path.exists(os.path.join(home, "server.sock")):
        return home
    return None
