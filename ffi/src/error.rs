//! Error codes, the per-thread error message, and the boundary every exported
//! function runs its body in.
//!
//! Every fallible function returns a C `int`: [`picloud_error_code::PICLOUD_OK`]
//! (0) or a negative `PICLOUD_ERR_*` code. On failure it also stores a
//! message for the calling thread, which [`crate::picloud_last_error`] returns;
//! success leaves the message as it was (as `errno` does). [`boundary`] turns
//! a body's `Result` into that code and message, and turns a panic into
//! `PICLOUD_ERR_PANIC` instead of letting it cross into C.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int};
use std::fmt::Display;
use std::panic::{AssertUnwindSafe, catch_unwind};

use picloud_proto::{ClientError, ErrorKind, FrameError};

/// The codes returned by every libpicloud function that can fail. Functions
/// return them as a plain `int`; new codes may be added (negative ones), so
/// treat any other negative value as an error too.
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum picloud_error_code {
    /// Success.
    PICLOUD_OK = 0,
    /// A pointer the function needs was NULL.
    PICLOUD_ERR_NULL_POINTER = -1,
    /// A handle is not a live object of the expected type: already freed,
    /// never returned by libpicloud, or a handle of another type.
    PICLOUD_ERR_INVALID_HANDLE = -2,
    /// An argument has a value the function does not accept (a string that is
    /// not UTF-8, a `struct_size` this library does not know, an index out of
    /// range, an unknown flag or mode, ...).
    PICLOUD_ERR_INVALID_ARGUMENT = -3,
    /// An output buffer is too small; the message says how many bytes it needs.
    /// Nothing was done.
    PICLOUD_ERR_BUFFER_TOO_SMALL = -4,
    /// No server (or agent) answers at the address, or connecting failed.
    PICLOUD_ERR_CONNECT = -5,
    /// The connection broke (the server or agent went away). The handle stays
    /// unusable: free it and connect again.
    PICLOUD_ERR_CONNECTION_LOST = -6,
    /// The peer sent something this library cannot read (another protocol
    /// version, a malformed frame, an unexpected reply).
    PICLOUD_ERR_PROTOCOL = -7,
    /// The server or agent refused the request (an invalid job, a quota, the
    /// server shutting down, ...); the message says why.
    PICLOUD_ERR_SERVER = -8,
    /// A job id names no job the server knows (never submitted, or finished
    /// and forgotten).
    PICLOUD_ERR_UNKNOWN_JOB = -9,
    /// The job (or its results) belongs to another user.
    PICLOUD_ERR_PERMISSION_DENIED = -10,
    /// A wait ran out of time; the jobs go on.
    PICLOUD_ERR_TIMEOUT = -11,
    /// A local system call failed (opening or mapping a segment's file).
    PICLOUD_ERR_IO = -12,
    /// A bug in libpicloud: a Rust panic, caught at the boundary. A handle that
    /// was in use may be unusable afterwards.
    PICLOUD_ERR_PANIC = -13,
}

use picloud_error_code::*;

impl picloud_error_code {
    /// The constant's name, e.g. `PICLOUD_ERR_TIMEOUT`.
    pub(crate) fn name(self) -> &'static CStr {
        match self {
            PICLOUD_OK => c"PICLOUD_OK",
            PICLOUD_ERR_NULL_POINTER => c"PICLOUD_ERR_NULL_POINTER",
            PICLOUD_ERR_INVALID_HANDLE => c"PICLOUD_ERR_INVALID_HANDLE",
            PICLOUD_ERR_INVALID_ARGUMENT => c"PICLOUD_ERR_INVALID_ARGUMENT",
            PICLOUD_ERR_BUFFER_TOO_SMALL => c"PICLOUD_ERR_BUFFER_TOO_SMALL",
            PICLOUD_ERR_CONNECT => c"PICLOUD_ERR_CONNECT",
            PICLOUD_ERR_CONNECTION_LOST => c"PICLOUD_ERR_CONNECTION_LOST",
            PICLOUD_ERR_PROTOCOL => c"PICLOUD_ERR_PROTOCOL",
            PICLOUD_ERR_SERVER => c"PICLOUD_ERR_SERVER",
            PICLOUD_ERR_UNKNOWN_JOB => c"PICLOUD_ERR_UNKNOWN_JOB",
            PICLOUD_ERR_PERMISSION_DENIED => c"PICLOUD_ERR_PERMISSION_DENIED",
            PICLOUD_ERR_TIMEOUT => c"PICLOUD_ERR_TIMEOUT",
            PICLOUD_ERR_IO => c"PICLOUD_ERR_IO",
            PICLOUD_ERR_PANIC => c"PICLOUD_ERR_PANIC",
        }
    }

    /// Every code, for lookups by value.
    pub(crate) const ALL: [picloud_error_code; 14] = [
        PICLOUD_OK,
        PICLOUD_ERR_NULL_POINTER,
        PICLOUD_ERR_INVALID_HANDLE,
        PICLOUD_ERR_INVALID_ARGUMENT,
        PICLOUD_ERR_BUFFER_TOO_SMALL,
        PICLOUD_ERR_CONNECT,
        PICLOUD_ERR_CONNECTION_LOST,
        PICLOUD_ERR_PROTOCOL,
        PICLOUD_ERR_SERVER,
        PICLOUD_ERR_UNKNOWN_JOB,
        PICLOUD_ERR_PERMISSION_DENIED,
        PICLOUD_ERR_TIMEOUT,
        PICLOUD_ERR_IO,
        PICLOUD_ERR_PANIC,
    ];
}

/// A failure inside an exported function: its code and the message the
/// caller's thread will find in `picloud_last_error()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FfiError {
    pub(crate) code: picloud_error_code,
    pub(crate) message: String,
}

impl FfiError {
    pub(crate) fn new(code: picloud_error_code, message: impl Display) -> Self {
        Self { code, message: message.to_string() }
    }

    pub(crate) fn null(what: &str) -> Self {
        Self::new(PICLOUD_ERR_NULL_POINTER, format_args!("{what} is NULL"))
    }

    pub(crate) fn invalid(message: impl Display) -> Self {
        Self::new(PICLOUD_ERR_INVALID_ARGUMENT, message)
    }

    /// Whether the client's connection can no longer be trusted after this
    /// error (a reply may be missing or half read).
    pub(crate) fn breaks_connection(&self) -> bool {
        matches!(self.code, PICLOUD_ERR_CONNECTION_LOST | PICLOUD_ERR_PROTOCOL)
    }
}

impl From<ClientError> for FfiError {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::NotRunning { .. } | ClientError::Connect { .. } => PICLOUD_ERR_CONNECT,
            ClientError::Server(p) => match p.kind {
                ErrorKind::UnknownJob => PICLOUD_ERR_UNKNOWN_JOB,
                ErrorKind::PermissionDenied => PICLOUD_ERR_PERMISSION_DENIED,
                ErrorKind::Timeout => PICLOUD_ERR_TIMEOUT,
                ErrorKind::VersionMismatch | ErrorKind::Malformed => PICLOUD_ERR_PROTOCOL,
                ErrorKind::Invalid | ErrorKind::ShuttingDown => PICLOUD_ERR_SERVER,
            },
            ClientError::Frame(FrameError::Malformed(_) | FrameError::TooLarge { .. }) => {
                PICLOUD_ERR_PROTOCOL
            }
            ClientError::Frame(FrameError::Closed | FrameError::Truncated | FrameError::Io(_)) => {
                PICLOUD_ERR_CONNECTION_LOST
            }
            ClientError::Unexpected(_) => PICLOUD_ERR_PROTOCOL,
        };
        Self::new(code, e)
    }
}

thread_local! {
    /// The message of the last failure on this thread.
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// Stores `message` as this thread's last error. NUL bytes, which a C string
/// cannot hold, become spaces. A thread whose thread-locals are being
/// destroyed (a call from a `pthread_key` destructor) keeps no message: the
/// code alone tells what failed.
pub(crate) fn set_last_error(message: &str) {
    let bytes: Vec<u8> = message.bytes().map(|b| if b == 0 { b' ' } else { b }).collect();
    // No NUL left: the conversion cannot fail.
    let text = CString::new(bytes).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|cell| *cell.borrow_mut() = Some(text));
}

/// The start of this thread's last error message, or of an empty string
/// (also once the thread's thread-locals are destroyed). The pointer stays
/// valid until the thread's next failing call replaces it.
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR
        .try_with(|cell| match cell.borrow().as_ref() {
            // The CString's heap buffer does not move while it stays in the cell.
            Some(s) => s.as_ptr(),
            None => c"".as_ptr(),
        })
        .unwrap_or(c"".as_ptr())
}

fn panic_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Runs the body of an exported function: `Ok` becomes `PICLOUD_OK`, an
/// error its code (and this thread's message), a panic `PICLOUD_ERR_PANIC`.
pub(crate) fn boundary(body: impl FnOnce() -> Result<(), FfiError>) -> c_int {
    // AssertUnwindSafe: after a panic the only state observed again is behind
    // handles, whose mutexes are poisoned by it; a poisoned handle reports
    // itself unusable (see `client.rs`, `segment.rs`) rather than being used.
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => PICLOUD_OK as c_int,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.code as c_int
        }
        Err(payload) => {
            set_last_error(&format!(
                "internal error in libpicloud (a Rust panic): {}",
                panic_text(&*payload)
            ));
            // Dropping a payload could itself panic; that one is swallowed too.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
            PICLOUD_ERR_PANIC as c_int
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last() -> String {
        // SAFETY: last_error_ptr returns a NUL-terminated string owned by this
        // thread's cell (or a static), unchanged until the next failure here.
        unsafe { CStr::from_ptr(last_error_ptr()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn success_keeps_the_last_message() {
        assert_eq!(boundary(|| Err(FfiError::invalid("first"))), PICLOUD_ERR_INVALID_ARGUMENT as c_int);
        assert_eq!(last(), "first");
        assert_eq!(boundary(|| Ok(())), 0);
        assert_eq!(last(), "first");
    }

    #[test]
    fn messages_are_per_thread() {
        boundary(|| Err(FfiError::invalid("main thread")));
        std::thread::spawn(|| {
            assert_eq!(last(), "", "a new thread starts without a message");
            boundary(|| Err(FfiError::null("x")));
            assert_eq!(last(), "x is NULL");
        })
        .join()
        .unwrap();
        assert_eq!(last(), "main thread");
    }

    #[test]
    fn panics_become_a_code_and_a_message() {
        let code = boundary(|| panic!("boom {}", 42));
        assert_eq!(code, PICLOUD_ERR_PANIC as c_int);
        assert!(last().contains("boom 42"), "{}", last());
    }

    #[test]
    fn nul_bytes_do_not_truncate_messages() {
        set_last_error("a\0b");
        assert_eq!(last(), "a b");
    }

    #[test]
    fn names_match_values() {
        for code in picloud_error_code::ALL {
            assert!(code.name().to_str().unwrap().starts_with("PICLOUD_"));
        }
        let mut values: Vec<i32> = picloud_error_code::ALL.iter().map(|&c| c as i32).collect();
        values.dedup();
        assert_eq!(values, (-13..=0).rev().collect::<Vec<_>>(), "codes are 0, -1, -2, ... without gaps");
    }
}
