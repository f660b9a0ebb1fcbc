//! The agent's local socket (`agent.sock`): clients on this node ask it for
//! shared-memory segments (see `docs/workers.md`). Anyone on the node may
//! connect; who they are comes from the kernel (`SO_PEERCRED`), and the store
//! gives each user only their own segments.
//!
//! An acceptor thread takes connections; each gets a reader thread that turns
//! its frames into [`LocalEvent`]s for the main loop, which alone answers.

use std::io::{self, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use tracing::{debug, warn};

use super::python::LocalEvent;
use super::{Event, Events};
use crate::local_wire::read_msg;

/// A bound local socket; dropping it removes the socket file.
#[derive(Debug)]
pub(super) struct LocalSocket {
    path: PathBuf,
}

impl LocalSocket {
    /// Binds `path` (replacing a stale socket no agent answers on) and starts
    /// accepting clients, whose events go to `events`.
    pub(super) fn start(path: &Path, events: Events) -> io::Result<Self> {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another node agent already listens on {}", path.display()),
            ));
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        // Every local user may ask; the store checks who owns what.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
        std::thread::Builder::new()
            .name("agent-local".into())
            .spawn(move || accept_loop(listener, events))?;
        Ok(Self { path: path.to_path_buf() })
    }
}

impl Drop for LocalSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, events: Events) {
    let mut next_conn = 0u64;
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!("cannot accept a local client: {e}");
                continue;
            }
        };
        let cred = match getsockopt(&stream, PeerCredentials) {
            Ok(c) => c,
            Err(e) => {
                warn!("cannot learn who a local client is: {e}");
                continue;
            }
        };
        let conn = next_conn;
        next_conn += 1;
        let Ok(reader) = stream.try_clone() else { continue };
        let connected = LocalEvent::Connected { conn, stream, uid: cred.uid(), gid: cred.gid() };
        if !events.send(Event::Local(connected)) {
            return;
        }
        let events = events.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("agent-local-{conn}"))
            .spawn(move || read_client(conn, reader, events));
        if let Err(e) = spawned {
            warn!("cannot serve a local client: {e}");
        }
    }
}

fn read_client(conn: u64, stream: UnixStream, events: Events) {
    let mut reader = BufReader::new(stream);
    loop {
        let event = match read_msg(&mut reader) {
            Ok(Some(msg)) => LocalEvent::Message { conn, msg },
            Ok(None) => LocalEvent::Closed { conn, error: None },
            Err(e) => LocalEvent::Closed { conn, error: Some(e.to_string()) },
        };
        let closed = matches!(event, LocalEvent::Closed { .. });
        if !events.send(Event::Local(event)) || closed {
            debug!(conn, "local client gone");
            return;
        }
    }
}
