//! libpicloud: the C ABI of picloud, for C tools and for the Python client.
//!
//! A thin layer over [`picloud_proto::Client`] (the server connection the
//! `picloud` commands use) and over the node agent's local socket for
//! shared-memory segments. `include/picloud.h` is generated from this crate by
//! cbindgen (see `cbindgen.toml`) and checked in; `docs/c-api.md` is the
//! guide.
//!
//! Conventions, the same for every function:
//!
//! 1. Names are `picloud_<type>_<verb>`; objects come from a `_connect`,
//!    `_create`, `_map` or fetching call and go back through `_free`.
//! 2. Every function that can fail returns an `int`: `PICLOUD_OK` (0) or a
//!    negative `PICLOUD_ERR_*` ([`picloud_error_code`]), and leaves a
//!    message for the calling thread in [`picloud_last_error`]. Results come
//!    through `*_out` parameters, written only on success.
//! 3. Every pointer is checked for NULL (freeing NULL does nothing), every
//!    handle is looked up among the live objects of its type before use
//!    (`handle.rs`), every string must be UTF-8, every struct a caller passes
//!    starts with its `struct_size`.
//! 4. No panic crosses into C: each function catches it and returns
//!    `PICLOUD_ERR_PANIC`.
//! 5. Handles may be used from any thread; calls on one handle take turns.
//!
//! Modules: `error` (codes, messages, the panic boundary), `handle` (the
//! registries of live handles), `args` (reading arguments, writing results),
//! `client` (connect, submit, wait, status, cancel), `pipeline` (sending
//! pipelined submissions nobody else sends), `results` (task
//! outcomes), `local` and `segment` (the agent's socket and segments).

#![allow(non_camel_case_types)]

mod args;
mod client;
mod error;
mod handle;
mod pipeline;
mod results;
mod segment;

use std::ffi::{c_char, c_int};

pub use client::*;
pub use error::picloud_error_code;
pub use results::*;
pub use segment::*;

/// This library's version, as `picloud --version` prints it.
pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The version of this libpicloud, e.g. `"0.1.0"` (a static string).
#[no_mangle]
pub extern "C" fn picloud_version() -> *const c_char {
    // Nothing here can panic; the string is static and NUL-terminated.
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed call on this thread ("" if none has
/// failed). The string belongs to libpicloud and stays valid until the next
/// failing call on this thread: copy it to keep it.
#[no_mangle]
pub extern "C" fn picloud_last_error() -> *const c_char {
    std::panic::catch_unwind(error::last_error_ptr).unwrap_or(c"".as_ptr())
}

/// The name of an error code (`"PICLOUD_ERR_TIMEOUT"`), or `"unknown"` for
/// a value that is not one. A static string.
#[no_mangle]
pub extern "C" fn picloud_error_name(code: c_int) -> *const c_char {
    let found = picloud_error_code::ALL.iter().find(|&&c| c as c_int == code);
    match found {
        Some(c) => c.name().as_ptr(),
        None => c"unknown".as_ptr(),
    }
}
