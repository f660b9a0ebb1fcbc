"""Python tasks through a real server, agent and warm workers: values,
exceptions, crashes, limits, and shared-memory arguments and results."""

import mmap
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from picloud_cluster import AgentClient, _payload, _wire

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="cgroup limits need root on this machine")


def ok_values(cluster, results):
    assert all(r["exit_status"] == 0 for r in results), results
    return [cluster.value(r) for r in results]


def test_map_returns_values_and_reuses_warm_workers(cluster):
    jid = cluster.submit(lambda x: (x * x, os.getpid()), *[(i,) for i in range(20)])
    values = ok_values(cluster, cluster.results(jid))
    assert [v[0] for v in values] == [i * i for i in range(20)]
    pids = {v[1] for v in values}
    # One worker per core at most: 20 tasks did not start 20 processes.
    assert len(pids) <= os.cpu_count(), pids


def test_exception_carries_type_message_traceback_and_worker_survives(cluster):
    def boom(x):
        raise ValueError(f"boom {x}")

    [r] = cluster.results(cluster.submit(boom, (7,)))
    assert r["exit_status"] == 1
    assert r["outcome"]["status"] == "raised"
    assert r["outcome"]["error"] == "ValueError: boom 7"
    assert "in boom" in r["outcome"]["traceback"]
    assert "boom 7" in r["comment"]
    exc = cluster.value(r)
    assert isinstance(exc, ValueError) and exc.args == ("boom 7",)
    [after] = cluster.results(cluster.submit(lambda: 42, ()))
    assert ok_values(cluster, [after]) == [42]


def test_segfault_and_os_exit_fail_the_task_and_the_worker_is_replaced(cluster):
    import ctypes

    [crash] = cluster.results(cluster.submit(lambda: ctypes.string_at(0), ()))
    assert crash["exit_status"] == 256 + 11, crash
    assert "killed by signal 11 (SIGSEGV)" in crash["comment"], crash
    [exited] = cluster.results(cluster.submit(lambda: os._exit(3), ()))
    assert exited["exit_status"] == 3, exited
    assert "exited with status 3" in exited["comment"], exited
    [after] = cluster.results(cluster.submit(lambda: "fine", ()))
    assert ok_values(cluster, [after]) == ["fine"]


def test_output_is_captured_per_task(cluster):
    def talk(i):
        print("out", i)
        print("err", i, file=sys.stderr)
        return i

    results = cluster.results(cluster.submit(talk, (1,), (2,)))
    assert [r["outcome"]["stdout"] for r in results] == ["out 1\n", "out 2\n"]
    assert [r["outcome"]["stderr"] for r in results] == ["err 1\n", "err 2\n"]


def test_missing_module_names_the_module(cluster, tmp_path):
    (tmp_path / "only_here_mod.py").write_text("def f():\n    return 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import only_here_mod

        [r] = cluster.results(cluster.submit(only_here_mod.f, ()))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("only_here_mod", None)
    assert r["exit_status"] == 2, r
    assert r["outcome"]["status"] == "load_failed"
    assert "only_here_mod" in r["outcome"]["error"], r
    assert "only_here_mod" in r["comment"]


def test_walltime_kills_a_hung_worker(cluster):
    import time

    [r] = cluster.results(cluster.submit(lambda: time.sleep(60), (), options=["--walltime", "1"]))
    assert "walltime" in r["comment"] and "exceeded" in r["comment"], r
    assert r["exit_status"] != 0
    [after] = cluster.results(cluster.submit(lambda: 1, ()))
    assert ok_values(cluster, [after]) == [1]


@ROOT_ONLY
def test_memory_limit_kills_the_task_with_a_clear_reason(cluster):
    def hog():
        blocks = []
        for _ in range(64):
            blocks.append(bytearray(16 << 20))
        return len(blocks)

    [r] = cluster.results(cluster.submit(hog, (), options=["--mem", "64mb"]))
    assert r["exit_status"] == 265, r
    assert "exceeded its memory limit of 64.0 MiB" in r["comment"], r
    [after] = cluster.results(cluster.submit(lambda: 2, ()))
    assert ok_values(cluster, [after]) == [2]


@ROOT_ONLY
def test_fork_bomb_hits_the_pids_limit_and_the_node_stays_healthy(cluster):
    def bomb():
        import time

        children = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                children += 1
        except OSError as e:
            raise RuntimeError(f"fork failed after {children} children: {e}")

    [r] = cluster.results(cluster.submit(bomb, ()), timeout=120)
    assert r["exit_status"] == 1, r
    assert "fork failed after" in r["outcome"]["error"], r
    [after] = cluster.results(cluster.submit(lambda: 3, ()))
    assert ok_values(cluster, [after]) == [3]


def test_segment_argument_is_read_in_place_and_large_results_come_back_in_segments(cluster):
    np = pytest.importorskip("numpy")
    agent = AgentClient(cluster.dir / "agent.sock")
    n = 4 << 20
    seg = agent.request(_wire.SegmentCreate(n * 8))
    assert isinstance(seg, _wire.Segment), seg
    with open(seg.path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), n * 8)
    arr = np.frombuffer(mm, dtype=np.float64)
    arr[:] = np.arange(n, dtype=np.float64)
    token = _payload.register_segment(seg.name, mm)

    def total(a):
        # Zero copy: the worker's array is a view of its mapping, not its own memory.
        return float(a.sum()), a.flags.owndata, a.flags.writeable, a * 2

    jid = cluster.submit(total, (arr,))
    _payload.unregister_segment(token)
    [r] = cluster.results(jid)
    assert r["exit_status"] == 0, r
    assert r["outcome"]["segments"], "a 32 MiB result travels in a segment"
    s, owndata, writeable, doubled = cluster.value(r)
    assert s == float(arr.sum())
    assert owndata is False and writeable is False
    assert np.array_equal(doubled, arr * 2)
    del arr, doubled
    agent.close()


def test_a_segment_of_another_user_cannot_be_held(cluster):
    agent = AgentClient(cluster.dir / "agent.sock")
    reply = agent.request(_wire.SegmentCreate(0))
    assert isinstance(reply, _wire.Error), reply
    reply = agent.request(_wire.SegmentRelease("picloud-nosuch-1"))
    assert isinstance(reply, _wire.Error) and "picloud-nosuch-1" in reply.message, reply
    seg = agent.request(_wire.SegmentCreate(4096))
    st = os.stat(seg.path)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()
    agent.close()


def picloud_cgroups():
    """Every cgroup directory the agents of this machine made, on any hierarchy."""
    found = set()
    for base in Path("/sys/fs/cgroup").glob("*"):
        for path in base.rglob("picloud-agent-*"):
            if path.is_dir():
                found.add(str(path))
    return found


def test_nothing_is_left_behind_when_the_agent_stops(tmp_path):
    np = pytest.importorskip("numpy")
    before = picloud_cgroups()
    os.chmod(tmp_path, 0o755)
    from picloud_cluster import Cluster

    cluster = Cluster(tmp_path)
    try:
        # A worker with a memory limit (its own cgroup), a result in a segment.
        [r] = cluster.results(cluster.submit(lambda: np.ones(1 << 20), (), options=["--mem", "512mb"]))
        assert r["exit_status"] == 0, r
        [segment] = r["outcome"]["segments"]
        assert (Path("/dev/shm") / segment).exists()
        if os.geteuid() == 0:
            assert picloud_cgroups() - before, "the worker has a cgroup while the agent runs"
    finally:
        cluster.stop()
    prefix = segment.rsplit("-", 1)[0] + "-"
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(prefix)]
    assert picloud_cgroups() - before == set()
