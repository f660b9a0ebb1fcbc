"""Python tasks of two Unix users on one root agent (run as root; skipped
otherwise): a user's task runs as that user, cannot open another user's
segment or signal another user's processes, and results are the owner's."""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import pytest

from picloud_cluster import PYTHON_DIR, AgentClient, Cluster, _wire

USER_A = "picloud-test-user"
USER_B = "picloud-test-user2"
# The other user cannot enter /root, where this interpreter may live: their
# workers run the system's Python, with cloudpickle and picloud copied where
# they can read them.
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a second Unix user needs root")


def unix_user(name):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    done = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", name])
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"cannot create the user {name} (useradd exited {done.returncode})")


@pytest.fixture
def two_users():
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is missing")
    a, b = unix_user(USER_A), unix_user(USER_B)
    with tempfile.TemporaryDirectory(prefix="picloud-users-") as d:
        os.chmod(d, 0o755)
        shared = Path(d) / "lib"
        shutil.copytree(PYTHON_DIR / "picloud", shared / "picloud", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(Path(cloudpickle.__file__).parent, shared / "cloudpickle",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for root, dirs, files in os.walk(d):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        state = Path(d) / "state"
        state.mkdir(mode=0o755)
        c = Cluster(state, python_dir=shared)
        try:
            yield c, (a.pw_uid, a.pw_gid), (b.pw_uid, b.pw_gid), shared
        finally:
            c.stop()


def as_user(user, fn):
    """Runs `fn()` in a child process with `user`'s identity; returns its repr."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(user[1])
            os.setuid(user[0])
            os.write(w, repr(fn()).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(child, 0)
    return out


def test_tasks_run_as_their_owner_and_cannot_touch_other_users(two_users):
    cluster, a, b, shared = two_users
    run_as = dict(interpreter=SYSTEM_PYTHON, options=["--sys-path", str(shared)])
    b_dir = cluster.dir / "b-files"
    b_dir.mkdir()
    os.chown(b_dir, *b)
    pid_file = b_dir / "pid"

    # User B: a result big enough to live in a segment, and a task that stays.
    [big] = cluster.results(cluster.submit(lambda: b"x" * (1 << 20), (), user=b, **run_as), user=b)
    assert big["exit_status"] == 0, big
    [segment] = big["outcome"]["segments"]
    segment_path = Path("/dev/shm") / segment
    assert segment_path.stat().st_uid == b[0] and segment_path.stat().st_mode & 0o777 == 0o600

    def stay(path):
        import os
        import time

        with open(path, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(30)

    staying = cluster.submit(stay, (str(pid_file),), user=b, **run_as)
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"B's task did not start: {cluster.results(staying, user=b, check=False)}")
    b_pid = int(pid_file.read_text())

    # User A probes them.
    def probe(segment_path, pid):
        import errno
        import os

        outcome = {"uid": os.getuid(), "gid": os.getgid()}
        try:
            open(segment_path, "rb").close()
            outcome["read_segment"] = "allowed"
        except PermissionError:
            outcome["read_segment"] = "denied"
        try:
            os.kill(pid, 0)
            outcome["signal"] = "allowed"
        except OSError as e:
            outcome["signal"] = "denied" if e.errno == errno.EPERM else str(e)
        return outcome

    jid = cluster.submit(probe, (str(segment_path), b_pid), user=a, **run_as)
    [r] = cluster.results(jid, user=a)
    assert r["exit_status"] == 0, r
    outcome = cluster.value(r)
    assert (outcome["uid"], outcome["gid"]) == a
    assert outcome["read_segment"] == "denied", outcome
    assert outcome["signal"] == "denied", outcome

    # Results are their owner's: A may not read B's.
    denied = cluster.results(big["id"], user=a, check=False)
    assert isinstance(denied, subprocess.CompletedProcess) and denied.returncode != 0
    assert f"belong to {USER_B}" in denied.stderr, denied.stderr

    # Nor through the Python API, the real library over the C ABI: A is
    # told whose they are, at once, and B's job is left alone.
    import picloud
    from picloud import cloud as api

    def fetch_as_a(job_id):
        picloud.init(str(cluster.dir))
        started = time.monotonic()
        try:
            api.result(api.Jid(int(job_id.split(".")[0])), timeout=20)
        except Exception as e:
            return f"{time.monotonic() - started:.1f}s {type(e).__name__}: {e}"
        return "allowed"

    # B's finished job, and B's running one: refused before any waiting.
    for job_id in (big["id"], staying):
        denied = as_user(a, lambda: fetch_as_a(job_id))
        assert "PermissionDenied" in denied and f"belong to {USER_B}" in denied, denied
        assert float(denied.split("s ", 1)[0].strip("'\"")) < 5, denied

    # Nor may A take a reference on B's segment through the agent.
    reply = as_user(a, lambda: AgentClient(cluster.dir / "agent.sock").request(_wire.SegmentHold(segment)))
    assert reply.startswith("Error("), reply
    # B may.
    reply = as_user(b, lambda: AgentClient(cluster.dir / "agent.sock").request(_wire.SegmentHold(segment)))
    assert reply.startswith("Segment(") and str(segment_path) in reply, reply
    cluster.run("cancel", staying)
