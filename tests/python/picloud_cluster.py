"""Helpers for end-to-end tests of Python tasks: a real `picloud up` (server
and agent processes) in a temporary state directory, driven through the real
`picloud python submit|results` commands and the agent's local socket.

A module of its own (not `conftest`), so that tests and benchmarks import it
by a name no other directory's conftest shadows."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import pytest

ROOT = Path(__file__).resolve().parents[2]
PYTHON_DIR = ROOT / "python"
sys.path.insert(0, str(PYTHON_DIR))

from picloud import _payload, _wire  # noqa: E402


def picloud_bin():
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    path = target / "debug" / "picloud"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `cargo build --workspace --bins` first")
    return path


class Cluster:
    """A running `picloud up` and helpers to use it."""

    def __init__(self, directory, python_dir=PYTHON_DIR, name="pytest", up_args=()):
        self.dir = Path(directory)
        self.bin = picloud_bin()
        self.env = dict(os.environ, PICLOUD_DIR=str(self.dir), PICLOUD_PYTHONPATH=str(python_dir))
        self.log = open(self.dir / "up.log", "wb")
        self.proc = subprocess.Popen(
            [self.bin, "up", "--dir", self.dir, "--name", name, "--kill-grace", "1", *map(str, up_args)],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"picloud up exited: {self.read_log()}")
            if (self.dir / "agent.sock").exists() and self.run("nodes", check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"picloud up did not come up: {self.read_log()}")

    def read_log(self):
        return (self.dir / "up.log").read_text(errors="replace")

    def run(self, *args, check=True, **kw):
        out = subprocess.run([self.bin, *map(str, args)], env=self.env, capture_output=True, text=True, **kw)
        if check and out.returncode != 0:
            raise AssertionError(f"picloud {' '.join(map(str, args))} failed: {out.stderr}")
        return out

    def submit(self, func, *arg_sets, segments=(), options=(), user=None, interpreter=sys.executable):
        """Submits `func` once per argument tuple; returns the job id. With
        `user` (uid, gid), `picloud python submit` runs as that user."""
        work = Path(tempfile.mkdtemp(dir=self.dir))
        os.chmod(work, 0o755)
        (work / "f.pkl").write_bytes(cloudpickle.dumps(func, protocol=5))
        cmd = ["python", "submit", "--function", work / "f.pkl", "--interpreter", interpreter]
        for i, args in enumerate(arg_sets):
            data, names = _payload.encode_args(args, {})
            (work / f"a{i}").write_bytes(data)
            cmd += ["--args", work / f"a{i}"]
            segments = list(segments) + list(names)
        for name in dict.fromkeys(segments):
            cmd += ["--segment", name]
        cmd += list(options)
        kw = {}
        if user is not None:
            shutil.chown(work, user[0], user[1])
            for f in work.iterdir():
                shutil.chown(f, user[0], user[1])
            kw = dict(user=user[0], group=user[1], extra_groups=[], cwd=work)
        return self.run(*cmd, **kw).stdout.strip()

    def results(self, job_id, timeout=60, user=None, check=True):
        kw = {} if user is None else dict(user=user[0], group=user[1], extra_groups=[], cwd="/")
        out = self.run("python", "results", "--wait", "--timeout", timeout, job_id, check=check, **kw)
        return json.loads(out.stdout) if out.returncode == 0 else out

    def value(self, result, map_segment=None):
        """The decoded return value (or exception) of one result."""
        return _payload.decode(bytes.fromhex(result["outcome"]["value"]), map_segment)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class AgentClient:
    """A client of the agent's local socket (shared-memory segments)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.reader = _wire.FrameReader(self.sock, _wire.AGENT_TO_CLIENT)

    def request(self, msg):
        """Sends `msg`; returns the reply message (Segment, Ok or Error)."""
        _wire.send_message(self.sock, msg)
        frame = self.reader.read_frame()
        assert frame is not None, "the agent closed the connection"
        return _wire.decode_body(*frame, _wire.AGENT_TO_CLIENT)

    def close(self):
        self.sock.close()
