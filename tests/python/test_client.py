"""The `picloud` Python API (`import picloud as cloud`) through the real
libpicloud C ABI against a real server and agent."""

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from picloud_cluster import PYTHON_DIR, Cluster

import picloud as cloud
from picloud import _ffi, _session
import picloud.cloud as api


@pytest.fixture(scope="module")
def cluster():
    with tempfile.TemporaryDirectory(prefix="picloud-client-") as d:
        os.chmod(d, 0o755)
        c = Cluster(d)
        cloud.init(c.dir)
        try:
            yield c
        finally:
            c.stop()


def test_call_and_map_with_lambdas_and_closures(cluster):
    offset = 100

    def add(x, y=0):
        return x + y + offset

    assert cloud.result(cloud.call(add, 1, y=2)) == 103
    jids = cloud.map(lambda x, y: x * y, range(50), range(50))
    assert len(jids) == 50 and len(set(jids)) == 50
    assert cloud.result(jids) == [i * i for i in range(50)]
    assert list(cloud.iresult(jids[:5])) == [0, 1, 4, 9, 16]
    cloud.join(jids)
    assert cloud.status(jids[:3]) == ["done"] * 3


def test_each_call_sees_what_its_function_captures_at_that_call(cluster):
    step = 1

    def advance(x):
        return x + step

    first = cloud.call(advance, 10)
    step = 5                       # rebinds the closure's cell
    second = cloud.call(advance, 10)
    assert cloud.result([first, second]) == [11, 15]


def test_a_long_map_is_submitted_in_batches(cluster, monkeypatch):
    monkeypatch.setattr(api, "BATCH_ELEMENTS", 400)
    jids = cloud.map(lambda x: -x, range(1000), _chunksize=1)
    assert len({j.seq for j in jids}) == 3
    assert cloud.result(jids) == [-i for i in range(1000)]


def test_chunked_map_keeps_one_value_or_error_per_element(cluster):
    def picky(x):
        if x % 100 == 7:
            raise ValueError(f"bad {x}")
        return x * 2

    jids = cloud.map(picky, range(2000))   # chunked automatically
    assert len(jids) == 2000 and len(set(jids)) == 2000
    values = cloud.result(jids, ignore_errors=True)
    for i, v in enumerate(values):
        if i % 100 == 7:
            assert isinstance(v, cloud.CloudException) and f"bad {i}" in str(v), v
        else:
            assert v == i * 2
    assert cloud.status([jids[6], jids[7]]) == ["done", "error"]
    assert "bad 7" in cloud.info(jids[7], ["exception"])["exception"]
    with pytest.raises(cloud.CloudException):
        cloud.result(jids[7])
    assert list(cloud.iresult(jids[:3])) == [0, 2, 4]
    explicit = cloud.map(lambda x: x + 1, range(10), _chunksize=4)
    assert cloud.result(explicit) == list(range(1, 11))


def test_exceptions_come_back_with_the_remote_traceback(cluster):
    def fails(x):
        raise KeyError(f"missing {x}")

    jid = cloud.call(fails, 5)
    with pytest.raises(cloud.CloudException) as info:
        cloud.result(jid)
    e = info.value
    assert e.jid == jid and e.status == "error"
    assert "KeyError" in str(e) and "missing 5" in str(e) and "in fails" in str(e)
    assert isinstance(e.remote, KeyError)
    returned = cloud.result([jid], ignore_errors=True)[0]
    assert isinstance(returned, cloud.CloudException)
    assert cloud.status(jid) == "error"
    facts = cloud.info(jid)
    assert facts["status"] == "error" and "KeyError" in facts["exception"]
    with pytest.raises(cloud.CloudException):
        cloud.join([jid])


def test_unpicklable_argument_raises_at_once_and_submits_nothing(cluster):
    from picloud._session import session

    before = list(session().submitted)
    with pytest.raises(TypeError) as info:
        cloud.call(lambda a, b: None, 1, threading.Lock())
    assert "argument 1" in str(info.value) and "lock" in str(info.value).lower()
    with pytest.raises(TypeError) as info:
        cloud.map(lambda a: None, [1, threading.Lock()])
    assert "element 1" in str(info.value)
    assert list(session().submitted) == before


def test_jobs_known_to_have_ended_leave_the_list_kill_uses(cluster):
    from picloud._session import session

    jid = cloud.call(int, "4")
    assert jid.seq in session().submitted
    assert cloud.result(jid) == 4
    assert jid.seq not in session().submitted
    cloud.kill()                               # the jobs still listed; ended ones are fine


def test_result_timeout_leaves_the_job_running(cluster):
    jid = cloud.call(time.sleep, 30)
    with pytest.raises(cloud.CloudTimeoutError):
        cloud.result(jid, timeout=0.3)
    assert cloud.status(jid) in ("processing", "queued")
    cloud.kill(jid)
    cloud.join(jid, ignore_errors=True)
    assert cloud.status(jid) == "killed"


def test_unknown_job_ids_are_clear_errors(cluster):
    with pytest.raises(_ffi.UnknownJob) as info:
        cloud.status(cloud.Jid(999_999))
    assert "999999" in str(info.value)


def test_a_call_reaches_the_server_with_no_further_request(cluster):
    # call() returns before the server hears of the job; with no other
    # request from this process, libpicloud sends it within a millisecond.
    jid = cloud.call(lambda: 7)
    deadline = time.monotonic() + 10
    while True:
        out = cluster.run("stat", "--json", jid.job_id, check=False)
        if out.returncode == 0 and json.loads(out.stdout):
            break
        assert time.monotonic() < deadline, f"job {jid.job_id} never reached the server: {out.stderr}"
        time.sleep(0.05)
    assert cloud.result(jid) == 7


def test_a_call_is_seen_at_once_by_another_thread(cluster):
    # Each thread has its own connection: a request from one sends the
    # calls another has buffered first.
    jids, answers = [], []
    ready, asked = threading.Event(), threading.Event()

    def ask():
        for _ in range(30):
            ready.wait()
            ready.clear()
            try:
                answers.append(cloud.status(jids[-1]))
            except Exception as e:  # noqa: BLE001 - reported below
                answers.append(e)
            asked.set()

    t = threading.Thread(target=ask)
    t.start()
    for _ in range(30):
        jids.append(cloud.call(time.sleep, 0))
        ready.set()
        asked.wait()
        asked.clear()
    t.join()
    errors = [a for a in answers if isinstance(a, Exception)]
    assert not errors, errors[:3]
    assert len(answers) == 30
    assert cloud.result(jids) == [None] * 30


def test_a_call_the_server_refuses_raises_when_its_jid_is_used(cluster):
    before = cloud.call(lambda: "before")
    refused = cloud.call(lambda: None, _cores=10_000)
    after = cloud.call(lambda: "after", _depends_on=before)
    for look in (cloud.result, cloud.status, cloud.info):
        with pytest.raises(_ffi.PicloudError) as info:
            look(refused)
        assert f"job {refused.seq} was not queued" in str(info.value)
        assert "cpus" in str(info.value) or "core" in str(info.value), str(info.value)
    # The calls around it are not affected.
    assert cloud.result([before, after]) == ["before", "after"]


def test_reserved_keywords(cluster):
    assert cloud.result(cloud.call(lambda: os.environ["COLOR"], _env={"COLOR": "blue"})) == "blue"
    assert cloud.result(cloud.call(lambda: len(os.sched_getaffinity(0)), _cores=2)) == 2
    pids = cloud.result([cloud.call(os.getpid, _kill_process=True) for _ in range(2)])
    assert pids[0] != pids[1]
    # _max_runtime is in minutes: 0.02 minutes is 1.2 s.
    slow = cloud.call(time.sleep, 30, _max_runtime=0.02, _priority=10, _restartable=False)
    with pytest.raises(cloud.CloudException) as info:
        cloud.result(slow)
    assert "walltime" in str(info.value)
    labelled = cloud.call(lambda: 1, _label="my-label")
    cloud.join(labelled)
    stat = cluster.run("stat", "--json", labelled.job_id)
    assert json.loads(stat.stdout)[0]["spec"]["name"] == "my-label", stat.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="memory limits need cgroups (root here)")
def test_memory_limit(cluster):
    jid = cloud.call(lambda: bytearray(512 << 20), _memory=64)
    with pytest.raises(cloud.CloudException) as info:
        cloud.result(jid)
    assert "memory limit of 64.0 MiB" in str(info.value)


def test_dependencies(cluster, tmp_path):
    marker = tmp_path / "first-done"

    def first():
        time.sleep(0.3)
        marker.write_text("x")

    a = cloud.call(first)
    b = cloud.call(lambda: marker.exists(), _depends_on=a)
    assert cloud.result(b) is True
    failing = cloud.call(lambda: 1 / 0)
    never = cloud.call(lambda: 1, _depends_on=[failing])
    ignored = cloud.call(lambda: 2, _depends_on=[failing], _depends_on_errors="ignore")
    assert cloud.result(ignored) == 2
    cloud.join(never, ignore_errors=True)
    assert cloud.status(never) == "stalled"


def test_info_stdout_and_resources(cluster):
    def chatty():
        print("hello from the job")
        return sum(range(100_000))

    jid = cloud.call(chatty)
    cloud.join(jid)
    facts = cloud.info(jid)
    assert facts["stdout"] == "hello from the job\n"
    assert facts["status"] == "done" and facts["exit_status"] == 0
    assert facts["runtime"] >= 0 and facts["memory"] > 0
    assert set(cloud.info(jid, ["stdout", "status"])) == {"stdout", "status"}


def test_kill_and_delete(cluster):
    jids = cloud.map(time.sleep, [30, 30])
    cloud.kill(jids)
    cloud.join(jids, ignore_errors=True)
    assert cloud.status(jids) == ["killed", "killed"]
    cloud.delete(jids)


def test_executor_works_with_as_completed_and_wait(cluster):
    with cloud.Executor() as ex:
        futures = [ex.submit(pow, 2, i) for i in range(8)]
        got = sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=60))
        assert got == sorted(2**i for i in range(8))
        bad = ex.submit(lambda: 1 / 0)
        done, _ = concurrent.futures.wait([bad], timeout=60)
        assert bad in done
        assert isinstance(bad.exception(), cloud.CloudException)


def test_executor_raises_a_refusal_at_submit_and_other_futures_go_on(cluster):
    with cloud.Executor() as ex:
        slow = ex.submit(time.sleep, 0.5)
        with pytest.raises(Exception, match="cpus|cores|node"):
            ex.submit(time.sleep, 0, _cores=100_000)
        assert slow.result(timeout=60) is None
        # A job the server forgets while its future waits fails that future only.
        gone = ex.submit(time.sleep, 30)
        kept = ex.submit(pow, 2, 5)
        with ex._lock:
            ex._pending[1 << 40] = ex._pending.pop(gone.jid.seq)
        assert kept.result(timeout=60) == 32
        assert isinstance(gone.exception(timeout=60), _ffi.UnknownJob)
        cloud.kill(gone.jid)


def test_function_from_a_module_workers_cannot_import(cluster, tmp_path):
    module_dir = tmp_path / "scratch"
    module_dir.mkdir()
    (module_dir / "scratch_mod_for_picloud.py").write_text(textwrap.dedent("""
        FACTOR = 7

        def times(x):
            return x * FACTOR
    """))
    sys.path.insert(0, str(module_dir))
    try:
        import scratch_mod_for_picloud as scratch
    finally:
        sys.path.remove(str(module_dir))
    # Gone from the disk: only the pickled code can bring it to the worker.
    shutil.rmtree(module_dir)
    assert cloud.result(cloud.map(scratch.times, [1, 2, 3])) == [7, 14, 21]


def test_iresult_yields_each_element_as_it_ends(cluster):
    def slow_for_one(x):
        import time

        time.sleep(3 * x)
        return x

    jids = cloud.map(slow_for_one, [0, 1], _chunksize=1)
    started = time.monotonic()
    it = cloud.iresult(jids)
    assert next(it) == 0
    first = time.monotonic() - started
    assert first < 2.5, f"the first element waited for the second: {first:.1f} s"
    with pytest.raises(cloud.CloudTimeoutError):
        list(cloud.iresult(jids[1:], timeout=0.3))
    assert next(it) == 1
    assert time.monotonic() - started >= 2.5


def test_jids_of_a_chunked_map_stay_readable_after_init_to_the_same_cluster(cluster):
    jids = cloud.map(lambda x: x * 3, range(600))     # chunked: 600 > 256 elements
    cloud.init(cluster.dir)
    assert cloud.result(jids) == [x * 3 for x in range(600)]
    assert cloud.status(jids[599]) == "done"


def test_jids_of_a_chunked_map_stored_as_ints_are_read_in_another_process(cluster):
    def odd_fails(x):
        if x % 2:
            raise ValueError(f"odd {x}")
        return x * 3

    jids = cloud.map(odd_fails, range(600), _chunksize=7)
    cloud.join(jids, ignore_errors=True)
    assert jids[20].chunk == 7 and jids[20].task_index == 2 and jids[20].job_id == f"{jids[20].seq}[2]"
    picked = [int(j) for j in (jids[0], jids[13], jids[20], jids[599])]
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(PYTHON_DIR)!r})
        import picloud as cloud
        cloud.init({str(cluster.dir)!r})
        jids = json.loads(sys.argv[1])
        values = cloud.result(jids, ignore_errors=True)
        print(json.dumps([v if isinstance(v, int) else str(v).splitlines()[0] for v in values]))
        print(json.dumps(cloud.status(jids)))
    """)
    out = subprocess.run([sys.executable, "-c", code, json.dumps(picked)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    values, states = (json.loads(line) for line in out.stdout.splitlines())
    assert values[0] == 0 and values[2] == 60, values
    assert "odd 13" in values[1] and "odd 599" in values[3], values
    assert states == ["done", "error", "done", "error"]


def test_a_map_of_one_element_is_an_array_its_jid_names(cluster):
    def slow_square(x):
        time.sleep(0.3)
        return x * x

    jids = cloud.map(slow_square, [3])
    assert jids[0].job_id == f"{jids[0].seq}[0]"
    assert cloud.status(jids) in (["queued"], ["processing"])
    assert list(cloud.iresult(jids)) == [9]
    assert cloud.info(jids[0], ["job_id"])["job_id"].startswith(f"{jids[0].seq}[0]")
    cloud.kill(jids)                                     # ended already: fine
    short = cloud.map(slow_square, range(5), _chunksize=2)  # its last task has one element
    assert cloud.result(short) == [0, 1, 4, 9, 16]


def test_result_of_one_element_waits_for_it_not_for_its_map(cluster):
    def nap(t):
        time.sleep(t)
        return t

    jids = cloud.map(nap, [0, 30])
    try:
        assert cloud.result(jids[0], timeout=20) == 0
        cloud.join([jids[0]], timeout=20)
        with pytest.raises(cloud.CloudTimeoutError):
            cloud.result(jids, timeout=0.5)
    finally:
        cloud.kill(jids)


def test_all_of_a_small_map_is_waited_for_in_one_request(cluster, monkeypatch):
    alone = []
    ended_task = api._ended_task
    monkeypatch.setattr(api, "_ended_task", lambda s, j, d: alone.append(j) or ended_task(s, j, d))
    jids = cloud.map(lambda x: x + 1, range(10))
    assert cloud.result(jids[:3]) == [1, 2, 3]
    assert len(alone) == 3                     # some of its tasks: each alone
    more = cloud.map(lambda x: x + 2, range(10))
    assert cloud.result(more) == list(range(2, 12))
    assert len(alone) == 3                     # all of them: the job, in one request


def test_a_small_map_lets_go_of_its_arguments_once_its_results_are_in(cluster):
    np = pytest.importorskip("numpy")
    s = _session.session()
    jids = cloud.map(lambda a: float(a.sum()), [np.ones(1 << 15) for _ in range(4)])   # 256 KiB each
    assert jids[0].seq in s.job_segments
    assert cloud.result(jids) == [float(1 << 15)] * 4
    assert jids[0].seq not in s.job_segments and jids[0].seq not in s.submitted


def test_a_map_that_fails_midway_cancels_the_batches_it_submitted(cluster, monkeypatch):
    monkeypatch.setattr(api, "BATCH_ELEMENTS", 2)
    submitted = []
    submit = api._submit

    def recording(*args, **kwargs):
        submitted.append(submit(*args, **kwargs))
        return submitted[-1]

    monkeypatch.setattr(api, "_submit", recording)
    elements = [1, 2, 3, 4, threading.Lock()]
    with pytest.raises(TypeError, match="element 4"):
        cloud.map(lambda x: time.sleep(30), elements, _chunksize=1)
    assert len(submitted) == 1           # elements 0 and 1; 2 and 3 were not sent yet
    assert submitted[0] not in _session.session().submitted       # forgotten here too
    cancelled = [cloud.Jid(seq, index) for seq in submitted for index in (0, 1)]
    cloud.join(cancelled, timeout=30, ignore_errors=True)    # a kill takes effect soon, not at once
    assert cloud.status(cancelled) == ["killed", "killed"]


def test_delete_of_a_job_the_server_does_not_know_forgets_it_here(cluster):
    cloud.delete(cloud.Jid(1 << 40))
    jids = cloud.map(lambda x: x, range(3))
    cloud.join(jids)
    cloud.delete(j for j in jids)                       # a generator
    assert all(j.seq not in _session.session().ended for j in jids)


def test_a_forked_child_does_not_release_the_parents_arrays(cluster):
    np = pytest.importorskip("numpy")
    import gc
    data = cloud.array((1 << 17,), np.float64)
    data[:] = 1.0
    pid = os.fork()
    if pid == 0:
        try:
            del data
            gc.collect()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    other = cloud.array((1 << 17,), np.float64)
    other[:] = 7.0
    assert not np.shares_memory(data, other)
    assert (data == 1.0).all()


def test_a_jid_keeps_its_parts_through_int():
    for parts in [(1, None, 1), (7, 0, 1), (1 << 40, 12, 1), (3, 599, 7), ((1 << 64) - 1, 0xFFFFFFFE, 1000)]:
        jid = cloud.Jid(*parts)
        back = cloud.Jid.from_int(int(jid))
        assert (back.seq, back.index, back.chunk) == parts
    assert int(cloud.Jid(5)) == 5 << 32 and int(cloud.Jid(5, 2)) == (5 << 32) | 3
    import copy
    import pickle
    for jid in [cloud.Jid(5), cloud.Jid(9, 20, 7)]:
        for back in (pickle.loads(pickle.dumps(jid)), copy.deepcopy(jid), copy.copy(jid)):
            assert type(back) is cloud.Jid and back == jid
            assert (back.seq, back.index, back.chunk) == (jid.seq, jid.index, jid.chunk)
    for bad in [(-1,), (1 << 64,), (1, 0xFFFFFFFF), (1, None, 2), (1, 0, 0)]:
        with pytest.raises(ValueError):
            cloud.Jid(*bad)


def test_init_with_the_servers_socket_uses_the_agent_beside_it(cluster, monkeypatch):
    np = pytest.importorskip("numpy")
    monkeypatch.delenv("PICLOUD_DIR", raising=False)
    monkeypatch.setenv("HOME", str(cluster.dir / "nohome"))
    try:
        cloud.init(str(cluster.dir / "server.sock"))
        big = np.ones(1 << 14)                      # 128 KiB: goes through a segment
        assert cloud.result(cloud.call(lambda a: float(a.sum()), big)) == float(1 << 14)
    finally:
        cloud.init(cluster.dir)


def test_a_segment_that_cannot_be_had_is_not_called_a_pickling_error(cluster, monkeypatch):
    np = pytest.importorskip("numpy")

    def refuse(size):
        raise _ffi.PicloudError(_ffi.lib.PICLOUD_ERR_SERVER, "the agent is out of segments")

    monkeypatch.setattr(_session.session(), "create_segment", refuse)
    with pytest.raises(_ffi.PicloudError, match="out of segments"):
        cloud.call(lambda a: 0, np.ones(1 << 14))


def test_outcomes_over_one_reply_are_fetched_task_by_task(cluster):
    def chatty(i):
        sys.stdout.write("x" * (1 << 20))
        return i

    jids = cloud.map(chatty, range(68))            # 68 MiB of output in all
    assert cloud.result(jids, timeout=300) == list(range(68))
    assert cloud.status(jids[67]) == "done"
    assert len(cloud.info(jids[3], ["stdout"])["stdout"]) == 1 << 20


def test_a_1gib_array_argument_is_read_without_a_copy(cluster):
    np = pytest.importorskip("numpy")
    n = (1 << 30) // 8
    arr = cloud.array((n,), np.float64)
    arr[:] = 1.0

    def total(a):
        return float(a.sum()), a.flags.owndata

    jid = cloud.call(total, arr)
    value, owndata = cloud.result(jid)
    assert value == float(n) and owndata is False
    peak = cloud.info(jid, ["memory"])["memory"]
    # The worker's peak holds the mapped array once (shared pages count in
    # RSS) and Python itself; a copy would add another GiB.
    assert peak < (1 << 30) + (400 << 20), peak


def test_a_large_result_comes_back_through_shared_memory(cluster):
    np = pytest.importorskip("numpy")
    jid = cloud.call(lambda: np.arange(4 << 20, dtype=np.int64))
    out = cloud.result(jid)
    assert out.shape == (4 << 20,) and int(out[-1]) == (4 << 20) - 1
    assert not out.flags.owndata


def test_a_result_passed_on_is_held_by_the_job_it_is_passed_to(cluster):
    np = pytest.importorskip("numpy")
    first = cloud.call(lambda: np.arange(1 << 17, dtype=np.int64))   # 1 MiB: a segment
    arr = cloud.result(first)
    s = _session.session()
    (name,) = s.ended[first.seq][0].segments
    second = cloud.call(lambda a: int(a[-1]), arr)        # refers to that segment, no copy
    assert any(m is s.result_segments[name].mapping for m in s.job_segments[second.seq])
    cloud.delete(first)
    assert cloud.result(second) == (1 << 17) - 1


def test_segments_live_where_the_agent_keeps_them(tmp_path):
    # An agent with its own --shm-dir: the client and the workers learn the
    # directory from the agent, with no PICLOUD_SHM_DIR set anywhere.
    pytest.importorskip("numpy")
    os.chmod(tmp_path, 0o755)
    shm = Path(tempfile.mkdtemp(prefix="picloud-test-shm-", dir="/dev/shm"))
    c = Cluster(tmp_path, name="shmdir", up_args=["--shm-dir", shm])
    try:
        code = textwrap.dedent(f"""
            import os, sys
            sys.path.insert(0, {str(PYTHON_DIR)!r})
            import numpy as np
            import picloud as cloud
            cloud.init({str(c.dir)!r})
            arr = cloud.array((1 << 20,), np.float64)
            arr[:] = 2.0
            twice = cloud.result(cloud.call(lambda a: a * 2, arr))
            files = sorted(os.listdir({str(shm)!r}))
            print(float(twice.sum()), twice.flags.owndata, len(files))
        """)
        env = {k: v for k, v in os.environ.items() if k != "PICLOUD_SHM_DIR"}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        total, owndata, files = done.stdout.split()
        # The argument and the result, both in the agent's directory.
        assert (float(total), owndata) == (4.0 * (1 << 20), "False"), done.stdout
        assert int(files) >= 2, done.stdout
    finally:
        c.stop()
        shutil.rmtree(shm, ignore_errors=True)


def test_server_going_away_mid_result_is_an_error_not_a_hang(tmp_path):
    os.chmod(tmp_path, 0o755)
    c = Cluster(tmp_path, name="goingaway")
    try:
        code = textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(PYTHON_DIR)!r})
            import picloud as cloud
            cloud.init({str(c.dir)!r})
            jid = cloud.call(time.sleep, 60)
            print("submitted", flush=True)
            try:
                cloud.result(jid)
            except Exception as e:
                print("raised", type(e).__name__, e, flush=True)
        """)
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "submitted"
        time.sleep(0.3)
        c.stop()
        out, _ = proc.communicate(timeout=30)
        assert out.startswith("raised"), out
    finally:
        c.stop()


def _across_a_restart(tmp_path, name, body):
    """Runs ``body`` (after ``cloud.init`` of a cluster) in a Python process,
    which prints "1" once ready and then reads a line; the cluster is stopped
    and started again before that line comes. Returns the process's stdout
    and stderr."""
    os.chmod(tmp_path, 0o755)
    c = Cluster(tmp_path, name=name)
    try:
        code = textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {str(PYTHON_DIR)!r})
            import picloud as cloud
            cloud.init({str(c.dir)!r})
        """) + textwrap.dedent(body)
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "1"
        c.stop()
        c = Cluster(tmp_path, name=name)
        return proc.communicate("go\n", timeout=120)
    finally:
        c.stop()


def test_a_thread_connects_again_after_the_server_restarted(tmp_path):
    out, err = _across_a_restart(tmp_path, "restarts", """
        import threading
        def outcome(f, *args):
            try:
                return f(*args)
            except Exception as e:
                return type(e).__name__
        unknown = cloud.Jid(1 << 30)
        ready, go, got = threading.Event(), threading.Event(), []
        def other():                         # a thread with a connection of its own
            cloud.result(cloud.call(int, "5"))
            ready.set()
            go.wait()
            got.append(outcome(cloud.status, unknown))
        t = threading.Thread(target=other)
        t.start()
        ready.wait()
        print(cloud.result(cloud.call(int, "1")), flush=True)
        sys.stdin.readline()                 # the server restarts meanwhile
        # A query connects again by itself.
        go.set()
        t.join()
        # A kill is not sent again: it finds the connection lost, and the
        # thread's next calls connect again.
        outcomes = [got[0], outcome(cloud.kill, unknown), outcome(cloud.status, unknown)]
        outcomes.append(cloud.result(cloud.call(int, "2"), timeout=60))
        print(outcomes, flush=True)
    """)
    assert out.strip() == "['UnknownJob', 'ConnectionLost', 'UnknownJob', 2]", out + err


def test_calls_right_after_a_server_restart_are_queued(tmp_path):
    # The thread's connection saw nothing of the restart: its next calls
    # must not be named by the numbers the old server reserved for it, and
    # none is lost.
    out, err = _across_a_restart(tmp_path, "callafter", """
        print(cloud.result(cloud.call(int, "1")), flush=True)
        sys.stdin.readline()                 # the server restarts meanwhile
        jids = [cloud.call(int, str(n)) for n in range(2, 40)]
        print(cloud.result(jids, timeout=60), flush=True)
    """)
    assert out.strip() == str(list(range(2, 40))), out + err


def test_a_map_right_after_a_server_restart_is_queued_once(tmp_path):
    # A map's batches wait for the server: the first one after the restart
    # finds the connection broken, connects again and is queued once.
    out, err = _across_a_restart(tmp_path, "mapafter", """
        print(cloud.result(cloud.map(int, ["1"]))[0], flush=True)
        sys.stdin.readline()                 # the server restarts meanwhile
        jids = cloud.map(int, [str(n) for n in range(2, 40)])
        print(cloud.result(jids, timeout=60), flush=True)
        print(len(set(str(j) for j in jids)), flush=True)
    """)
    assert out.strip().splitlines() == [str(list(range(2, 40))), "38"], out + err


def test_embedded_default_starts_and_stops_a_local_cluster(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PICLOUD_DIR", "PICLOUD_SERVER")}
    env["HOME"] = str(tmp_path)
    env["PYTHONPATH"] = str(PYTHON_DIR)
    code = "import picloud as cloud; print(cloud.result(cloud.map(lambda x: x*x, range(10))))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([x * x for x in range(10)])
    # Stopped at exit: no picloud up of ours is left.
    left = subprocess.run(["pgrep", "-f", f"picloud-{os.getuid()}-.* up"], capture_output=True, text=True)
    assert not [p for p in left.stdout.split() if p], left.stdout
