//! The thread that sends a client's pipelined submissions
//! (`picloud_client_submit_python_async`) when nobody else does.
//!
//! A pipelined submission is written into the connection's buffer and the
//! caller goes on at once. The next request on the client sends it, in the
//! same write: `call` then `result` costs one round trip, not two. When no
//! request follows (a script that submits and then works on something else),
//! this thread sends what is buffered within [`FLUSH_DELAY`], so a job
//! never waits for its client's next call to reach the server. It is
//! started with a client's first pipelined submission, looks every
//! [`FLUSH_DELAY`] while submissions are being made, sleeps when they stop,
//! and ends when the client is freed.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use crate::client::picloud_client;

/// How long a pipelined submission may stay in the client before this
/// thread sends it.
pub(crate) const FLUSH_DELAY: Duration = Duration::from_millis(1);

/// The thread sleeps (until the next submission) once no submission has
/// been made for this long; until then it looks every [`FLUSH_DELAY`].
const IDLE_AFTER: Duration = Duration::from_millis(50);

thread_local! {
    /// Set on flushing threads (`std::thread::current` would allocate a
    /// handle on the caller's thread that C programs never free).
    static IN_FLUSHER: Cell<bool> = const { Cell::new(false) };
}

/// The thread's state.
struct State {
    /// When the last pipelined submission was made.
    last: Instant,
    /// The thread sleeps until the next submission.
    idle: bool,
    /// The client is gone: the thread ends.
    stop: bool,
    /// The thread, once started.
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The flushing thread's side of one client.
pub(crate) struct Flusher {
    state: Mutex<State>,
    wake: Condvar,
}

impl Default for Flusher {
    fn default() -> Self {
        let state = State { last: Instant::now(), idle: true, stop: false, thread: None };
        Self { state: Mutex::new(state), wake: Condvar::new() }
    }
}

impl Flusher {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while the state is locked; should it, it is intact.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes that `client` made a pipelined submission, starting the thread
    /// the first time and waking it when it sleeps. Returns false when the
    /// thread cannot be started; the caller then sends at once.
    pub(crate) fn schedule(self: &Arc<Self>, client: &Arc<picloud_client>) -> bool {
        let mut state = self.state();
        state.last = Instant::now();
        if state.thread.is_none() {
            let (me, weak) = (self.clone(), Arc::downgrade(client));
            state.thread =
                std::thread::Builder::new().name("picloud-flush".into()).spawn(move || me.run(weak)).ok();
        }
        if state.idle {
            state.idle = false;
            self.wake.notify_one();
        }
        state.thread.is_some()
    }

    /// Ends the thread (the client is being dropped) and waits for it,
    /// unless this is that thread (it dropped the client's last reference).
    pub(crate) fn stop(&self) {
        let thread = {
            let mut state = self.state();
            state.stop = true;
            state.thread.take()
        };
        self.wake.notify_one();
        if let Some(t) = thread.filter(|_| !IN_FLUSHER.with(Cell::get)) {
            let _ = t.join();
        }
    }

    /// Every [`FLUSH_DELAY`] while submissions are being made, sends what
    /// the client buffered and reads the replies (nothing to do, usually:
    /// the client's own requests do both).
    fn run(&self, client: Weak<picloud_client>) {
        IN_FLUSHER.with(|f| f.set(true));
        let mut state = self.state();
        loop {
            if state.stop {
                return;
            }
            if state.idle {
                state = self.wake.wait(state).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            state = self.wake.wait_timeout(state, FLUSH_DELAY).unwrap_or_else(PoisonError::into_inner).0;
            if state.stop {
                return;
            }
            if state.last.elapsed() >= IDLE_AFTER {
                state.idle = true;
            }
            drop(state);
            let Some(client) = client.upgrade() else { return };
            // A broken connection is reported by the client's next call.
            let _ = client.confirm_pipelined();
            drop(client);
            state = self.state();
        }
    }
}
