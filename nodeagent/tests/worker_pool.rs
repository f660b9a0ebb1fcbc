//! The worker pool with a real Python worker (`python -m picloud.worker`):
//! a function that did not load on a worker is sent again with the next task
//! that uses it, never assumed to be in the worker's cache.

use std::path::Path;
use std::time::Duration;

use picloud_nodeagent::workers::{PoolKey, WorkerEvent, WorkerPool};
use picloud_proto::TaskId;
use picloud_proto::local_wire::LocalMsg;

#[test]
fn a_function_that_did_not_load_is_sent_again() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python_dir = root.join("python").canonicalize().unwrap().display().to_string();
    let mut pool = WorkerPool::new(1, Some(python_dir));
    // The interpreter the tests' `python3` is (workers start with a clean PATH).
    let python3 = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python3)
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 runs");
    let interpreter = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let key = PoolKey {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        interpreter,
        sys_path: Vec::new(),
        mem_limit: None,
    };
    let (worker, _) = pool.acquire(&key, &[0], &mut |_| Ok(Box::new(()))).expect("a worker starts");
    // Two tasks of one function key whose pickle is not a pickle: each must
    // fail on the pickle itself, not on a cache that was never filled.
    for seq in 1..=2 {
        let task = TaskId { seq, index: None };
        let tag = pool.dispatch(worker, task, 7, b"not a pickle", b"", "/", &[], false).expect("sent");
        let (status, error) = 'done: loop {
            for event in pool.wait(worker, Duration::from_secs(60)).expect("poll") {
                match event {
                    WorkerEvent::Message(_, LocalMsg::Done { tag: t, status, error, .. }) if t == tag => {
                        break 'done (status, error);
                    }
                    WorkerEvent::Message(_, LocalMsg::Ready { .. }) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        };
        assert_eq!(status, 2, "task {seq}: {error}");
        assert!(!error.contains("cache"), "task {seq} was sent without its pickle: {error}");
        pool.finish(worker, true);
    }
    pool.kill(worker, nix::sys::signal::Signal::SIGKILL);
}
