//! Opaque handles, checked on every use.
//!
//! A handle given to C is the address of an `Arc<T>`'s value, but libpicloud
//! never dereferences a pointer it receives as a handle. Each handle type has
//! a [`Registry`]: a map from the addresses of its live objects to their
//! `Arc`s. A call looks the pointer up and works on a clone of the `Arc`, so
//!
//! - a freed handle, a pointer libpicloud never returned, or a handle of
//!   another type is not found and gives `PICLOUD_ERR_INVALID_HANDLE`, without
//!   reading the memory it points to (a double free is caught the same way);
//! - freeing a handle while another thread is inside a call with it is safe:
//!   the object lives until that call returns.
//!
//! The limit: once a handle is freed, the allocator may give its address to a
//! new object of the same type, and the stale handle then names that object.
//! Use after free is thus caught until the address is reused, never after.
//! The lookup costs one uncontended mutex and a B-tree search, small next to
//! the socket round trip of nearly every call.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{FfiError, picloud_error_code};

/// The live objects of one handle type.
pub(crate) struct Registry<T> {
    /// The C name of the type, for messages (`picloud_client`).
    kind: &'static str,
    live: Mutex<BTreeMap<usize, Arc<T>>>,
}

impl<T> Registry<T> {
    pub(crate) const fn new(kind: &'static str) -> Self {
        Self { kind, live: Mutex::new(BTreeMap::new()) }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, Arc<T>>> {
        // Nothing panics while the map is locked; should it, the map is intact.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `value` and returns its handle.
    pub(crate) fn insert(&self, value: T) -> *mut T {
        let arc = Arc::new(value);
        let ptr = Arc::as_ptr(&arc).cast_mut();
        self.map().insert(ptr as usize, arc);
        ptr
    }

    /// The object behind handle `ptr`, which `what` names in messages.
    pub(crate) fn get(&self, ptr: *const T, what: &str) -> Result<Arc<T>, FfiError> {
        if ptr.is_null() {
            return Err(FfiError::null(what));
        }
        self.map().get(&(ptr as usize)).cloned().ok_or_else(|| self.not_live(what))
    }

    /// Unregisters handle `ptr` and returns its object; `None` for NULL (freeing
    /// NULL does nothing, as `free(NULL)`).
    pub(crate) fn remove(&self, ptr: *const T, what: &str) -> Result<Option<Arc<T>>, FfiError> {
        if ptr.is_null() {
            return Ok(None);
        }
        self.map().remove(&(ptr as usize)).map(Some).ok_or_else(|| self.not_live(what))
    }

    fn not_live(&self, what: &str) -> FfiError {
        FfiError::new(
            picloud_error_code::PICLOUD_ERR_INVALID_HANDLE,
            format_args!(
                "{what} is not a live {}: it was freed, was never returned by libpicloud, \
                 or is a handle of another type",
                self.kind
            ),
        )
    }

    /// Number of live handles (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::picloud_error_code::*;

    #[test]
    fn handles_live_until_removed() {
        static R: Registry<String> = Registry::new("thing");
        let h = R.insert("a".to_string());
        assert_eq!(*R.get(h, "t").unwrap(), "a");
        let held = R.get(h, "t").unwrap();
        let removed = R.remove(h, "t").unwrap().unwrap();
        assert!(Arc::ptr_eq(&held, &removed));
        assert_eq!(*held, "a", "a call in progress keeps the object alive");
        assert_eq!(R.get(h, "t").unwrap_err().code, PICLOUD_ERR_INVALID_HANDLE);
        let err = R.remove(h, "t").unwrap_err();
        assert_eq!(err.code, PICLOUD_ERR_INVALID_HANDLE, "double free");
        assert!(err.message.contains("not a live thing"), "{}", err.message);
        assert!(R.remove(std::ptr::null(), "t").unwrap().is_none());
        assert_eq!(R.get(std::ptr::null(), "t").unwrap_err().code, PICLOUD_ERR_NULL_POINTER);
        assert_eq!(R.len(), 0);
    }

    #[test]
    fn garbage_and_foreign_pointers_are_refused() {
        static R: Registry<u64> = Registry::new("number");
        static OTHER: Registry<u64> = Registry::new("other");
        let h = OTHER.insert(7);
        assert_eq!(R.get(h, "n").unwrap_err().code, PICLOUD_ERR_INVALID_HANDLE);
        assert_eq!(R.get(std::ptr::dangling::<u64>(), "n").unwrap_err().code, PICLOUD_ERR_INVALID_HANDLE);
        assert_eq!(R.get(usize::MAX as *const u64, "n").unwrap_err().code, PICLOUD_ERR_INVALID_HANDLE);
        OTHER.remove(h, "n").unwrap();
    }
}
