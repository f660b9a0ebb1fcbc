//! Reading C arguments and writing C results, with every check in one place:
//! NULL, alignment, UTF-8, lengths, buffer capacities, struct sizes.
//!
//! The `unsafe` helpers take the pointer contracts of the exported functions
//! (a non-NULL pointer is valid for what it claims) and check everything that
//! can be checked without trusting them further.

use std::ffi::{CStr, c_char};
use std::mem::size_of;

use crate::error::{FfiError, picloud_error_code};

/// Reads an optional string: `None` for NULL.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid and
/// unchanged for `'a`.
pub(crate) unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, FfiError> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL, and the caller promises a NUL-terminated string.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str().map(Some).map_err(|e| FfiError::invalid(format_args!("{what} is not valid UTF-8: {e}")))
}

/// Reads a required string.
///
/// # Safety
/// As [`opt_str`].
pub(crate) unsafe fn req_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, FfiError> {
    // SAFETY: the caller's contract is opt_str's.
    unsafe { opt_str(p, what) }?.ok_or_else(|| FfiError::null(what))
}

/// Reads `n` elements at `p`. `n == 0` gives an empty slice whatever `p` is
/// (NULL included); otherwise `p` must be non-NULL and aligned.
///
/// # Safety
/// When `n > 0` and `p` is non-NULL, `p` points to `n` initialized `T`s that
/// stay valid and unchanged for `'a`.
pub(crate) unsafe fn slice<'a, T>(p: *const T, n: usize, what: &str) -> Result<&'a [T], FfiError> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(FfiError::null(&format!("{what} (with a length of {n})")));
    }
    if !p.is_aligned() {
        return Err(FfiError::invalid(format_args!("{what} is not aligned for its type")));
    }
    if n.checked_mul(size_of::<T>()).is_none_or(|b| b > isize::MAX as usize) {
        return Err(FfiError::invalid(format_args!("{what} has an impossible length of {n}")));
    }
    // SAFETY: non-NULL, aligned, not too long for a slice; the caller promises
    // n initialized elements.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Reads an array of `n` strings, none of them NULL.
///
/// # Safety
/// As [`slice`] for the array, and each element as [`opt_str`].
pub(crate) unsafe fn str_array(
    p: *const *const c_char,
    n: usize,
    what: &str,
) -> Result<Vec<String>, FfiError> {
    // SAFETY: the caller's contract is slice's.
    let ptrs = unsafe { slice(p, n, what) }?;
    ptrs.iter()
        .enumerate()
        .map(|(i, &s)| {
            // SAFETY: the caller promises valid strings for every element.
            unsafe { req_str(s, &format!("{what}[{i}]")) }.map(str::to_owned)
        })
        .collect()
}

/// Checks an output pointer before any work is done, so that a bad one fails
/// the call before it has changed anything.
pub(crate) fn check_out<T>(p: *mut T, what: &str) -> Result<(), FfiError> {
    if p.is_null() {
        return Err(FfiError::null(what));
    }
    if !p.is_aligned() {
        return Err(FfiError::invalid(format_args!("{what} is not aligned for its type")));
    }
    Ok(())
}

/// Writes `value` to an output pointer checked with [`check_out`].
///
/// # Safety
/// `p` points to writable memory for one `T`.
pub(crate) unsafe fn write_out<T>(p: *mut T, value: T) {
    debug_assert!(!p.is_null() && p.is_aligned());
    // SAFETY: checked non-NULL and aligned by check_out; the caller promises
    // it is writable. `write` does not drop whatever was there (C memory).
    unsafe { p.write(value) }
}

/// Checks that a string of `len` bytes and its NUL fit a buffer of `cap`
/// bytes at `buf` (which may be NULL only when it is not needed: never).
pub(crate) fn check_buffer(buf: *mut c_char, cap: usize, len: usize, what: &str) -> Result<(), FfiError> {
    if buf.is_null() {
        return Err(FfiError::null(what));
    }
    if len >= cap {
        return Err(FfiError::new(
            picloud_error_code::PICLOUD_ERR_BUFFER_TOO_SMALL,
            format_args!("{what} holds {cap} bytes; {} are needed ({len} and the NUL)", len + 1),
        ));
    }
    Ok(())
}

/// Copies `s` and a NUL into `buf`, or fails with
/// `PICLOUD_ERR_BUFFER_TOO_SMALL`, writing an empty string when `cap > 0`, so
/// that a caller who ignores the error does not read garbage.
///
/// # Safety
/// `buf` is NULL or points to `cap` writable bytes.
pub(crate) unsafe fn write_str(buf: *mut c_char, cap: usize, s: &str, what: &str) -> Result<(), FfiError> {
    if let Err(e) = check_buffer(buf, cap, s.len(), what) {
        if !buf.is_null() && cap > 0 {
            // SAFETY: buf has at least one writable byte (cap > 0).
            unsafe { buf.write(0) };
        }
        return Err(e);
    }
    // SAFETY: buf holds cap > s.len() bytes, so s and its NUL fit; a caller's
    // buffer cannot overlap our string.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
        buf.add(s.len()).write(0);
    }
    Ok(())
}

/// A C struct that starts with `uint32_t struct_size`, set by the caller to
/// `sizeof` the struct its header declares.
///
/// # Safety
/// Implementors are `#[repr(C)]` and begin with a `u32` field holding the
/// size. Those read with [`read_sized`] (input structs) hold only integers and
/// raw pointers, so that any bit pattern a C caller writes is a valid value.
pub(crate) unsafe trait CStruct: Copy {
    /// The C name, for messages.
    const NAME: &'static str;
    /// Sizes of earlier versions of an input struct (a prefix of this one),
    /// still accepted by [`read_sized`]: the fields they lack read as zero.
    const EARLIER_SIZES: &'static [usize] = &[];
}

/// Checks the `struct_size` of the struct at `p` and reads the struct; one
/// of an earlier, shorter version has its missing fields zeroed.
///
/// # Safety
/// `p` is NULL or points to a struct whose first 4 bytes the caller has
/// written, and then to at least `struct_size` bytes it has written.
pub(crate) unsafe fn read_sized<T: CStruct>(p: *const T, what: &str) -> Result<T, FfiError> {
    if !p.is_null() && p.is_aligned() {
        // SAFETY: non-NULL and aligned; the caller wrote the first 4 bytes.
        let size = unsafe { p.cast::<u32>().read() } as usize;
        if T::EARLIER_SIZES.contains(&size) {
            // SAFETY: every field of an input struct is an integer or a raw
            // pointer (the trait's contract), for which zero is valid.
            let mut value: T = unsafe { std::mem::zeroed() };
            // SAFETY: the caller wrote `size` bytes at p, fewer than a T
            // holds; the two do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), (&raw mut value).cast::<u8>(), size) };
            return Ok(value);
        }
    }
    // SAFETY: the caller's contract is check_sized_at's.
    unsafe { check_sized_at(p, what) }?;
    // SAFETY: `check_sized_at` found the size this struct has; the caller
    // promises a whole, initialized T then.
    Ok(unsafe { p.read() })
}

/// Checks the `struct_size` at the start of an output struct.
///
/// # Safety
/// As [`read_sized`].
pub(crate) unsafe fn check_sized_out<T: CStruct>(p: *mut T, what: &str) -> Result<(), FfiError> {
    // SAFETY: the caller's contract is check_sized_at's.
    unsafe { check_sized_at(p, what) }
}

/// # Safety
/// `p` is NULL or points to at least 4 bytes the caller has written.
unsafe fn check_sized_at<T: CStruct>(p: *const T, what: &str) -> Result<(), FfiError> {
    if p.is_null() {
        return Err(FfiError::null(what));
    }
    if !p.is_aligned() {
        return Err(FfiError::invalid(format_args!("{what} is not aligned for {}", T::NAME)));
    }
    // SAFETY: non-NULL and aligned (a u32 at offset 0 is aligned with T); the
    // caller of the exported function wrote at least `struct_size`.
    let size = unsafe { p.cast::<u32>().read() };
    let expected = size_of::<T>();
    if size as usize != expected {
        return Err(FfiError::invalid(format_args!(
            "{what}->struct_size is {size}, but this libpicloud ({}) knows a {} of {expected} bytes: \
             set struct_size = sizeof({}), and build against the picloud.h of this library",
            crate::VERSION,
            T::NAME,
            T::NAME
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::picloud_error_code::*;

    #[test]
    fn strings_are_copied_with_their_nul_or_refused() {
        let mut buf = [b'x' as c_char; 4];
        // SAFETY: buf has 4 writable bytes.
        unsafe { write_str(buf.as_mut_ptr(), 4, "abc", "buf") }.unwrap();
        assert_eq!(buf.map(|c| c as u8), *b"abc\0");
        let mut buf = [b'x' as c_char; 4];
        // SAFETY: as above.
        let err = unsafe { write_str(buf.as_mut_ptr(), 4, "abcd", "buf") }.unwrap_err();
        assert_eq!(err.code, PICLOUD_ERR_BUFFER_TOO_SMALL);
        assert!(err.message.contains("5 are needed"), "{}", err.message);
        assert_eq!(buf[0], 0, "an empty string is left behind");
        // SAFETY: a NULL buffer is never written.
        let err = unsafe { write_str(std::ptr::null_mut(), 0, "", "buf") }.unwrap_err();
        assert_eq!(err.code, PICLOUD_ERR_NULL_POINTER);
    }

    #[test]
    fn slices_check_null_and_alignment() {
        // SAFETY: a zero length reads nothing.
        assert!(unsafe { slice::<u64>(std::ptr::null(), 0, "s") }.unwrap().is_empty());
        // SAFETY: NULL is refused before any read.
        let err = unsafe { slice::<u64>(std::ptr::null(), 2, "s") }.unwrap_err();
        assert_eq!(err.code, PICLOUD_ERR_NULL_POINTER);
        let words = [0u64; 2];
        let odd = (words.as_ptr() as usize + 1) as *const u64;
        // SAFETY: a misaligned pointer is refused before any read.
        let err = unsafe { slice(odd, 1, "s") }.unwrap_err();
        assert_eq!(err.code, PICLOUD_ERR_INVALID_ARGUMENT);
    }

    #[test]
    fn strings_must_be_utf8() {
        let bad = [0xffu8 as c_char, 0];
        // SAFETY: a NUL-terminated array.
        let err = unsafe { req_str(bad.as_ptr(), "name") }.unwrap_err();
        assert_eq!(err.code, PICLOUD_ERR_INVALID_ARGUMENT);
        // SAFETY: NULL is allowed for optional strings.
        assert_eq!(unsafe { opt_str(std::ptr::null(), "name") }.unwrap(), None);
    }
}
